#!/usr/bin/env bash
# A power cut under a running server: what it answered 200 for must be there after it. The files
# directory is on a real ext4 filesystem (a loop device; needs root and Linux), and the cut is
# the filesystem shut down without writing its journal (EXT4_IOC_SHUTDOWN with NOLOGFLUSH,
# the "godown" that xfstests uses to test crash consistency): what had not reached the disk is
# lost, as in a kernel panic or a power cut; then the server is killed (SIGKILL), the
# filesystem mounted again (its journal replayed) and the server started on it. .ci/run runs it
# where its machine allows the mount (root, a loop device).
#
#   bash scripts/crash_check.sh [BINARY]     (default target/debug/turbine; the tiny model)
#   CRASH_CHECK_FS=xfs bash scripts/crash_check.sh [BINARY]     (the same on XFS: xfsprogs)
#
# The filesystem is mounted with `commit=60`: its journal is written every 60 s instead of 5, so
# what the server did not make durable itself is lost every time, not only when the cut falls
# in the last 5 s (what a real crash loses: the same, in a shorter window).
#
# Before the cut, all within a few seconds: a file uploaded (Files API), a file sent in parts
# (Uploads API), a webhook endpoint created, a batch that completed (its webhook delivery to a
# receiver that does not answer still pending), a batch just created, a file deleted. After
# it, each must be as the server said: the files there with their bytes, the deleted one gone,
# the completed batch completed with all its results and its delivery still pending, the new
# batch there (and then completing), the endpoint there.
#
# Then a process crash at the worst moment of a batch's end: the server runs under strace, which
# holds every rename 2 s before it happens, and is killed (SIGKILL) while the batch's results are
# in the Files API's directory without their record yet. After a restart the batch must end
# `completed` with all 3 results (it used to end `completed` with no output file: the results
# had been moved there, and the start removed them as an upload cut off). Needs strace.
# Exits non-zero, naming the check, if anything differs. Prints what it saw.
set -euo pipefail
command -v strace >/dev/null || { echo "crash_check.sh needs strace (apt-get install strace)" >&2; exit 1; }
BIN=$(realpath "${1:-target/debug/turbine}")
cd "$(dirname "${BASH_SOURCE[0]}")/.."
WORK=$(mktemp -d /tmp/turbine-crash.XXXXXX)
MNT="$WORK/mnt"
IMG="$WORK/disk.img"
PORT=${PORT:-18792}
PID=
mkdir "$MNT"
cleanup() {
  set +e # every step, whatever the one before did
  [ -n "$PID" ] && pkill -9 -P "$PID" # a server under strace
  [ -n "$PID" ] && kill -9 "$PID" 2>/dev/null && wait "$PID" 2>/dev/null
  mountpoint -q "$MNT" && umount "$MNT"
  rm -rf "$WORK"
}
trap cleanup EXIT

# CRASH_CHECK_FS=xfs: the same on XFS (xfsprogs), whose shutdown ioctl is the same call; it has
# no journal interval to lengthen, so there the cut falls within its 30 s log flush instead.
FS=${CRASH_CHECK_FS:-ext4}
case "$FS" in
  ext4) MOUNT_OPTS=loop,commit=60 ;;
  xfs) MOUNT_OPTS=loop ;;
  *) echo "CRASH_CHECK_FS: ext4 or xfs, not $FS" >&2; exit 2 ;;
esac
truncate -s 512M "$IMG"
"mkfs.$FS" -q "$IMG"
mount -o "$MOUNT_OPTS" "$IMG" "$MNT"

# WRAP: a command the server runs under (strace, in part 2).
WRAP=()
# shellcheck source=lib/tiny_server.sh
source scripts/lib/tiny_server.sh

