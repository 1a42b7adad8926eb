#!/usr/bin/env python3
"""The latency of the requests that write to the files directory: an upload (Files API), a batch
created, a file deleted. What making them durable (fsync) costs is read off two runs of this
against two servers.

    python3 scripts/bench/file_writes.py --base-url http://127.0.0.1:8000 [--n 200] [--kib 100]

Prints the median and the 95th percentile of each, in ms, and a Markdown row per kind.
"""
import argparse
import json
import os
import statistics
import time
import urllib.request


def call(base, method, path, body=None, raw=None, ctype="application/json"):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(base + path, data=data, method=method,
                                 headers={"Content-Type": ctype} if data else {})
    with urllib.request.urlopen(req) as r:
        return json.loads(r.read())


def form(purpose, data):
    b = "TURBINEBOUNDARY"
    head = (f'--{b}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\n{purpose}\r\n'
            f'--{b}\r\nContent-Disposition: form-data; name="file"; filename="f.jsonl"\r\n\r\n')
    return head.encode() + data + f"\r\n--{b}--\r\n".encode(), f"multipart/form-data; boundary={b}"


def timed(f):
    t0 = time.perf_counter()
    out = f()
    return (time.perf_counter() - t0) * 1000, out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--kib", type=int, default=100, help="the size of each uploaded file")
    a = ap.parse_args()
    base = a.base_url.rstrip("/")
    line = json.dumps({"custom_id": "x", "method": "POST", "url": "/v1/images/generations",
                       "body": {"prompt": "x", "size": "64x64"}}).encode()
    times = {"upload": [], "batch create": [], "delete": []}
    for i in range(a.n):
        raw, ctype = form("user_data", os.urandom(a.kib * 1024))
        ms, f = timed(lambda: call(base, "POST", "/v1/files", raw=raw, ctype=ctype))
        times["upload"].append(ms)
        ms, _ = timed(lambda: call(base, "DELETE", f"/v1/files/{f['id']}"))
        times["delete"].append(ms)
        if i % 4 == 0:
            raw, ctype = form("batch", line)
            f = call(base, "POST", "/v1/files", raw=raw, ctype=ctype)
            ms, _ = timed(lambda: call(base, "POST", "/v1/batches", {
                "input_file_id": f["id"], "completion_window": "24h",
                "endpoint": "/v1/images/generations"}))
            times["batch create"].append(ms)
    for kind, t in times.items():
        t.sort()
        p95 = t[min(len(t) - 1, int(len(t) * 0.95))]
        print(f"| {kind} | {len(t)} | {statistics.median(t):.2f} | {p95:.2f} |")


if __name__ == "__main__":
    main()
