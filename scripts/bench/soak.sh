#!/usr/bin/env bash
# Soak: does a server under steady load for a long while hold its memory and keep answering?
# The tiny fixture model on the CPU, three kinds of clients at once for DURATION seconds:
#   - base64 generations (PNG, 64x64), `hey -c 4`
#   - URL generations (WebP) whose images land in the store, kept small (--image-store-max-bytes
#     1 MiB) so that it is full within the first minute and then evicts, `hey -c 2`
#   - requests refused (a 400 after the body is read, a 401, a 404), `hey -c 2` each (hey keeps
#     at most 1,000,000 results per client; the fast refusals reach that within minutes)
# and every 10 s the server's resident memory (VmRSS), open connections, queue and images made.
#
#   scripts/bench/soak.sh BINARY [DURATION_S]     # default 600
#
# The verdict compares the resident memory of the last minute with that of the second (the
# store full, every path warm): a floor that rises is a leak.
# Needs `hey` (apt-get install hey) and curl.
set -u
cd "$(dirname "$0")/../.."
BIN=${1:?binary}
DURATION=${2:-600}
work=$(mktemp -d)
port=18791
base=http://127.0.0.1:$port
printf 'sk-soak name=soak\n' > "$work/keys"
echo '{"prompt":"a red fox","size":"64x64"}' > "$work/b64.json"
echo '{"prompt":"a lighthouse","size":"64x64","response_format":"url","output_format":"webp"}' > "$work/url.json"
echo '{"prompt":"x","n":99}' > "$work/bad.json"
"$BIN" serve --model-dir tests/fixtures/tiny-sdxl --device cpu --host 127.0.0.1 --port $port \
  --min-image-side 64 --default-size 64x64 --warmup-images 1 --max-queued-images 4096 \
  --image-store-max-bytes $((1 << 20)) --api-keys-file "$work/keys" 2>"$work/server.log" &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$work"' EXIT
until curl -sf $base/health >/dev/null; do
  kill -0 $pid 2>/dev/null || { cat "$work/server.log" >&2; exit 1; }
  sleep 0.2
done
auth=(-H "Authorization: Bearer sk-soak")
clients=()
hey -z ${DURATION}s -c 4 -m POST -T application/json "${auth[@]}" -D "$work/b64.json" $base/v1/images/generations > "$work/b64.out" &
clients+=($!)
hey -z ${DURATION}s -c 2 -m POST -T application/json "${auth[@]}" -D "$work/url.json" $base/v1/images/generations > "$work/url.out" &
clients+=($!)
hey -z ${DURATION}s -c 2 -m POST -T application/json "${auth[@]}" -D "$work/bad.json" $base/v1/images/generations > "$work/bad.out" &
clients+=($!)
hey -z ${DURATION}s -c 2 -m POST -T application/json -H "Authorization: Bearer sk-wrong" -D "$work/b64.json" $base/v1/images/generations > "$work/401.out" &
clients+=($!)
hey -z ${DURATION}s -c 2 "${auth[@]}" $base/v1/images/files/file-none > "$work/404.out" &
clients+=($!)

metric() { curl -s $base/metrics | awk -v m="$1" '$1 == m {print $2}'; }
printf '%6s %9s %11s %6s %12s\n' "secs" "RSS MiB" "connections" "queue" "images made"
start=$SECONDS
samples=()
while [ $((SECONDS - start)) -lt "$DURATION" ]; do
  sleep 10
  rss=$(awk '/VmRSS/{printf "%.1f", $2 / 1024}' /proc/$pid/status)
  samples+=("$((SECONDS - start)) $rss")
  printf '%6d %9s %11s %6s %12s\n' $((SECONDS - start)) "$rss" "$(metric turbine_http_connections)" \
    "$(metric turbine_queue_images)" "$(metric 'turbine_key_images_total{key="soak"}')"
done
wait "${clients[@]}"
for f in b64 url bad 401 404; do
  printf '%-4s %s req/s, statuses: %s\n' "$f" "$(awk '/Requests\/sec/{print $2}' "$work/$f.out")" \
    "$(awk '/^ *\[[0-9]+\]/{printf "%s%s ", $1, $2}' "$work/$f.out")"
done
# Lowest and highest sample of each window: the allocator's arenas make the resident size
# swing between two levels, so means mislead; a leak lifts the low one.
printf '%s\n' "${samples[@]}" | awk '
  function lo(a, b) { return a == "" || b < a ? b : a }
  function hi(a, b) { return a == "" || b > a ? b : a }
  $1 >= 60 && $1 < 120 { elo = lo(elo, $2); ehi = hi(ehi, $2) }
  { rss[NR] = $2; t[NR] = $1 }
  END {
    for (i = NR; i >= 1 && t[NR] - t[i] < 60; i--) { llo = lo(llo, rss[i]); lhi = hi(lhi, rss[i]) }
    if (elo == "" || llo == "") { print "too short for a verdict (needs 2 minutes)"; exit }
    printf "RSS (MiB, lowest-highest): second minute %.1f-%.1f, last minute %.1f-%.1f\n", elo, ehi, llo, lhi
  }'
if ! kill -0 $pid 2>/dev/null; then echo "the server died" >&2; exit 1; fi