step() {
  python3 - "$@" <<'PY'
import fcntl, hashlib, json, os, struct, sys, time, urllib.error, urllib.request

sys.path.insert(0, "scripts/lib")
from checks import call, check, failed, form, use_port, wait_end

step, mnt, port, state = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
base = use_port(port)


def content(fid):
    try:
        return urllib.request.urlopen(f"{base}/v1/files/{fid}/content").read()
    except urllib.error.HTTPError as e:
        return None


def upload(purpose, data):
    raw, ctype = form({"purpose": purpose}, "file", data)
    status, f = call("POST", "/v1/files", raw=raw, ctype=ctype)
    check(status == 200, f"a {len(data)}-byte file uploaded ({status})")
    return f["id"]


def batch(n, tag):
    lines = "\n".join(json.dumps({"custom_id": f"{tag}{i}", "method": "POST",
                                  "url": "/v1/images/generations",
                                  "body": {"prompt": f"jar {i}", "size": "64x64", "seed": i}})
                      for i in range(n))
    fid = upload("batch", lines.encode())
    status, b = call("POST", "/v1/batches", {"input_file_id": fid, "completion_window": "24h",
                                             "endpoint": "/v1/images/generations"})
    check(status == 200, f"batch {b.get('id')} created ({status})")
    return b["id"]


def metric(name):
    m = urllib.request.urlopen(f"{base}/metrics").read().decode()
    return float(next((l.split()[-1] for l in m.splitlines() if l.startswith(name + " ")), 0))


def custom_ids(raw):
    return sorted(json.loads(l)["custom_id"] for l in raw.split(b"\n") if l.strip())


if step == "finalize":
    # Killed as the batch's results become a file of the Files API: every rename the server
    # makes is held 2 s before it happens (strace), and the kill comes while a results file in
    # files/ has no record yet (the record's own rename is the one held).
    bid = batch(3, "r")
    files = os.path.join(mnt, "files", "files")
    known = set(os.listdir(files))
    t0 = time.time()
    while time.time() - t0 < 120:
        names = set(os.listdir(files))
        fresh = [n for n in names - known if "." not in n and n + ".json" not in names]
        if fresh:
            break
        time.sleep(0.02)
    check(bool(fresh), "a results file without its record yet: the moment of the kill")
    json.dump({"batch": bid}, open(state, "w"))
elif step == "finalized":
    bid = json.load(open(state))["batch"]
    b = wait_end(bid, 60)
    raw = content(b["output_file_id"]) if b.get("output_file_id") else None
    check(b["status"] == "completed" and raw is not None
          and custom_ids(raw) == ["r0", "r1", "r2"],
          f"after a restart the batch ends {b['status']} with its 3 results "
          f"({b['request_counts']}, output {b.get('output_file_id')})")
elif step == "before":
    # What is older than the cut by far: made durable by the filesystem itself (sync).
    gone = upload("user_data", os.urandom(50_000))
    os.sync()
    t0 = time.time()
    status, hook = call("POST", "/v1/webhook_endpoints",
                        {"name": "crash", "url": "http://127.0.0.1:9/hook",
                         "event_types": ["batch.completed"]})
    check(status == 200, f"a webhook endpoint created ({status})")
    data = os.urandom(300_000)
    plain = upload("user_data", data)
    status, up = call("POST", "/v1/uploads", {"bytes": len(data), "filename": "parts.bin",
                                              "mime_type": "application/octet-stream",
                                              "purpose": "user_data"})
    check(status == 200, f"an upload started ({status})")
    parts = []
    for chunk in (data[:200_000], data[200_000:]):
        raw, ctype = form({}, "data", chunk)
        status, p = call("POST", f"/v1/uploads/{up['id']}/parts", raw=raw, ctype=ctype)
        check(status == 200, f"a {len(chunk)}-byte part added ({status})")
        parts.append(p["id"])
    status, up = call("POST", f"/v1/uploads/{up['id']}/complete", {"part_ids": parts})
    check(status == 200 and up["status"] == "completed", f"the upload completed ({status})")
    done = batch(3, "d")
    b = wait_end(done, 60)
    check(b["status"] == "completed", f"batch {done} completed")
    t1 = time.time()
    while metric("turbine_webhook_deliveries_pending") < 1 and time.time() - t1 < 10:
        time.sleep(0.1)
    check(metric("turbine_webhook_deliveries_pending") == 1,
          "its webhook delivery is pending (the receiver does not answer)")
    fresh = batch(4, "f")
    status, _ = call("DELETE", f"/v1/files/{gone}")
    check(status == 200, "a file deleted")
    json.dump({"gone": gone, "hook": hook["id"], "plain": plain, "parts": up["file"]["id"],
               "digest": hashlib.sha256(data).hexdigest(), "done": done,
               "output": b["output_file_id"], "fresh": fresh}, open(state, "w"))
    # The cut: nothing more reaches the disk, as when the machine stops.
    fd = os.open(mnt, os.O_RDONLY)
    fcntl.ioctl(fd, 0x8004587D, struct.pack("I", 2))  # EXT4_IOC_SHUTDOWN, NOLOGFLUSH
    os.close(fd)
    print(f"     the power cut {time.time() - t0:.1f} s after the first of these answers")
else:
    # Every check is made (a failure does not stop the others), then the step fails if any did.
    s = json.load(open(state))
    for key, what in (("plain", "the uploaded file"), ("parts", "the file sent in parts")):
        raw = content(s[key])
        check(raw is not None and hashlib.sha256(raw).hexdigest() == s["digest"],
              f"{what} is there with its bytes ({'missing' if raw is None else len(raw)})", False)
    check(call("GET", f"/v1/files/{s['gone']}")[0] == 404, "the deleted file stays deleted", False)
    check(call("GET", f"/v1/webhook_endpoints/{s['hook']}")[0] == 200,
          "the webhook endpoint is there", False)
    status, b = call("GET", f"/v1/batches/{s['done']}")
    check(status == 200 and b["status"] == "completed", f"the completed batch: {status} "
          f"{b.get('status', b.get('error'))}", False)
    raw = content(b["output_file_id"]) if b.get("output_file_id") else None
    check(raw is not None and custom_ids(raw) == ["d0", "d1", "d2"],
          f"its output is there with its 3 results ({'missing' if raw is None else len(raw)})",
          False)
    status, b = call("GET", f"/v1/batches/{s['fresh']}")
    check(status == 200, f"the batch created just before the cut is there ({status})", False)
    if status == 200:
        b = wait_end(s["fresh"], 60)
        raw = content(b["output_file_id"]) if b.get("output_file_id") else None
        check(b["status"] == "completed" and raw is not None
              and custom_ids(raw) == ["f0", "f1", "f2", "f3"],
              f"and it completes with its 4 results ({b['status']}, {b['request_counts']})",
              False)
    want = 1 + (status == 200)
    t0 = time.time()
    while metric("turbine_webhook_deliveries_pending") < want and time.time() - t0 < 10:
        time.sleep(0.1)
    pending = metric("turbine_webhook_deliveries_pending")
    check(pending == want, f"webhook deliveries pending: {pending:g} of {want} (the completed "
          "batch's, still, and the new batch's)", False)
    if failed:
        sys.exit(f"{len(failed)} checks failed")
PY
}

