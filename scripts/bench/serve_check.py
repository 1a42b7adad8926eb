#!/usr/bin/env python3
"""`turbine serve` end to end on one device: start-up, then HTTP load, for `gpu_check.sh --serve`.

Where gpu_check.py measures the pipeline (`turbine bench`), this measures the server a client
talks to: the time from the process start to `/health` 200 (model load, the warm-up batch and,
with `--warmup-batch-sizes`, every smaller size), the latency of the first requests after it
(a size planned late would show here as seconds), and images/s and latency percentiles at each
concurrency level, with the mean batch size the server formed (from /metrics); one streamed
request with previews (`quality: high`, four steps, `partial_images: 2`: its events, each a PNG,
and when they came) and the same without them; then, with `--batch-requests N`, the same images as one Batch API batch of N
requests (`/v1/files`, `/v1/batches`: upload to completed, its images/s and mean batch, every
result line checked) whose end a webhook endpoint on this machine hears of (signature checked).
Standard library only (the device machine has no network and `hey` is not there); one thread per
client, one image per request, PNG as base64, as an OpenAI SDK sends by default.

  python3 scripts/bench/serve_check.py --turbine BIN --out DIR [--model-dir DIR | --config-dir
      models/sdxl-turbo (a random model written by diffusers_ref.py make-model)] [--device cuda:0]
      [--size 512x512] [--max-batch-size 16] [--levels 1,8,32,64] [--level-s 20] [--budget-s 200]
      [--batch-requests 0] [-- EXTRA `turbine serve` ARGS]

Writes serve_check.md (a table) and serve_check.json (every figure) into --out.
"""

import argparse
import base64
import concurrent.futures as cf
import datetime
import hashlib
import hmac
import http.client
import http.server
import itertools
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))

from bench_prompts import prompt_at  # noqa: E402

# Every request of the check gets its own prompt (`prompt_at(next(PROMPT_SEQ))`), so no request
# is served from the server's prompt cache or shares a batch's encoding: the worst case.
PROMPT_SEQ = itertools.count()
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def log(msg):
    print(f"[serve_check] {msg}", file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(port, path, timeout=5.0):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request("GET", path)
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def generate(port, prompt, size, timeout):
    """One request of one image; (status, seconds, error or None)."""
    body = json.dumps({"prompt": prompt, "n": 1, "size": size, "response_format": "b64_json"})
    t = time.perf_counter()
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request("POST", "/v1/images/generations", body, {"Content-Type": "application/json"})
        r = c.getresponse()
        raw = r.read()
        dt = time.perf_counter() - t
        if r.status != 200:
            return r.status, dt, raw[:200].decode(errors="replace")
        data = json.loads(raw)["data"]
        png = base64.b64decode(data[0]["b64_json"])
        if len(data) != 1 or not png.startswith(PNG_MAGIC):
            return r.status, dt, "not one PNG"
        return r.status, dt, None
    except (OSError, ValueError, KeyError) as e:
        return 0, time.perf_counter() - t, repr(e)
    finally:
        c.close()


def request(port, method, path, body=None, headers=None, timeout=60.0):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request(method, path, body, headers or {})
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def batch_input(prompts, size):
    """The JSONL input of a Batch API batch: one generation per prompt."""
    return "\n".join(
        json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/images/generations",
                    "body": {"prompt": p, "n": 1, "size": size}})
        for i, p in enumerate(prompts)).encode()


def multipart(fields, filename, data, boundary="serve-check-7d1c5e"):
    """A `multipart/form-data` body of text `fields` and one file field named `file`."""
    out = b"".join(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n".encode()
                   for k, v in fields.items())
    out += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\n"
            f"Content-Type: application/jsonl\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return out, f"multipart/form-data; boundary={boundary}"


def check_results(text, n):
    """(good, problems) of a batch's output file: lines with status 200 and one PNG each, and what
    is wrong with the others or missing."""
    good, problems, seen = 0, [], set()
    for line in text.splitlines():
        try:
            r = json.loads(line)
            seen.add(r["custom_id"])
            resp = r["response"]
            if resp["status_code"] != 200:
                problems.append(f"{r['custom_id']}: status {resp['status_code']}")
                continue
            data = resp["body"]["data"]
            if len(data) == 1 and base64.b64decode(data[0]["b64_json"]).startswith(PNG_MAGIC):
                good += 1
            else:
                problems.append(f"{r['custom_id']}: not one PNG")
        except (ValueError, KeyError, TypeError) as e:
            problems.append(f"unreadable line: {e!r}")
    missing = n - len(seen)
    if missing > 0:
        problems.append(f"{missing} requests without a result line")
    return good, problems


