#!/usr/bin/env python3
"""Hours of traffic in minutes: does the server's memory stay flat?

Runs `turbine serve` (the tiny model on the CPU by default) under a steady mix of what clients
send: generations of every size up to 1024x1024, `n` up to 3, PNG/JPEG/WebP, base64 and URLs
(each URL fetched), event streams with previews, and edits (a multipart upload of an image,
with a mask). It samples the server's resident memory (VmRSS, /proc) every few seconds and
prints it against the requests made. A server whose memory climbs under a steady load grows
until the machine kills it, hours or days in: a leak, or an allocator that keeps what each
request freed scattered over its arenas.

    python3 scripts/bench/soak.py --turbine target/debug/turbine --minutes 8

The URL store is capped at 4 MiB (--image-store-max-bytes), so that it is full within the
first minute and evicts from then on: at its default 512 MiB, its filling is growth by design. `soak.sh`
is the other soak: small images with `hey`, and floods of refused requests.

Exits non-zero if a request fails, or if the least resident memory of the last quarter of the
run is more than --max-growth-mib above that of the second quarter (the first is the warm-up:
the allocator reaching its working set; the least, because each request's buffers come and go). Write what it measured into benches/RESULTS.md with the
machine, date, command and commit.
"""

import argparse
import base64
import io
import json
import os
import random
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import zlib


