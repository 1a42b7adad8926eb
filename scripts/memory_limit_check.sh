#!/usr/bin/env bash
# A burst of large edits against a server with a memory limit (a container's, or a systemd
# unit's MemoryMax=): the server runs in a memory cgroup of 1 GiB (no swap) and is sent 40
# image edits at once, each a 25 MB PNG, while a client keeps generating small images.
#
#   bash scripts/memory_limit_check.sh [BINARY]   (default target/debug/turbine; the tiny model)
#
# Needs root and a cgroup filesystem it may make a memory group in (v2, or v1's memory
# hierarchy); .ci/run runs it where the machine allows. Two runs:
# - the control, with --max-buffered-input-bytes set past the limit (as before the option
#   existed): the bodies alone outgrow the limit and the kernel kills the server, and every
#   request it was serving is lost with it (reported; a machine where it survives, such as one
#   that lets the group swap, makes the check show less, and says so);
# - the server as it starts by default: `auto` finds the group's limit and takes a quarter of
#   it for request bodies. Checks: the log says so; every edit and every generation is answered
#   200; the server is alive afterwards, its peak memory under the limit, and every share of
#   the budget given back.
# Exits non-zero, naming the check, if anything differs.
set -euo pipefail
BIN=$(realpath "${1:-target/debug/turbine}")
cd "$(dirname "${BASH_SOURCE[0]}")/.."
WORK=$(mktemp -d /tmp/turbine-memory-limit.XXXXXX)
PORT=${PORT:-18794}
LIMIT=$((1 << 30))
EDITS=${EDITS:-40}
SIDE=${SIDE:-2900}
PID=
CG=
cleanup() {
  set +e # every step, whatever the one before did
  [ -n "$PID" ] && kill -9 "$PID" 2>/dev/null && wait "$PID" 2>/dev/null
  [ -n "$CG" ] && rmdir "$CG" 2>/dev/null
  rm -rf "$WORK"
}
trap cleanup EXIT

# A memory group of LIMIT bytes without swap; sets CG, PEAK (its peak usage file) and
# OOM_KILLS (a command printing how many of its processes the kernel killed).
make_group() {
  local name=turbine-memory-check-$$-$1
  if [ -f /sys/fs/cgroup/cgroup.controllers ] && grep -qw memory /sys/fs/cgroup/cgroup.controllers; then
    grep -qw memory /sys/fs/cgroup/cgroup.subtree_control \
      || echo +memory >/sys/fs/cgroup/cgroup.subtree_control
    CG=/sys/fs/cgroup/$name
    mkdir "$CG"
    echo "$LIMIT" >"$CG/memory.max"
    [ ! -f "$CG/memory.swap.max" ] || echo 0 >"$CG/memory.swap.max"
    PEAK=$CG/memory.peak
    OOM_KILLS="awk '/^oom_kill /{print \$2}' $CG/memory.events"
  elif [ -d /sys/fs/cgroup/memory ]; then
    CG=/sys/fs/cgroup/memory/$name
    mkdir "$CG"
    echo "$LIMIT" >"$CG/memory.limit_in_bytes"
    [ ! -f "$CG/memory.memsw.limit_in_bytes" ] || echo "$LIMIT" >"$CG/memory.memsw.limit_in_bytes" || true
    PEAK=$CG/memory.max_usage_in_bytes
    OOM_KILLS="awk '/^oom_kill /{print \$2}' $CG/memory.oom_control"
  else
    return 1
  fi
  # The server is the group's from its first instruction: sh joins it, then becomes the server.
  # shellcheck disable=SC2016
  WRAP=(sh -c 'echo $$ >"$0/cgroup.procs" && exec "$@"' "$CG")
}

drop_group() {
  if [ -n "$PID" ]; then
    kill -9 "$PID" 2>/dev/null || true
    wait "$PID" 2>/dev/null || true
  fi
  PID=
  rmdir "$CG"
  CG=
}

[ "$(id -u)" = 0 ] || { echo "memory_limit_check.sh needs root (to make a memory cgroup)" >&2; exit 1; }
EXTRA=()
# shellcheck source=lib/tiny_server.sh
source scripts/lib/tiny_server.sh

burst() {
  python3 - "$@" <<'PY'
import os, struct, sys, threading, time, zlib

sys.path.insert(0, "scripts/lib")
from checks import call, check, form, use_port

mode, port, pid, edits, side = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
use_port(port)


def png(side):
    """An RGB PNG of noise: it compresses to about its raw size, so its file is large."""
    rows = b"".join(b"\0" + os.urandom(side * 3) for _ in range(side))
    chunk = lambda kind, data: (struct.pack(">I", len(data)) + kind + data
                                + struct.pack(">I", zlib.crc32(kind + data)))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows, 1)) + chunk(b"IEND", b""))


