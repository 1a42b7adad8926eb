#!/usr/bin/env bash
# A real full disk under a running server: the files directory on a small tmpfs (needs root and
# Linux; .ci/run runs it where its machine allows the mount, and the in-process test
# `a_full_disk_pauses_a_batch_and_loses_no_result` stands a /dev/full in for the batch's output
# file everywhere).
#
#   bash scripts/full_disk_check.sh [BINARY]     (default target/debug/turbine; the tiny model)
#
# 1. Results: a batch of 30 256x256 images (about 260 kB of base64 each) on a 4 MiB disk with
#    3 MiB taken. The disk fills after a few results; the batch must pause there (counting only
#    what is written), a 600 kB upload must get 507 `insufficient_storage`, a direct request must
#    still be served; once the disk is grown, the batch must end `completed` with 30 whole lines,
#    each custom_id once.
# 2. Finalizing: a batch of 10 on a disk filled to its last page as it starts, then given exactly
#    the pages its results need: every result gets written, but not the output file's record.
#    The batch must wait in `finalizing` with its results kept, and end `completed` with all 10
#    once there is room.
# Exits non-zero, naming the step, if anything differs. Prints what it saw.
set -euo pipefail
BIN=$(realpath "${1:-target/debug/turbine}")
cd "$(dirname "${BASH_SOURCE[0]}")/.."
MNT=$(mktemp -d /tmp/turbine-full-disk.XXXXXX)
PORT=${PORT:-18791}
PID=
cleanup() {
  set +e # every step, whatever the one before did
  [ -n "$PID" ] && kill "$PID" 2>/dev/null && wait "$PID" 2>/dev/null
  mountpoint -q "$MNT" && umount "$MNT"
  rmdir "$MNT"
}
trap cleanup EXIT

# shellcheck source=lib/tiny_server.sh
source scripts/lib/tiny_server.sh
stop() {
  kill "$PID" && wait "$PID" 2>/dev/null || true
  PID=
  umount "$MNT"
}

