#!/usr/bin/env python3
"""How refused requests use connections: N generation requests with a wrong key, one after the
other, from one client that keeps its connection whenever the server lets it (as the SDKs' and
gateways' pools do). Prints the rate and how many connections (TLS handshakes, over HTTPS) the
N requests took.

    scripts/bench/refused_keepalive.py https://localhost:8000 2000 --cafile cert.pem
"""

import argparse
import http.client
import json
import ssl
import time
import urllib.parse


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("base", help="the server, e.g. https://localhost:8000")
    ap.add_argument("n", type=int, help="requests to send")
    ap.add_argument("--cafile", help="CA (or self-signed certificate) for HTTPS")
    args = ap.parse_args()
    url = urllib.parse.urlsplit(args.base)
    if url.scheme == "https":
        ctx = ssl.create_default_context(cafile=args.cafile)
        ctx.check_hostname = False
        conn = http.client.HTTPSConnection(url.hostname, url.port, context=ctx)
    else:
        conn = http.client.HTTPConnection(url.hostname, url.port)
    body = json.dumps({"prompt": "a red fox", "size": "512x512"})
    headers = {"Authorization": "Bearer wrong", "Content-Type": "application/json"}
    sockets, statuses = [], {}
    start = time.perf_counter()
    for _ in range(args.n):
        conn.request("POST", "/v1/images/generations", body=body, headers=headers)
        # The socket objects are kept, so a new connection is never mistaken for the last.
        if not sockets or conn.sock is not sockets[-1]:
            sockets.append(conn.sock)
        r = conn.getresponse()
        r.read()
        statuses[r.status] = statuses.get(r.status, 0) + 1
    secs = time.perf_counter() - start
    print(
        f"{args.n} requests in {secs:.2f} s = {args.n / secs:.0f}/s, "
        f"{len(sockets)} connections, statuses {statuses}"
    )


if __name__ == "__main__":
    main()
