"""Unit tests of serve_check.py's pure parts (the whole script runs in .ci/run's serve-check
phase against the debug build)."""

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


if __name__ == "__main__":
    unittest.main()