echo "== before the power cut"
serve "$MNT/files" "$WORK/server.log"
step before "$MNT" "$PORT" "$WORK/state.json"
kill -9 "$PID"
wait "$PID" 2>/dev/null || true
PID=
umount "$MNT"
echo "== after it (the journal replayed, the server started again)"
mount -o "$MOUNT_OPTS" "$IMG" "$MNT"
serve "$MNT/files" "$WORK/server.log"
failed=0
step after "$MNT" "$PORT" "$WORK/state.json" || failed=1
kill "$PID"
wait "$PID" 2>/dev/null || true
PID=

echo "== killed (SIGKILL) as a batch's results become a file"
WRAP=(strace -f -qq -o /dev/null --seccomp-bpf -e trace=rename,renameat,renameat2
  -e inject=rename,renameat,renameat2:delay_enter=2000000)
serve "$MNT/files" "$WORK/server.log"
step finalize "$MNT" "$PORT" "$WORK/state.json"
kill -9 "$(pgrep -P "$PID")" # the server, strace's child; strace ends with it
wait "$PID" 2>/dev/null || true
WRAP=()
serve "$MNT/files" "$WORK/server.log"
step finalized "$MNT" "$PORT" "$WORK/state.json" || failed=1
if [ "$failed" != 0 ]; then
  echo "crash check: FAILED ($(basename "$BIN"), $FS)"
  exit 1
fi
echo "crash check: all passed ($(basename "$BIN"), $FS)"