def sse_events(lines):
    """(event name, data JSON) of each event of a `text/event-stream`, from its lines."""
    name, data = None, []
    for line in lines:
        line = line.rstrip("\r\n")
        if not line:
            if data:
                yield name, json.loads("\n".join(data))
            name, data = None, []
        elif line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip())
    if data:
        yield name, json.loads("\n".join(data))


STREAM_EXPECTED = ["image_generation.partial_image"] * 2 + ["image_generation.completed"]


def stream_events(port, body, timeout):
    """One streamed request: (event names, seconds from the request to each, error or None),
    every event's image checked to be a PNG."""
    names, at = [], []
    t = time.perf_counter()
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request("POST", "/v1/images/generations", json.dumps(body), {"Content-Type": "application/json"})
        r = c.getresponse()
        if r.status != 200:
            return names, at, f"{r.status}: {r.read()[:200]!r}"
        lines = (raw.decode() for raw in iter(r.readline, b""))
        for name, event in sse_events(lines):
            names.append(name)
            at.append(time.perf_counter() - t)
            if not base64.b64decode(event.get("b64_json", "")).startswith(PNG_MAGIC):
                return names, at, f"{name}: not a PNG ({str(event)[:200]})"
    except (OSError, ValueError) as e:
        return names, at, repr(e)
    finally:
        c.close()
    return names, at, None


def stream_check(port, size, timeout):
    """One streamed 4-step request with two previews (the events in order, each a PNG, when each
    came), then the same request without previews: what the previews cost the image."""
    body = {"prompt": prompt_at(next(PROMPT_SEQ)), "size": size, "quality": "high", "stream": True,
            "partial_images": 2, "seed": 7}
    names, at, error = stream_events(port, body, timeout)
    res = {"events": names, "at_s": at, "error": error}
    if error is None and names != STREAM_EXPECTED:
        res["error"] = f"events {names}, expected {STREAM_EXPECTED}"
    if res["error"] is None:
        plain, plain_at, error = stream_events(port, dict(body, partial_images=0), timeout)
        if error is None and plain != STREAM_EXPECTED[-1:]:
            error = f"events {plain} without previews, expected {STREAM_EXPECTED[-1:]}"
        res["error"] = error
        res["without_previews_s"] = plain_at[-1] if plain_at else None
    return res


def signature_ok(secret, headers, body):
    """Whether a webhook delivery carries a Standard Webhooks signature of `body` by `secret`."""
    key = base64.b64decode(secret[len("whsec_"):]) if secret.startswith("whsec_") else secret.encode()
    signed = f"{headers.get('webhook-id')}.{headers.get('webhook-timestamp')}.".encode() + body
    want = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    return any(hmac.compare_digest(f"v1,{want}", s) for s in headers.get("webhook-signature", "").split())


class WebhookReceiver:
    """A local webhook endpoint: records each delivery (arrival time, headers, body), answers 200."""

    def __init__(self):
        self.got, self.arrived = [], threading.Event()
        outer = self

        class Hook(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["content-length"]))
                outer.got.append((time.perf_counter(), {k.lower(): v for k, v in self.headers.items()}, body))
                outer.arrived.set()
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.HTTPServer(("127.0.0.1", 0), Hook)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


def batch_phase(port, n, size, timeout_s):
    """N requests as one Batch API batch: the wall time from `POST /v1/batches` to its status
    `completed` (polled every 0.1 s), images/s over it, the mean batch size the server formed,
    and every result line checked."""
    res = {"requests": n, "error": None}
    body, ct = multipart({"purpose": "batch"}, "serve_check.jsonl",
                         batch_input([prompt_at(next(PROMPT_SEQ)) for _ in range(n)], size))
    st, raw = request(port, "POST", "/v1/files", body, {"Content-Type": ct})
    if st != 200:
        res["error"] = f"upload: {st} {raw[:200]!r}"
        return res
    file_id = json.loads(raw)["id"]
    hook = WebhookReceiver()
    try:
        return run_batch(port, n, file_id, hook, res, timeout_s)
    finally:
        hook.close()


