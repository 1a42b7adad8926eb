# Sourced by the checks that run the real binary on the tiny fixture model (full_disk_check.sh,
# crash_check.sh, slow_disk_check.sh, memory_limit_check.sh). They set BIN, PORT and, where the
# server runs under another command (strace, a cgroup), the array WRAP; the array EXTRA holds
# options of their own.
#
# serve FILES_DIR LOG: starts the server with its files directory at FILES_DIR, its output
# appended to LOG, and sets PID; returns once /health answers, or exits 1 with the log's tail.
serve() {
  local files=$1 log=$2
  ${WRAP[@]+"${WRAP[@]}"} "$BIN" serve --model-dir tests/fixtures/tiny-sdxl --device cpu \
    --host 127.0.0.1 --port "$PORT" --min-image-side 64 --max-image-side 512 \
    --default-size 64x64 --warmup-images 1 --files-dir "$files" --min-free-disk-bytes 0 \
    --max-batch-size 4 ${EXTRA[@]+"${EXTRA[@]}"} >>"$log" 2>&1 &
  PID=$!
  for _ in $(seq 150); do
    curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && return
    sleep 0.2
  done
  echo "the server did not start: $(tail -5 "$log")" >&2
  exit 1
}

# listening_base LOG PID: waits until the server PID (started with --port 0, its log in LOG)
# says where it listens, and sets `base` to that http(s)://host:port; exits 1 with the log if
# it exits or never listens (the SDK contract test and the OpenAPI check, whose servers take
# a free port).
listening_base() {
  local log=$1 pid=$2
  base=
  for _ in $(seq 1 600); do
    base=$(grep -o 'listening on https\?://[0-9.:]*' "$log" | head -n1 | sed 's/listening on //' || true)
    [ -n "$base" ] && return
    kill -0 "$pid" 2>/dev/null || { cat "$log" >&2; echo "server exited" >&2; exit 1; }
    sleep 0.1
  done
  cat "$log" >&2
  echo "server never listened" >&2
  exit 1
}
