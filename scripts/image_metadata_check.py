#!/usr/bin/env python3
"""What turbine's image files say about themselves (`--image-metadata`), read by ExifTool.

Starts the real server three times on the tiny fixture model (`provenance`, the default;
`parameters`; `none`), asks each for images every way a client can get them (base64 PNG, JPEG
by URL, lossless and lossy WebP, an event stream, an inpainting edit, a LoRA adapter's image)
and reads every file with ExifTool, an independent reader, with `-validate`: the files must be
valid, carry IPTC's digital source type and the model's name (and with `parameters` the
prompts and the `parameters` text), or, with `none`, no metadata at all. Standard library only.

Usage: image_metadata_check.py --bin target/debug/turbine --exiftool PATH/exiftool
"""

import argparse
import base64
import json
import os
import re
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
import zlib

TRAINED = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
COMPOSITE = "http://cv.iptc.org/newscodes/digitalsourcetype/compositeWithTrainedAlgorithmicMedia"
PROMPT = 'a red <fox> & "friends" at dusk'


def start(binary, work, level):
    log = open(os.path.join(work, f"server-{level}.log"), "w+")
    proc = subprocess.Popen(
        [binary, "serve", "--model-dir", "tests/fixtures/tiny-sdxl", "--device", "cpu",
         "--host", "127.0.0.1", "--port", "0", "--min-image-side", "64",
         "--max-image-side", "128", "--default-size", "64x64", "--warmup-images", "1",
         "--lora-modules", "ink=tests/fixtures/reference/lora_kohya.safetensors",
         "--image-metadata", level],
        stdout=subprocess.DEVNULL, stderr=log, env={**os.environ, "NO_COLOR": "1"})
    return proc, log


def base_url(proc, log):
    deadline = time.time() + 300
    while time.time() < deadline:
        log.seek(0)
        m = re.search(r"listening on (http://[0-9.:]+)", log.read())
        if m:
            base = m.group(1)
            try:
                with urllib.request.urlopen(base + "/health", timeout=5) as r:
                    if r.status == 200:
                        return base
            except OSError:
                pass
        if proc.poll() is not None:
            log.seek(0)
            sys.exit(f"the server exited:\n{log.read()}")
        time.sleep(0.2)
    sys.exit("the server never became healthy")


def post_json(url, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return r.read()


def png_rgba(width, height, pixel):
    """A PNG of RGBA pixels, pixel(x, y) -> 4 bytes, written with zlib alone."""
    raw = b"".join(b"\0" + b"".join(pixel(x, y) for x in range(width)) for y in range(height))

    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def multipart(fields, files):
    boundary = "turbine-metadata-check"
    out = b""
    for name, value in fields.items():
        out += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n"
                f"{value}\r\n").encode()
    for name, (filename, data) in files.items():
        out += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; "
                f"filename=\"{filename}\"\r\nContent-Type: image/png\r\n\r\n").encode()
        out += data + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return out, f"multipart/form-data; boundary={boundary}"


def images(base, work, level):
    """Every way of getting an image, as (name, file path, expected source, prompt, adapter)."""
    got = []

    def keep(name, data, source=TRAINED, adapter=None):
        path = os.path.join(work, f"{level}-{name}")
        with open(path, "wb") as f:
            f.write(data)
        got.append((name, path, source, adapter))

    gen = base + "/v1/images/generations"
    common = {"prompt": PROMPT, "negative_prompt": "blurry", "seed": 7}
    body = json.loads(post_json(gen, {**common, "response_format": "b64_json"}))
    keep("b64.png", base64.b64decode(body["data"][0]["b64_json"]))
    body = json.loads(post_json(gen, {**common, "response_format": "url", "output_format": "jpeg",
                                      "output_compression": 80}))
    with urllib.request.urlopen(body["data"][0]["url"], timeout=60) as r:
        keep("url.jpeg", r.read())
    for name, compression in [("lossless.webp", 100), ("lossy.webp", 70)]:
        body = json.loads(post_json(gen, {**common, "output_format": "webp",
                                          "output_compression": compression}))
        keep(name, base64.b64decode(body["data"][0]["b64_json"]))
    body = json.loads(post_json(gen, {**common, "model": "ink"}))
    keep("adapter.png", base64.b64decode(body["data"][0]["b64_json"]), adapter="ink")
    events = post_json(gen, {**common, "stream": True}).decode()
    done = [json.loads(line[5:]) for line in events.splitlines()
            if line.startswith("data:") and "image_generation.completed" in line]
    keep("stream.png", base64.b64decode(done[0]["b64_json"]))

    # An inpainting edit of the first image: the mask's transparent top half is repainted.
    with open(got[0][1], "rb") as f:
        source = f.read()
    mask = png_rgba(64, 64, lambda x, y: bytes([0, 0, 0, 0 if y < 32 else 255]))
    form, content_type = multipart({**{k: str(v) for k, v in common.items()}},
                                   {"image": ("in.png", source), "mask": ("mask.png", mask)})
    req = urllib.request.Request(base + "/v1/images/edits", data=form,
                                 headers={"Content-Type": content_type})
    with urllib.request.urlopen(req, timeout=120) as r:
        keep("edit.png", base64.b64decode(json.loads(r.read())["data"][0]["b64_json"]),
             source=COMPOSITE)
    return got


