#!/usr/bin/env bash
# A slow disk under a running server: every fsync takes a second, as on a network volume whose
# burst credits ran out (EBS, a busy NFS server). What writes to the disk gets slower; nothing
# else may: not /health (a load balancer's health check with a short timeout takes a stall for a
# dead server), not image generations, not the reads that SDKs poll batches with. The server
# runs under strace, which holds every fsync and fdatasync 1 s before it happens (needs strace
# and ptrace; .ci/run runs it where its machine allows).
#
#   bash scripts/slow_disk_check.sh [BINARY]     (default target/debug/turbine; the tiny model)
#
# For 25 s: batches created one after another (an upload and a batch each), every other one
# cancelled as it runs; webhook endpoints created, changed and deleted, and a receiver told of
# each batch that ends; meanwhile /health every 100 ms, four pollers reading the newest batch
# (as `client.batches.retrieve` in a loop), lists of batches, files and endpoints, and image
# generations. Checks:
# - every read and every /health answers within 500 ms (half an fsync: before the fix, a batch's
#   change of status held the batches' lock through its two fsyncs, and every reader, then
#   every worker thread of the async runtime, waited behind it: /health took 2-5 s);
# - every batch ends (completed or cancelled) with its lines all counted, and after a restart
#   each is read back as the server last reported it (the record on the disk is the last
#   change, though the writes no longer hold the lock).
# Exits non-zero, naming the check, if anything differs. Prints what it saw.
set -euo pipefail
command -v strace >/dev/null || { echo "slow_disk_check.sh needs strace (apt-get install strace)" >&2; exit 1; }
BIN=$(realpath "${1:-target/debug/turbine}")
cd "$(dirname "${BASH_SOURCE[0]}")/.."
WORK=$(mktemp -d /tmp/turbine-slow-disk.XXXXXX)
PORT=${PORT:-18793}
FSYNC_US=${FSYNC_US:-1000000}
PID=
cleanup() {
  set +e # every step, whatever the one before did
  [ -n "$PID" ] && pkill -9 -P "$PID" # a server under strace
  [ -n "$PID" ] && kill -9 "$PID" 2>/dev/null && wait "$PID" 2>/dev/null
  rm -rf "$WORK"
}
trap cleanup EXIT

WRAP=()
# shellcheck source=lib/tiny_server.sh
source scripts/lib/tiny_server.sh

