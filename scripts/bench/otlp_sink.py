"""A collector stand-in for benchmarks: answers every OTLP/HTTP export `POST /v1/traces` with 200
and counts the exports and their bytes, which it prints when stopped (SIGTERM or Ctrl-C).

    python3 scripts/bench/otlp_sink.py PORT
"""
import signal
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

exports = 0
received = 0


class Sink(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        global exports, received
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        exports += 1
        received += len(body)
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def stop(*_):
    print(f"otlp sink: {exports} exports, {received} bytes", file=sys.stderr)
    sys.exit(0)


signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGINT, stop)
ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Sink).serve_forever()