def png(width, height, seed):
    """A small RGBA PNG of noise (an edit's input, or its mask)."""
    rnd = random.Random(seed)
    rows = b"".join(b"\x00" + bytes(rnd.getrandbits(8) for _ in range(width * 4))
                    for _ in range(height))

    def chunk(kind, data):
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def multipart(fields, files):
    boundary = "soakboundary%d" % random.getrandbits(32)
    out = io.BytesIO()
    for k, v in fields.items():
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'
                  .encode())
    for k, (name, data) in files.items():
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"; '
                  f'filename="{name}"\r\nContent-Type: image/png\r\n\r\n'.encode())
        out.write(data + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


class Load:
    def __init__(self, base, seed):
        self.base = base
        self.rnd = random.Random(seed)
        self.images = 0
        self.requests = 0
        self.errors = []

    def post(self, path, data, ctype):
        req = urllib.request.Request(self.base + path, data=data, method="POST",
                                     headers={"Content-Type": ctype})
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.read(), r.headers.get("Content-Type", "")

    def one(self):
        rnd = self.rnd
        # Mostly small images (many requests a minute on a CPU), now and then a large one.
        side = rnd.choice([64, 128, 128, 256, 256, 512]) if rnd.random() > 0.05 else 1024
        size = f"{side}x{rnd.choice([side, side, 256])}"
        body = {"prompt": f"a soak test jar {rnd.randrange(50)}", "size": size,
                "n": rnd.choice([1, 1, 2, 3]), "seed": rnd.randrange(1 << 31),
                "output_format": rnd.choice(["png", "jpeg", "webp"])}
        kind = rnd.choice(["b64", "b64", "url", "stream", "edit"])
        if kind == "url":
            # Small, so that the store (4 MiB) holds each image until its client fetches it.
            body.update(response_format="url", size=rnd.choice(["64x64", "128x128", "256x256"]))
        if kind == "stream":
            body.update(stream=True, partial_images=rnd.choice([0, 1]), steps=2, n=1)
        if kind == "edit":
            side = rnd.choice([128, 256])
            fields = {k: v for k, v in body.items() if k != "size"}
            fields["size"] = f"{side}x{side}"
            fields["n"] = 1
            files = {"image": ("in.png", png(side, side, rnd.randrange(1 << 20)))}
            if rnd.random() < 0.5:
                files["mask"] = ("mask.png", png(side, side, rnd.randrange(1 << 20)))
            raw, ctype = multipart(fields, files)
            out, _ = self.post("/v1/images/edits", raw, ctype)
            made = len(json.loads(out)["data"])
        else:
            out, ctype = self.post("/v1/images/generations", json.dumps(body).encode(),
                                   "application/json")
            if kind == "stream":
                made = out.count(b"image_generation.completed")
            else:
                data = json.loads(out)["data"]
                made = len(data)
                for item in data:
                    if "url" in item:
                        with urllib.request.urlopen(item["url"], timeout=60) as r:
                            r.read()
                    else:
                        base64.b64decode(item["b64_json"])
        self.images += made
        self.requests += 1

    def run(self, stop):
        while time.time() < stop:
            try:
                self.one()
            except (urllib.error.URLError, OSError, ValueError, KeyError) as e:
                body = e.read()[:300] if isinstance(e, urllib.error.HTTPError) else b""
                self.errors.append(f"{e} {body!r}")
                time.sleep(0.5)


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--turbine", default="target/debug/turbine")
    ap.add_argument("--model-dir", default="tests/fixtures/tiny-sdxl")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--minutes", type=float, default=4)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--port", type=int, default=18794)
    ap.add_argument("--sample-s", type=float, default=5)
    ap.add_argument("--max-growth-mib", type=float, default=64)
    ap.add_argument("--env", action="append", default=[],
                    help="NAME=VALUE for the server's environment (MALLOC_ARENA_MAX=2, ...)")
    ap.add_argument("serve_args", nargs="*", help="more `serve` options, after --")
    args = ap.parse_args()

    env = dict(os.environ)
    env.update(kv.split("=", 1) for kv in args.env)
    log = tempfile.NamedTemporaryFile(prefix="turbine-soak.", suffix=".log", delete=False)
    server = subprocess.Popen(
        [args.turbine, "serve", "--model-dir", args.model_dir, "--device", args.device,
         "--host", "127.0.0.1", "--port", str(args.port), "--min-image-side", "64",
         "--max-image-side", "1024", "--default-size", "256x256", "--warmup-images", "1",
         "--max-batch-size", "4", "--image-store-max-bytes", str(4 << 20), *args.serve_args],
        stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{args.port}"
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(base + "/health", timeout=2).read()
                break
            except (urllib.error.URLError, OSError):
                if server.poll() is not None:
                    sys.exit(f"the server exited: see {log.name}")
                time.sleep(0.2)
        start = time.time()
        stop = start + args.minutes * 60
        loads = [Load(base, seed) for seed in range(args.clients)]
        threads = [threading.Thread(target=l.run, args=(stop,)) for l in loads]
        for t in threads:
            t.start()
        samples = []
        print(f"{'s':>6} {'requests':>9} {'images':>7} {'RSS MiB':>8}")
        while time.time() < stop:
            time.sleep(args.sample_s)
            s = (time.time() - start, sum(l.requests for l in loads),
                 sum(l.images for l in loads), rss_mib(server.pid))
            samples.append(s)
            print(f"{s[0]:6.0f} {s[1]:9d} {s[2]:7d} {s[3]:8.1f}", flush=True)
        for t in threads:
            t.join()
        errors = [e for l in loads for e in l.errors]
        quarter = max(1, len(samples) // 4)
        # A request's buffers come and go (a 1024x1024 image's take hundreds of MiB on the CPU);
        # what stays is the floor: the least resident memory of each quarter.
        second = min(s[3] for s in samples[quarter:2 * quarter])
        last = min(s[3] for s in samples[-quarter:])
        growth = last - second
        peak = max(s[3] for s in samples)
        print(f"requests {samples[-1][1]}, images {samples[-1][2]}, errors {len(errors)}; "
              f"least RSS of the second quarter {second:.0f} MiB, of the last {last:.0f} MiB "
              f"({growth:+.0f}); peak {peak:.0f} MiB")
        for e in errors[:5]:
            print("error:", e)
        if errors or growth > args.max_growth_mib:
            sys.exit(1)
    finally:
        server.terminate()
        server.wait(timeout=60)


if __name__ == "__main__":
    main()
