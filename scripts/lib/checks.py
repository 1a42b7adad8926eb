"""What the real-binary checks (full_disk_check.sh, crash_check.sh, slow_disk_check.sh) say to the
server they start, and how they report: their Python steps import this (from the repository's
root, with scripts/lib on sys.path) and call `use_port` first."""

import json
import sys
import time
import urllib.error
import urllib.request

base = None
# What failed so far, for a step that makes every check before it fails.
failed = []


def use_port(port):
    """Speaks to the server on 127.0.0.1:`port` from now on; its base URL."""
    global base
    base = f"http://127.0.0.1:{port}"
    return base


def call(method, path, body=None, raw=None, ctype="application/json"):
    """(status, JSON body) of one request: `body` as JSON, or `raw` bytes of type `ctype`."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(base + path, data=data, method=method,
                                 headers={"Content-Type": ctype} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def form(fields, name, data, filename="f.bin"):
    """A multipart body of the text `fields` and the file field `name` holding `data`; (body,
    its Content-Type)."""
    b = "TURBINEBOUNDARY"
    out = b"".join(f'--{b}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
                   for k, v in fields.items())
    out += (f'--{b}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
            '\r\n'.encode() + data + f"\r\n--{b}--\r\n".encode())
    return out, f"multipart/form-data; boundary={b}"


def check(ok, what, fatal=True):
    """Prints the check's outcome; a failed one is noted in `failed`, and ends the step if
    `fatal`."""
    print(("ok   " if ok else "FAIL ") + what)
    if not ok:
        failed.append(what)
        if fatal:
            sys.exit(1)


def wait_end(bid, limit):
    """Batch `bid` once it has ended, or as it is after `limit` seconds."""
    t0 = time.time()
    while time.time() - t0 < limit:
        _, b = call("GET", f"/v1/batches/{bid}")
        if b.get("status") in ("completed", "failed", "cancelled", "expired"):
            return b
        time.sleep(0.2)
    return b
