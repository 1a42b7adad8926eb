"""Unit tests of serve_check.py's pure parts (the whole script runs in .ci/run's serve-check
phase against the debug build)."""

import base64
import json
import sys
import unittest
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve_check as s  # noqa: E402


class ServeCheck(unittest.TestCase):
    def test_percentiles_pick_the_nearest_rank(self):
        xs = [5, 1, 4, 2, 3]
        self.assertEqual(s.pct(xs, 0.5), 3)
        self.assertEqual(s.pct(xs, 0.0), 1)
        self.assertEqual(s.pct(xs, 1.0), 5)
        self.assertEqual(s.pct(list(range(1, 101)), 0.99), 99)
        self.assertIsNone(s.pct([], 0.5))

    def test_the_table_holds_every_level_and_the_start_up(self):
        res = {"started_utc": "2026-11-29T23:00:00+00:00", "commit": "abc", "device": "cuda:0",
               "size": "512x512", "level_s": 20.0, "serve_args": ["--max-batch-size", "16"],
               "startup": {"healthy_s": 41.5, "warmup_s": 2.4, "smaller_s": 30.1},
               "first_requests": [0.035, 0.031],
               "levels": [{"clients": 8, "requests": 400, "ok": 399, "errors": 1,
                           "first_errors": ["503: timeout"], "wall_s": 20.0, "images_per_s": 19.95,
                           "p50_ms": 350.0, "p95_ms": 420.0, "p99_ms": 480.5, "mean_batch": 7.6,
                           "prompts": "distinct", "encoded": 400.0},
                          {"clients": 1, "requests": 10, "ok": 10, "errors": 0, "first_errors": [],
                           "wall_s": 20.0, "images_per_s": 0.5, "p50_ms": None, "p95_ms": None,
                           "p99_ms": None, "mean_batch": None, "prompts": "one", "encoded": 1.0}]}
        md = s.render(res)
        self.assertIn("start-up to `/health` 200: 41.5 s (warm-up batch 2.40 s, smaller sizes 30.10 s)", md)
        self.assertIn("35 ms, 31 ms", md)
        self.assertIn("| 8 | distinct | 400 | 1 | 19.95 | 350.0 | 420.0 | 480.5 | 7.60 | 400 |", md)
        self.assertIn("| 1 | one | 10 | 0 | 0.50 | - | - | - | - | 1 |", md)
        self.assertIn("First errors: 503: timeout", md)

    def test_the_counts_come_from_the_exposition(self):
        text = "\n".join([
            "# TYPE turbine_batch_size histogram",
            'turbine_batch_size_bucket{le="+Inf"} 12',
            "turbine_batch_size_sum 40",
            "turbine_batch_size_count 12",
            'turbine_prompt_embeddings_total{source="encoded"} 17',
            'turbine_prompt_embeddings_total{source="cached"} 23',
        ])
        self.assertEqual(s.parse_counts(text), (40.0, 12.0, 17.0))
        self.assertEqual(s.parse_counts(""), (0.0, 0.0, 0.0))

    def test_a_batch_input_is_one_generation_per_line(self):
        lines = s.batch_input(["a fox", "a boat"], "512x512").decode().splitlines()
        self.assertEqual(len(lines), 2)
        first = json.loads(lines[0])
        self.assertEqual((first["custom_id"], first["method"], first["url"]),
                         ("r0", "POST", "/v1/images/generations"))
        self.assertEqual(first["body"], {"prompt": "a fox", "n": 1, "size": "512x512"})

    def test_results_are_checked_line_by_line(self):
        png = base64.b64encode(s.PNG_MAGIC + b"rest").decode()
        ok = json.dumps({"custom_id": "r0", "response": {"status_code": 200, "body": {"data": [{"b64_json": png}]}}})
        bad = json.dumps({"custom_id": "r1", "response": {"status_code": 500, "body": {"error": {}}}})
        self.assertEqual(s.check_results(ok, 1), (1, []))
        good, problems = s.check_results(ok + "\n" + bad + "\n{", 4)
        self.assertEqual(good, 1)
        self.assertIn("r1: status 500", problems[0])
        self.assertIn("unreadable line", problems[1])
        self.assertIn("2 requests without a result line", problems[2])

    def test_the_batch_line_follows_the_table(self):
        res = {"started_utc": "x", "device": "cpu", "size": "256x256", "level_s": 3.0,
               "serve_args": [], "levels": [],
               "batch": {"requests": 64, "wall_s": 4.0, "images_per_s": 16.0, "mean_batch": 4.0,
                         "error": None}}
        self.assertIn("Batch API: 64 requests as one batch (distinct prompts), from `POST /v1/batches` to "
                      "`completed` in 4.00 s: 16.00 images/s, mean batch 4.00; every result line a PNG",
                      s.render(res))


if __name__ == "__main__":
    unittest.main()


class StreamAndWebhook(unittest.TestCase):
    def test_events_are_read_from_the_stream_s_lines(self):
        text = ("event: image_generation.partial_image\ndata: {\"partial_image_index\": 0}\n\n"
                ": keep-alive\n\n"
                "event: image_generation.completed\ndata: {\"b64_json\":\n"
                "data: \"x\"}\n\n")
        events = list(s.sse_events(text.splitlines(keepends=True)))
        self.assertEqual(events, [("image_generation.partial_image", {"partial_image_index": 0}),
                                  ("image_generation.completed", {"b64_json": "x"})])

    def test_signatures_are_standard_webhooks(self):
        # Standard Webhooks' reference vector.
        headers = {"webhook-id": "msg_p5jXN8AQM9LWM0D4loKWxJek", "webhook-timestamp": "1614265330",
                   "webhook-signature": "v1,bad v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="}
        body = b'{"test": 2432232314}'
        self.assertTrue(s.signature_ok("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", headers, body))
        self.assertFalse(s.signature_ok("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", headers, body + b" "))
        self.assertFalse(s.signature_ok("whsec_" + base64.b64encode(b"other").decode(), headers, body))

    def test_the_table_says_when_the_previews_and_the_webhook_came(self):
        res = {"started_utc": "2026-11-30T10:00:00+00:00", "device": "cpu", "size": "64x64",
               "level_s": 2.0, "serve_args": [], "levels": [],
               "stream": {"events": s.STREAM_EXPECTED, "at_s": [0.1, 0.2, 0.3], "error": None,
                          "without_previews_s": 0.25},
               "batch": {"requests": 32, "wall_s": 4.0, "images_per_s": 8.0, "mean_batch": 4.0,
                         "error": None, "webhook_s": 4.05}}
        md = s.render(res)
        self.assertIn("partial_image at 100 ms, partial_image at 200 ms, completed at 300 ms; the same "
                      "request without previews: completed at 250 ms", md)
        self.assertIn("its signed webhook came 4.05 s after the batch was created", md)