def run_batch(port, n, file_id, hook, res, timeout_s):
    st, raw = request(port, "POST", "/v1/webhook_endpoints", json.dumps(
        {"name": "serve_check", "url": hook.url, "event_types": ["batch.completed"]}),
        {"Content-Type": "application/json"})
    if st != 200:
        res["error"] = f"webhook endpoint: {st} {raw[:200]!r}"
        return res
    secret = json.loads(raw)["signing_secret"]
    s0, c0, _ = server_counts(port)
    t0 = time.perf_counter()
    st, raw = request(port, "POST", "/v1/batches", json.dumps(
        {"input_file_id": file_id, "endpoint": "/v1/images/generations", "completion_window": "24h"}),
        {"Content-Type": "application/json"})
    if st != 200:
        res["error"] = f"create: {st} {raw[:200]!r}"
        return res
    batch = json.loads(raw)
    while batch["status"] not in ("completed", "failed", "cancelled", "expired"):
        if time.perf_counter() - t0 > timeout_s:
            request(port, "POST", f"/v1/batches/{batch['id']}/cancel")
            res["error"] = f"not done after {timeout_s:.0f} s: {batch['request_counts']}"
            return res
        time.sleep(0.1)
        batch = json.loads(request(port, "GET", f"/v1/batches/{batch['id']}")[1])
    wall = time.perf_counter() - t0
    s1, c1, _ = server_counts(port)
    res.update({"status": batch["status"], "counts": batch["request_counts"], "wall_s": wall,
                "mean_batch": (s1 - s0) / (c1 - c0) if c1 > c0 else None})
    good = 0
    if batch.get("output_file_id"):
        st, raw = request(port, "GET", f"/v1/files/{batch['output_file_id']}/content", timeout=600)
        good, problems = check_results(raw.decode(errors="replace"), n)
        if problems:
            res["error"] = "; ".join(problems[:3])
    res["images_per_s"] = good / wall if wall > 0 else 0.0
    res["good"] = good
    hook.arrived.wait(30)
    if hook.got:
        at, headers, body = hook.got[0]
        event = json.loads(body)
        res["webhook_s"] = at - t0
        if not signature_ok(secret, headers, body):
            res["error"] = res["error"] or "the webhook's signature does not verify"
        elif (event.get("type"), event.get("data", {}).get("id")) != ("batch.completed", batch["id"]):
            res["error"] = res["error"] or f"the webhook's event is {event}"
    elif batch["status"] == "completed" and not res["error"]:
        res["error"] = "no webhook came within 30 s of the batch's end"
    if batch["status"] != "completed" and not res["error"]:
        res["error"] = f"batch {batch['status']}: {batch.get('errors')}"
    elif good != n and not res["error"]:
        res["error"] = f"{good} of {n} results good"
    return res


def server_counts(port):
    """(sum, count) of turbine_batch_size and the prompts run through the text encoders, from
    /metrics."""
    _, raw = get(port, "/metrics")
    return parse_counts(raw.decode())


def parse_counts(text):
    vals = {}
    for line in text.splitlines():
        m = re.match(r'^turbine_(batch_size_sum|batch_size_count|prompt_embeddings_total\{source="encoded"\}) '
                     r"([0-9.eE+-]+)$", line)
        if m:
            vals[m.group(1).split("{")[0]] = float(m.group(2))
    return (vals.get("batch_size_sum", 0.0), vals.get("batch_size_count", 0.0),
            vals.get("prompt_embeddings_total", 0.0))


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else None


def level(port, clients, seconds, size, timeout, prompt=None):
    """`clients` threads, each sending one request after another for `seconds`: every request
    its own prompt, or all of them `prompt`."""
    stop = time.perf_counter() + seconds
    results, lock = [], threading.Lock()

    def client(i):
        while time.perf_counter() < stop:
            r = generate(port, prompt or prompt_at(next(PROMPT_SEQ)), size, timeout)
            with lock:
                results.append(r)

    s0, c0, e0 = server_counts(port)
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(clients) as ex:
        list(ex.map(client, range(clients)))
    wall = time.perf_counter() - t0
    s1, c1, e1 = server_counts(port)
    ok = [dt for st, dt, err in results if st == 200 and err is None]
    errors = [f"{st}: {err}" for st, dt, err in results if not (st == 200 and err is None)]
    return {
        "clients": clients, "requests": len(results), "ok": len(ok), "errors": len(errors),
        "first_errors": errors[:3], "wall_s": wall,
        "images_per_s": len(ok) / wall if wall > 0 else 0.0,
        "p50_ms": pct(ok, 0.5) * 1e3 if ok else None,
        "p95_ms": pct(ok, 0.95) * 1e3 if ok else None,
        "p99_ms": pct(ok, 0.99) * 1e3 if ok else None,
        "mean_batch": (s1 - s0) / (c1 - c0) if c1 > c0 else None,
        "prompts": "distinct" if prompt is None else "one", "encoded": e1 - e0,
    }


