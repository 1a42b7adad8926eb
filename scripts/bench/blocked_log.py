"""The server with a log reader that stops reading: how many requests are answered, and how fast.

    python3 scripts/bench/blocked_log.py [--turbine BINARY] [--requests 5000] [--reading]

Starts the real binary on the tiny model with its stderr into a FIFO whose reader opens it and
never reads (as Docker's log driver in blocking mode on a full disk, or a stalled journald), or,
with --reading, reads it all along. Then sends `--requests` GET /v1/models one after another on
one keep-alive connection (each logs a line), each with a 10 s limit, and prints how many were
answered, their median and slowest times, and `turbine_log_lines_dropped_total`. Stops at the
first request that is not answered.
"""

import argparse
import http.client
import os
import socket
import statistics
import subprocess
import tempfile
import threading
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--turbine", default="target/debug/turbine")
    ap.add_argument("--requests", type=int, default=5000)
    ap.add_argument("--reading", action="store_true")
    args = ap.parse_args()

    work = tempfile.mkdtemp(prefix="turbine-blocked-log.")
    fifo = os.path.join(work, "stderr")
    os.mkfifo(fifo)
    kept = []

    def reader():
        with open(fifo, "rb") as f:
            if args.reading:
                for line in f:
                    kept.append(line)
            else:
                time.sleep(3600)

    threading.Thread(target=reader, daemon=True).start()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [args.turbine, "serve", "--model-dir", "tests/fixtures/tiny-sdxl", "--device", "cpu",
         "--host", "127.0.0.1", "--port", str(port), "--min-image-side", "64",
         "--default-size", "64x64", "--warmup-images", "1"],
        stderr=open(fifo, "wb"), env={**os.environ, "NO_COLOR": "1", "RUST_LOG": "info"})
    try:
        for _ in range(300):
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                c.request("GET", "/health")
                if c.getresponse().status == 200:
                    break
            except OSError:
                time.sleep(0.1)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        times = []
        for _ in range(args.requests):
            t = time.perf_counter()
            try:
                conn.request("GET", "/v1/models")
                r = conn.getresponse()
                r.read()
            except OSError:
                break
            times.append(time.perf_counter() - t)
        answered = len(times)
        dropped = "n/a"
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            c.request("GET", "/metrics")
            for line in c.getresponse().read().decode().splitlines():
                if line.startswith("turbine_log_lines_dropped_total "):
                    dropped = line.split()[1]
        except OSError:
            dropped = "no answer"
        print(f"reader {'reading' if args.reading else 'blocked'}: {answered} of {args.requests} "
              f"answered; median {statistics.median(times) * 1e3:.2f} ms, slowest "
              f"{max(times) * 1e3:.1f} ms; turbine_log_lines_dropped_total {dropped}")
    finally:
        server.kill()
        server.wait()


if __name__ == "__main__":
    main()
