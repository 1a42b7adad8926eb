"""When a streamed generation's parts arrive: the response's head, each event line and each
keep-alive comment, in seconds from the request (for a proxy in front, say nginx, that may hold
them).

    python3 scripts/bench/sse_timing.py HOST PORT [QUALITY]
"""
import http.client
import json
import sys
import time

host, port = sys.argv[1], int(sys.argv[2])
quality = sys.argv[3] if len(sys.argv) > 3 else "low"
body = json.dumps({"prompt": "sse", "stream": True, "partial_images": 2, "quality": quality,
                   "n": 1, "size": "256x256"})
conn = http.client.HTTPConnection(host, port, timeout=600)
t0 = time.time()
conn.request("POST", "/v1/images/generations", body, {"content-type": "application/json"})
r = conn.getresponse()
shown = ("content-type", "cache-control", "x-accel-buffering")
print(f"{time.time() - t0:7.2f}s head {r.status}",
      {k.lower(): v for k, v in r.getheaders() if k.lower() in shown})
while True:
    line = r.readline()
    if not line:
        break
    if line.startswith(b"event:") or line.startswith(b":"):
        print(f"{time.time() - t0:7.2f}s {line.decode().strip() or ':'}")
print(f"{time.time() - t0:7.2f}s end")