def render(res):
    f = lambda v, spec=".1f": "-" if v is None else format(v, spec)  # noqa: E731
    lines = [f"### serve_check ({res['started_utc']})", ""]
    lines.append(f"- command: `turbine serve {' '.join(res['serve_args'])}`")
    lines.append(f"- commit: {res.get('commit', 'unknown')}; device {res['device']}; {res['size']}, "
                 f"1 step, one image per request, PNG as base64; clients send one request after "
                 f"another for {res['level_s']:g} s per level")
    st = res.get("startup") or {}
    if st:
        lines.append(f"- start-up to `/health` 200: {f(st.get('healthy_s'))} s (warm-up batch "
                     f"{f(st.get('warmup_s'), '.2f')} s, smaller sizes {f(st.get('smaller_s'), '.2f')} s)")
    first = res.get("first_requests") or []
    if first:
        lines.append("- the first requests after `/health` 200, one at a time: "
                     + ", ".join(f"{x * 1e3:.0f} ms" for x in first))
    sc = res.get("stream")
    if sc:
        lines.append("- one streamed request, `quality: high` (4 steps), `partial_images: 2`: "
                     + ", ".join(f"{n.rsplit('.', 1)[-1]} at {t * 1e3:.0f} ms"
                                 for n, t in zip(sc["events"], sc["at_s"]))
                     + (f"; the same request without previews: completed at "
                        f"{sc['without_previews_s'] * 1e3:.0f} ms" if sc.get("without_previews_s") else "")
                     + (f"; error: {sc['error']}" if sc.get("error") else ""))
    if res.get("error"):
        lines.append(f"- error: {res['error']}")
    lines += ["", "| clients | prompts | requests | errors | images/s | p50 ms | p95 ms | p99 ms | mean batch | "
              "prompts encoded |",
              "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res.get("levels", []):
        lines.append(f"| {r['clients']} | {r.get('prompts', 'distinct')} | {r['requests']} | {r['errors']} | "
                     f"{r['images_per_s']:.2f} | {f(r['p50_ms'])} | {f(r['p95_ms'])} | {f(r['p99_ms'])} | "
                     f"{f(r['mean_batch'], '.2f')} | {f(r.get('encoded'), '.0f')} |")
    lines += ["", "prompts: `distinct` = every request its own prompt, so each image runs the text encoders "
              "(none shares a batch's encoding or comes from the prompt cache); `one` = every request the same "
              "prompt, which the server keeps (`--prompt-cache-entries`). 'prompts encoded' counts the "
              "text-encoder runs of the level (`turbine_prompt_embeddings_total{source=\"encoded\"}`)."]
    b = res.get("batch")
    if b:
        lines += ["", f"Batch API: {b['requests']} requests as one batch (distinct prompts), from "
                      f"`POST /v1/batches` to `completed` in {f(b.get('wall_s'), '.2f')} s: "
                      f"{f(b.get('images_per_s'), '.2f')} images/s, mean batch {f(b.get('mean_batch'), '.2f')}"
                      + (f"; error: {b['error']}" if b.get("error") else
                         f"; every result line a PNG; its signed webhook came {f(b.get('webhook_s'), '.2f')} s "
                         "after the batch was created")]
    errs = [e for r in res.get("levels", []) for e in r["first_errors"]]
    if errs:
        lines += ["", "First errors: " + "; ".join(errs[:5])]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--turbine", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/turbine-serve-check"))
    ap.add_argument("--model-dir", type=Path, help="a model to serve (default: write a random one)")
    ap.add_argument("--config-dir", type=Path, default=ROOT / "models" / "sdxl-turbo")
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--size", default="512x512")
    ap.add_argument("--max-batch-size", type=int, default=16)
    ap.add_argument("--levels", default="1,8,32,64")
    ap.add_argument("--same-prompt-levels", default="32",
                    help="client counts to run again after --levels with every request the same prompt "
                         "(the prompt cache's case); empty: none")
    ap.add_argument("--level-s", type=float, default=20.0)
    ap.add_argument("--first-requests", type=int, default=4)
    ap.add_argument("--budget-s", type=float, default=200.0)
    ap.add_argument("--batch-requests", type=int, default=0,
                    help="after the levels, this many requests as one Batch API batch (0: none)")
    ap.add_argument("--commit", default=os.environ.get("TURBINE_COMMIT", "unknown"))
    ap.add_argument("serve_args", nargs="*", help="after --: more `turbine serve` arguments")
    a = ap.parse_args()
    t_start = time.monotonic()
    left = lambda: a.budget_s - (time.monotonic() - t_start)  # noqa: E731
    a.out.mkdir(parents=True, exist_ok=True)
    a.work.mkdir(parents=True, exist_ok=True)
    levels = [(int(x), None) for x in a.levels.split(",")]
    levels += [(int(x), prompt_at(0)) for x in a.same_prompt_levels.split(",") if x.strip()]
    res = {"started_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "commit": a.commit, "device": a.device, "size": a.size, "level_s": a.level_s,
           "levels": []}

    def save():
        (a.out / "serve_check.json").write_text(json.dumps(res, indent=2))
        md = render(res)
        (a.out / "serve_check.md").write_text(md)
        return md

    model = a.model_dir
    if model is None:
        model = a.work / "model"
        cmd = [sys.executable, str(HERE / "diffusers_ref.py"), "make-model", "--config-dir",
               str(a.config_dir), "--out", str(model), "--seed", "0", "--device",
               "cuda" if a.device.startswith("cuda") else "cpu", "--dtype", "f16", "--variant-fp16"]
        log(" ".join(cmd))
        if subprocess.run(cmd, timeout=max(10.0, left() - 60)).returncode != 0:
            res["error"] = "writing the random model failed"
            save()
            return 1
    port = free_port()
    res["serve_args"] = ["--model-dir", str(model), "--device", a.device, "--host", "127.0.0.1",
                         "--port", str(port), "--max-batch-size", str(a.max_batch_size),
                         "--max-queued-images", "4096", "--request-timeout", "600"] + a.serve_args
    log_path = a.work / "serve.log"
    env = dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "info"), NO_COLOR="1")
    t0 = time.monotonic()
    with open(log_path, "w") as lf:
        proc = subprocess.Popen([str(a.turbine), "serve"] + res["serve_args"], stdout=lf,
                                stderr=subprocess.STDOUT, env=env)
    try:
        healthy = None
        while time.monotonic() - t0 < max(10.0, left() - 30):
            if proc.poll() is not None:
                break
            try:
                if get(port, "/health", timeout=2)[0] == 200:
                    healthy = time.monotonic() - t0
                    break
            except OSError:
                pass
            time.sleep(0.2)
        text = log_path.read_text(errors="replace")
        def secs_after(message):
            # tracing writes the message, then its fields: `... warm-up batch done ... secs=1.2`
            m = re.search(re.escape(message) + r".*?secs=([0-9.]+)", text)
            return float(m.group(1)) if m else None

        res["startup"] = {"healthy_s": healthy, "warmup_s": secs_after("warm-up batch done"),
                          "smaller_s": secs_after("smaller batch sizes done")}
        if healthy is None:
            res["error"] = f"the server did not answer /health 200 (exit {proc.poll()}); log: {text[-800:]}"
            save()
            return 1
        log(f"healthy after {healthy:.1f} s")
        save()
        # The first requests, one at a time: each a new batch size for nothing but 1.
        firsts = []
        for i in range(a.first_requests):
            st, dt, err = generate(port, prompt_at(next(PROMPT_SEQ)), a.size, 600)
            if err:
                res["error"] = f"first request: {st} {err}"
                save()
                return 1
            firsts.append(dt)
        res["first_requests"] = firsts
        save()
        res["stream"] = stream_check(port, a.size, 600)
        log(f"stream: {res['stream']['events']} at {[round(x, 3) for x in res['stream']['at_s']]} s, "
            f"error {res['stream']['error']}")
        save()
        for c, prompt in levels:
            if left() < a.level_s + 15:
                log(f"{c} clients: skipped, {left():.0f} s left")
                break
            r = level(port, c, a.level_s, a.size, 600, prompt)
            log(f"{c} clients, {r['prompts']} prompts: {r['images_per_s']:.2f} images/s, p99 {r['p99_ms']} ms, "
                f"mean batch {r['mean_batch']}, encoded {r['encoded']:.0f}, errors {r['errors']}")
            res["levels"].append(r)
            save()
        if a.batch_requests > 0:
            if left() < 25:
                log(f"batch: skipped, {left():.0f} s left")
            else:
                b = batch_phase(port, a.batch_requests, a.size, left() - 15)
                log(f"batch of {b['requests']}: {b.get('images_per_s', 0):.2f} images/s, mean batch "
                    f"{b.get('mean_batch')}, error {b['error']}")
                res["batch"] = b
                save()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            proc.kill()
        res["serve_exit"] = proc.returncode
    md = save()
    print("\n" + md, flush=True)
    bad = [r for r in res["levels"] if r["errors"]]
    batch_failed = bool(res.get("batch", {}).get("error"))
    stream_failed = bool(res.get("stream", {}).get("error"))
    return 1 if bad or batch_failed or stream_failed or not res["levels"] else 0


if __name__ == "__main__":
    sys.exit(main())