step() {
  python3 - "$@" <<'PY'
import json, os, subprocess, sys, time, urllib.request

sys.path.insert(0, "scripts/lib")
from checks import call, check, form, use_port, wait_end

step, mnt, port = sys.argv[1], sys.argv[2], sys.argv[3]
base = use_port(port)


def start_batch(n, size):
    lines = "\n".join(json.dumps({"custom_id": f"k{i}", "method": "POST",
                                  "url": "/v1/images/generations",
                                  "body": {"prompt": f"jar {i}", "size": size, "seed": 100 + i}})
                      for i in range(n))
    raw, ctype = form({"purpose": "batch"}, "file", lines.encode(), "in.jsonl")
    status, f = call("POST", "/v1/files", raw=raw, ctype=ctype)
    check(status == 200, f"the batch's input uploaded ({status})")
    status, b = call("POST", "/v1/batches", {"input_file_id": f["id"], "completion_window": "24h",
                                             "endpoint": "/v1/images/generations"})
    check(status == 200, f"the batch created ({status})")
    return b["id"]


def output_ids(b):
    raw = urllib.request.urlopen(f"{base}/v1/files/{b['output_file_id']}/content").read()
    ids, torn = [], 0
    for line in raw.split(b"\n"):
        if line:
            try:
                ids.append(json.loads(line)["custom_id"])
            except ValueError:
                torn += 1
    return ids, torn


def write_errors():
    m = urllib.request.urlopen(f"{base}/metrics").read().decode()
    return float(next((l.split()[-1] for l in m.splitlines()
                       if l.startswith("turbine_batch_api_write_errors_total")), 0))


if step == "results":
    bid = start_batch(30, "256x256")
    t0 = time.time()
    while write_errors() < 2 and time.time() - t0 < 30:
        # A batch is `validating` until its run starts, a moment after it is created.
        if call("GET", f"/v1/batches/{bid}")[1]["status"] not in ("validating", "in_progress"):
            break
        time.sleep(0.5)
    _, b = call("GET", f"/v1/batches/{bid}")
    out = f"{mnt}/files/batches/{bid}.output.jsonl"
    text = open(out, "rb").read() if os.path.exists(out) else b""
    done = b["request_counts"]["completed"]
    print(f"     disk full: {b['status']}, {done} of 30 counted, {len(text)} bytes written, "
          f"{os.statvfs(mnt).f_bavail} blocks free")
    check(b["status"] == "in_progress" and 0 < done < 30, "the batch paused part-way")
    check(text.endswith(b"\n") and text.count(b"\n") == done,
          "its output holds exactly the results it counted, each whole")
    raw, ctype = form({"purpose": "user_data"}, "file", os.urandom(600_000), "big.bin")
    status, e = call("POST", "/v1/files", raw=raw, ctype=ctype)
    check(status == 507 and e["error"]["code"] == "insufficient_storage",
          f"an upload on the full disk: {status} {e.get('error', {}).get('code')}")
    status, _ = call("POST", "/v1/images/generations", {"prompt": "meanwhile", "size": "64x64"})
    check(status == 200, "a direct request is served meanwhile")
    subprocess.run(["mount", "-o", "remount,size=24m", mnt], check=True)
    os.remove(f"{mnt}/filler")
    b = wait_end(bid, 120)
    ids, torn = output_ids(b)
    check(b["status"] == "completed" and b["request_counts"]["completed"] == 30,
          f"room made: the batch ended {b['status']}, {b['request_counts']}")
    check(sorted(ids) == sorted(f"k{i}" for i in range(30)) and torn == 0,
          f"its output: {len(ids)} whole lines, {len(set(ids))} custom_ids, {torn} torn")
else:
    # The size of the 10 results, from the same batch on a roomy disk first.
    bid = start_batch(10, "128x128")
    b = wait_end(bid, 120)
    check(b["status"] == "completed", "the measuring batch completed")
    need = len(urllib.request.urlopen(f"{base}/v1/files/{b['output_file_id']}/content").read())
    bid = start_batch(10, "128x128")
    subprocess.run(f"dd if=/dev/zero of={mnt}/filler bs=4k status=none 2>/dev/null || true",
                   shell=True, check=True)
    time.sleep(3)
    out = f"{mnt}/files/batches/{bid}.output.jsonl"
    have = os.path.getsize(out) if os.path.exists(out) else 0
    pages = (need + 4095) // 4096 - (have + 4095) // 4096
    os.truncate(f"{mnt}/filler", os.path.getsize(f"{mnt}/filler") - pages * 4096)
    t0 = time.time()
    while time.time() - t0 < 60:
        _, b = call("GET", f"/v1/batches/{bid}")
        if b["status"] != "in_progress":
            break
        time.sleep(0.5)
    time.sleep(3)
    _, b = call("GET", f"/v1/batches/{bid}")
    print(f"     room for the results alone: {b['status']}, {b['request_counts']}")
    check(b["status"] == "finalizing" and b["request_counts"]["completed"] == 10,
          "the batch waits in finalizing with every result counted")
    check(os.path.getsize(out) == need, "its results stay where they were, whole")
    os.remove(f"{mnt}/filler")
    b = wait_end(bid, 60)
    ids, torn = output_ids(b)
    check(b["status"] == "completed" and sorted(ids) == sorted(f"k{i}" for i in range(10))
          and torn == 0, f"room made: {b['status']}, {len(ids)} lines, {torn} torn")
PY
}

echo "== 1. a full disk while results are written"
mount -t tmpfs -o size=4m tmpfs "$MNT"
dd if=/dev/urandom of="$MNT/filler" bs=1M count=3 status=none
serve "$MNT/files" "$MNT.log"
step results "$MNT" "$PORT"
stop

echo "== 2. a full disk as the results files are made"
mount -t tmpfs -o size=16m tmpfs "$MNT"
serve "$MNT/files" "$MNT.log"
step finalize "$MNT" "$PORT"
stop
echo "full disk check: all passed ($(basename "$BIN"), log in $MNT.log)"