step() {
  python3 - "$@" <<'PY'
import functools, http.server, json, sys, threading, time, urllib.request

sys.path.insert(0, "scripts/lib")
import checks
from checks import call, failed, form, use_port, wait_end

step, port, state = sys.argv[1], sys.argv[2], sys.argv[3]
base = use_port(port)
# Every check is made (a failure does not stop the others), then the step fails if any did.
check = functools.partial(checks.check, fatal=False)
BOUND_S = 0.5


if step == "load":
    heard = []

    class Receiver(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            heard.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    receiver = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    hook_url = f"http://127.0.0.1:{receiver.server_address[1]}/hook"
    status, hook = call("POST", "/v1/webhook_endpoints",
                        {"name": "receiver", "url": hook_url,
                         "event_types": ["batch.completed", "batch.cancelled"]})
    check(status == 200, f"a webhook endpoint created ({status})")

    stop = time.time() + 25
    slow = {}  # what -> [latencies]
    errors = []
    bids = []

    def timed(what, fn):
        t = time.time()
        status = fn()
        slow.setdefault(what, []).append(time.time() - t)
        if status != 200:
            errors.append(f"{what}: {status}")

    def every(what, period, fn):
        def loop():
            while time.time() < stop:
                timed(what, fn)
                time.sleep(period)
        return loop

    def make_batches():
        i = 0
        while time.time() < stop - 5:
            lines = "\n".join(json.dumps({"custom_id": f"b{i}-{j}", "method": "POST",
                                          "url": "/v1/images/generations",
                                          "body": {"prompt": f"jar {j}", "size": "64x64"}})
                              for j in range(3))
            raw, ctype = form({"purpose": "batch"}, "file", lines.encode(), "in.jsonl")
            status, f = call("POST", "/v1/files", raw=raw, ctype=ctype)
            if status != 200:
                errors.append(f"upload: {status}")
                continue
            status, b = call("POST", "/v1/batches", {"input_file_id": f["id"],
                                                     "completion_window": "24h",
                                                     "endpoint": "/v1/images/generations"})
            if status != 200:
                errors.append(f"batch: {status}")
                continue
            bids.append(b["id"])
            if i % 2:
                status, _ = call("POST", f"/v1/batches/{b['id']}/cancel")
                if status != 200:
                    errors.append(f"cancel: {status}")
            i += 1

    def churn_endpoints():
        while time.time() < stop - 5:
            status, e = call("POST", "/v1/webhook_endpoints",
                             {"name": "churn", "url": hook_url, "event_types": ["batch.failed"]})
            if status != 200:
                errors.append(f"endpoint create: {status}")
                continue
            call("POST", f"/v1/webhook_endpoints/{e['id']}", {"name": "renamed"})
            call("DELETE", f"/v1/webhook_endpoints/{e['id']}")

    def health():
        with urllib.request.urlopen(base + "/health", timeout=120) as r:
            return r.status

    def newest():
        return call("GET", f"/v1/batches/{bids[-1]}")[0] if bids else 200

    threads = [make_batches, churn_endpoints,
               every("/health", 0.1, health),
               every("GET /v1/batches", 0.3, lambda: call("GET", "/v1/batches")[0]),
               every("GET /v1/files", 0.3, lambda: call("GET", "/v1/files")[0]),
               every("GET /v1/webhook_endpoints", 0.3,
                     lambda: call("GET", "/v1/webhook_endpoints")[0]),
               every("POST /v1/images/generations", 0.1,
                     lambda: call("POST", "/v1/images/generations",
                                  {"prompt": "a jar", "size": "64x64"})[0])]
    threads += [every("GET /v1/batches/{id}", 0.1, newest)] * 4
    threads = [threading.Thread(target=t) for t in threads]
    [t.start() for t in threads]
    [t.join() for t in threads]
    print(f"     {len(bids)} batches made; fsyncs held {sys.argv[4]} us each")
    for what, lat in sorted(slow.items()):
        lat.sort()
        print(f"     {what:30} n={len(lat):4}  median {lat[len(lat) // 2] * 1000:7.1f} ms  "
              f"max {lat[-1] * 1000:7.1f} ms")
    check(not errors, f"every request answered 200 ({errors[:5]})")
    check(len(bids) >= 3, f"batches were made under the load ({len(bids)})")
    for what, lat in sorted(slow.items()):
        if what != "POST /v1/images/generations":  # the CPU model's own time varies
            check(max(lat) < BOUND_S, f"{what} always answered within {BOUND_S * 1000:.0f} ms "
                  f"(max {max(lat) * 1000:.0f} ms)")
    ended = {}
    for bid in bids:
        b = wait_end(bid, 120)
        counts = b["request_counts"]
        ended[bid] = (b["status"], counts)
        done = counts["completed"] + counts["failed"]
        check(counts["total"] == 3 and (b["status"] == "completed" and done == 3
                                        or b["status"] == "cancelled" and done <= 3),
              f"{bid} ended {b['status']} {counts}")
    t0 = time.time()
    told = {e["data"]["id"] for e in heard}
    while time.time() - t0 < 30 and told != set(bids):
        time.sleep(0.2)
        told = {e["data"]["id"] for e in heard}
    check(told == set(bids), f"the receiver heard of every batch's end ({len(told)} of {len(bids)})")
    json.dump(ended, open(state, "w"))
else:
    ended = json.load(open(state))
    for bid, (status, counts) in ended.items():
        s, b = call("GET", f"/v1/batches/{bid}")
        check(s == 200 and b["status"] == status and b["request_counts"] == counts,
              f"after a restart {bid} is {b.get('status')} {b.get('request_counts')} "
              f"(was {status} {counts})")
if failed:
    sys.exit(f"{len(failed)} checks failed")
PY
}

echo "== fsync and fdatasync held ${FSYNC_US} us each"
WRAP=(strace -f -qq -o /dev/null --seccomp-bpf -e trace=fsync,fdatasync
  -e "inject=fsync,fdatasync:delay_enter=$FSYNC_US")
serve "$WORK/files" "$WORK/server.log"
failed=0
step load "$PORT" "$WORK/state.json" "$FSYNC_US" || failed=1
kill "$(pgrep -P "$PID")" # the server, strace's child: a graceful stop
wait "$PID" 2>/dev/null || true
PID=
echo "== restarted on the same files directory (no strace)"
WRAP=()
serve "$WORK/files" "$WORK/server.log"
step after "$PORT" "$WORK/state.json" || failed=1
kill "$PID"
wait "$PID" 2>/dev/null || true
PID=
if [ "$failed" != 0 ]; then
  echo "slow disk check: FAILED ($(basename "$BIN"))"
  exit 1
fi
echo "slow disk check: all passed ($(basename "$BIN"))"