def exiftool(tool, path):
    out = subprocess.run([tool, "-j", "-G1", "-a", "-all", "-validate", "-warning", path],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)[0]


def check(tool, level, files):
    failures = []
    for name, path, source, adapter in files:
        tags = exiftool(tool, path)
        what = f"{level} {name}"
        problems = []
        if tags.get("ExifTool:Validate") != "OK":
            problems.append(f"Validate: {tags.get('ExifTool:Validate')}, "
                            f"{ {k: v for k, v in tags.items() if 'Warning' in k} }")
        xmp = {k: v for k, v in tags.items() if k.startswith("XMP")}
        if level == "none":
            if xmp or "PNG:Parameters" in tags:
                problems.append(f"metadata where none was asked for: {xmp}")
        else:
            want = {
                "XMP-iptcExt:DigitalSourceType": source,
                "XMP-iptcExt:AISystemUsed": "sdxl-turbo" + (f" with LoRA {adapter}" if adapter else ""),
            }
            if level == "parameters":
                want["XMP-iptcExt:AIPromptInformation"] = PROMPT + "\nNegative prompt: blurry"
            for k, v in want.items():
                if xmp.get(k) != v:
                    problems.append(f"{k}: {xmp.get(k)!r}, expected {v!r}")
            if not str(xmp.get("XMP-xmp:CreatorTool", "")).startswith("turbine "):
                problems.append(f"CreatorTool: {xmp.get('XMP-xmp:CreatorTool')!r}")
            if level == "provenance" and "XMP-iptcExt:AIPromptInformation" in xmp:
                problems.append("the prompt is in the file without --image-metadata parameters")
            params = tags.get("PNG:Parameters")
            if level == "parameters" and name.endswith(".png"):
                lines = str(params).split("\n")
                if lines[:2] != [PROMPT, "Negative prompt: blurry"] or "Seed: 7" not in lines[2] \
                        or "Sampler: Euler a" not in lines[2]:
                    problems.append(f"PNG:Parameters: {params!r}")
                if adapter and f"Lora: {adapter}" not in lines[2]:
                    problems.append(f"PNG:Parameters names no adapter: {params!r}")
            elif params is not None:
                problems.append(f"PNG:Parameters where it does not belong: {params!r}")
        status = "FAILED" if problems else "ok"
        print(f"{status:6} {what}: {xmp.get('XMP-iptcExt:DigitalSourceType', 'no XMP')}")
        failures += [f"{what}: {p}" for p in problems]
    return failures


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--exiftool", required=True)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as work:
        levels = ["provenance", "parameters", "none"]
        servers = {level: start(args.bin, work, level) for level in levels}
        failures = []
        try:
            for level in levels:
                base = base_url(*servers[level])
                failures += check(args.exiftool, level, images(base, work, level))
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(timeout=60)
    if failures:
        sys.exit("image metadata check failed:\n  " + "\n  ".join(failures))
    print(f"image metadata: every file valid and as --image-metadata says, for {len(levels)} levels")


if __name__ == "__main__":
    main()
