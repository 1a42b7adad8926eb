#!/usr/bin/env bash
# A server at its limit on threads (a container's pids limit: `docker run --pids-limit`, the
# CIS benchmark's advice; a Kubernetes pod's pids limit; a unit's TasksMax=): the server runs in
# a pids cgroup, idles past the runtime's 10 s thread keep-alive (an idle blocking pool would
# have emptied by then), and then the group's limit is set to the threads it has, so that no
# new thread can start. Then: generations (base64 and url, fetched), an upload to the Files
# API, an edit, and a Batch API batch, several at once.
#
#   bash scripts/thread_limit_check.sh [BINARY]   (default target/debug/turbine; the tiny model)
#
# Needs root and a cgroup filesystem it may make a pids group in (v2, or v1's pids hierarchy);
# .ci/run runs it where the machine allows. Checks: every request is answered 200 (the batch
# completes), no thread of the server panicked, the server is alive afterwards, and the kernel
# did refuse it threads (else the check tested nothing).
# Exits non-zero, naming the check, if anything differs.
set -euo pipefail
BIN=$(realpath "${1:-target/debug/turbine}")
cd "$(dirname "${BASH_SOURCE[0]}")/.."
WORK=$(mktemp -d /tmp/turbine-thread-limit.XXXXXX)
PORT=${PORT:-18795}
PID=
CG=
cleanup() {
  set +e # every step, whatever the one before did
  [ -n "$PID" ] && kill -9 "$PID" 2>/dev/null && wait "$PID" 2>/dev/null
  [ -n "$CG" ] && rmdir "$CG" 2>/dev/null
  rm -rf "$WORK"
}
trap cleanup EXIT

[ "$(id -u)" = 0 ] || { echo "thread_limit_check.sh needs root (to make a pids cgroup)" >&2; exit 1; }
name=turbine-thread-check-$$
if [ -f /sys/fs/cgroup/cgroup.controllers ] && grep -qw pids /sys/fs/cgroup/cgroup.controllers; then
  grep -qw pids /sys/fs/cgroup/cgroup.subtree_control || echo +pids >/sys/fs/cgroup/cgroup.subtree_control
  CG=/sys/fs/cgroup/$name
elif [ -d /sys/fs/cgroup/pids ]; then
  CG=/sys/fs/cgroup/pids/$name
else
  echo "thread_limit_check.sh: this machine has no pids cgroup to make a group in" >&2
  exit 1
fi
mkdir "$CG"
# shellcheck disable=SC2016
WRAP=(sh -c 'echo $$ >"$0/cgroup.procs" && exec "$@"' "$CG")
EXTRA=()
# shellcheck source=lib/tiny_server.sh
source scripts/lib/tiny_server.sh
serve "$WORK/files" "$WORK/server.log"
echo "started; idle for 13 s (past the runtime's 10 s thread keep-alive)"
sleep 13
threads=$(cat "$CG/pids.current")
refused_before=$(awk '/^max /{print $2}' "$CG/pids.events" 2>/dev/null || echo 0)
echo "$threads" >"$CG/pids.max"
echo "the group's pids.max set to the $threads threads the server has"

python3 - "$PORT" <<'PY' || failed=1
import io, json, sys, threading, time, urllib.request

sys.path.insert(0, "scripts/lib")
from checks import call, check, form, use_port, wait_end

base = use_port(sys.argv[1])
statuses = []


def record(what, status):
    statuses.append((what, status))


def generate(i):
    fmt = "url" if i % 2 else "b64_json"
    try:
        status, v = call("POST", "/v1/images/generations",
                         {"prompt": f"p{i}", "n": 4, "response_format": fmt})
        if status == 200 and fmt == "url":
            for d in v["data"]:
                with urllib.request.urlopen(d["url"], timeout=60) as r:
                    record("url fetch", r.status)
    except Exception as e:  # the connection closed without an answer
        status = type(e).__name__
    record("generation", status)


def png():
    from struct import pack
    import zlib
    rows = b"".join(b"\0" + bytes([x * 3 % 256, 40, 200]) * 64 for x in range(64))
    chunk = lambda k, d: pack(">I", len(d)) + k + d + pack(">I", zlib.crc32(k + d))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", pack(">IIBBBBB", 64, 64, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def edit():
    raw, ctype = form({"prompt": "an edit", "strength": "0.5"}, "image", png(), "in.png")
    try:
        status, _ = call("POST", "/v1/images/edits", raw=raw, ctype=ctype)
    except Exception as e:
        status = type(e).__name__
    record("edit", status)


threads = [threading.Thread(target=generate, args=(i,)) for i in range(8)]
threads.append(threading.Thread(target=edit))
for t in threads:
    t.start()
lines = "\n".join(json.dumps({"custom_id": f"k{i}", "method": "POST", "url": "/v1/images/generations",
                              "body": {"prompt": f"jar {i}", "seed": i}}) for i in range(4))
raw, ctype = form({"purpose": "batch"}, "file", lines.encode(), "in.jsonl")
try:
    status, f = call("POST", "/v1/files", raw=raw, ctype=ctype)
except Exception as e:
    status, f = type(e).__name__, {}
record("upload", status)
if status == 200:
    status, b = call("POST", "/v1/batches", {"input_file_id": f["id"], "completion_window": "24h",
                                             "endpoint": "/v1/images/generations"})
    record("batch created", status)
    if status == 200:
        b = wait_end(b["id"], 120)
        record("batch completed", 200 if b["status"] == "completed"
               and b["request_counts"]["completed"] == 4 else f"{b['status']} {b['request_counts']}")
for t in threads:
    t.join()
by = {}
for what, status in statuses:
    by.setdefault(what, []).append(status)
for what, got in by.items():
    check(all(s == 200 for s in got), f"{what}: {len(got)} answered, "
          f"{json.dumps({str(s): got.count(s) for s in set(got)})}", fatal=False)
status, _ = call("GET", "/health")
check(status == 200, "the server is alive afterwards", fatal=False)
from checks import failed
sys.exit(1 if failed else 0)
PY
refused=$(( $(awk '/^max /{print $2}' "$CG/pids.events" 2>/dev/null || echo 0) - refused_before ))
if [ "$refused" -gt 0 ]; then
  echo "ok   the kernel refused the server $refused new threads meanwhile (pids.events)"
else
  echo "FAIL the kernel refused no thread: the check tested nothing"
  failed=1
fi
if grep -q "panicked" "$WORK/server.log"; then
  echo "FAIL a thread of the server panicked: $(grep -m1 -A1 panicked "$WORK/server.log" | tr '\n' ' ')"
  failed=1
else
  echo "ok   no thread of the server panicked"
fi
echo max >"$CG/pids.max"
if [ "${failed:-0}" != 0 ]; then
  echo "server log: $WORK/server.log (tail):"
  tail -20 "$WORK/server.log"
  echo "thread limit check: FAILED ($(basename "$BIN"))"
  exit 1
fi
echo "thread limit check: all passed ($(basename "$BIN"))"