body, ctype = form({"prompt": "a product photo", "size": "64x64"}, "image", png(side), "photo.png")
print(f"{edits} edits of {len(body) / 1e6:.1f} MB each at once, and generations meanwhile")
edit_status, gen_status, gen_s = [], [], []
done = threading.Event()


def edit():
    try:
        status, _ = call("POST", "/v1/images/edits", raw=body, ctype=ctype)
    except Exception as e:  # the server was killed under it
        status = type(e).__name__
    edit_status.append(status)


def generate():
    while not done.is_set():
        t = time.time()
        try:
            status, _ = call("POST", "/v1/images/generations", {"prompt": "steady", "size": "64x64"})
        except Exception as e:
            status = type(e).__name__
        gen_status.append(status)
        gen_s.append(time.time() - t)
        if status != 200 and mode == "control":
            return
        time.sleep(0.05)


gen = threading.Thread(target=generate)
gen.start()
t0 = time.time()
threads = [threading.Thread(target=edit) for _ in range(edits)]
for t in threads:
    t.start()
for t in threads:
    t.join()
done.set()
gen.join()
hwm = next((int(l.split()[1]) >> 10 for l in open(f"/proc/{pid}/status") if l.startswith("VmHWM")), None) \
    if os.path.exists(f"/proc/{pid}") else None
count = lambda xs: {str(k): xs.count(k) for k in sorted(set(map(str, xs)))}
print(f"after {time.time() - t0:.1f} s: edits {count([str(s) for s in edit_status])}, "
      f"generations {count([str(s) for s in gen_status])} (slowest {max(gen_s):.2f} s), "
      f"server peak RSS "
      f"{'gone' if hwm is None else f'{hwm} MiB'}")
if mode == "control":
    sys.exit(0)
check(edit_status.count(200) == edits, f"every one of the {edits} edits answered 200")
check(len(gen_status) > 0 and all(s == 200 for s in gen_status),
      f"every generation meanwhile answered 200 ({len(gen_status)})")
status, _ = call("GET", "/health")
check(status == 200, "the server is alive afterwards")
metrics = ""
import urllib.request
with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as r:
    metrics = r.read().decode()
held = next(l.split()[1] for l in metrics.splitlines() if l.startswith("turbine_buffered_input_bytes "))
waits = next(l.split()[1] for l in metrics.splitlines()
             if l.startswith("turbine_buffered_input_waits_total "))
check(held == "0", f"every share of the budget given back (turbine_buffered_input_bytes {held})")
print(f"turbine_buffered_input_waits_total {waits}")
PY
}

if ! make_group control 2>/dev/null; then
  echo "memory_limit_check.sh: this machine lets no memory cgroup be made here" >&2
  exit 1
fi
failed=0
echo "== control: bodies unbounded (--max-buffered-input-bytes past the group's 1 GiB)"
EXTRA=(--max-buffered-input-bytes $((64 << 30)))
serve "$WORK/files-control" "$WORK/control.log"
burst control "$PORT" "$PID" "$EDITS" "$SIDE"
kills=$(eval "$OOM_KILLS")
if kill -0 "$PID" 2>/dev/null; then
  echo "note: the control survived (peak $(($(cat "$PEAK") >> 20)) MiB); this machine shows less"
else
  echo "control: the kernel killed the server (oom_kill $kills), and the requests it served with it"
fi
drop_group

echo "== the server as it starts by default (--max-buffered-input-bytes auto)"
make_group auto
EXTRA=()
serve "$WORK/files" "$WORK/server.log"
grep -q "a quarter of the 1024 MiB" "$WORK/server.log" \
  && echo "ok   auto found the group's limit: $(grep -o 'holding at most [0-9]* MiB' "$WORK/server.log")" \
  || { echo "FAIL auto did not find the group's 1 GiB limit: $(grep -i 'request bodies' "$WORK/server.log")"; failed=1; }
burst auto "$PORT" "$PID" "$EDITS" "$SIDE" || failed=1
peak=$(($(cat "$PEAK") >> 20))
kills=$(eval "$OOM_KILLS")
if kill -0 "$PID" 2>/dev/null && [ "${kills:-0}" = 0 ]; then
  echo "ok   alive, not killed; the group's peak usage ${peak} MiB of 1024"
else
  echo "FAIL the server was killed (oom_kill ${kills:-?}); peak ${peak} MiB"
  failed=1
fi
drop_group

if [ "$failed" != 0 ]; then
  echo "server log: $WORK/server.log (tail):"
  tail -20 "$WORK/server.log"
  echo "memory limit check: FAILED ($(basename "$BIN"))"
  exit 1
fi
echo "memory limit check: all passed ($(basename "$BIN"))"
