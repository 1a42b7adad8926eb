#!/usr/bin/env bash
# The HTTP path's own cost: the same requests against two `turbine` binaries (say, release
# builds of two commits), alternated over two rounds, on the tiny fixture model on the CPU.
#
#   scripts/bench/http_overhead.sh OLD_BINARY NEW_BINARY
#   scripts/bench/http_overhead.sh --tls BINARY    # the same binary, HTTP (old) vs HTTPS (new)
#   scripts/bench/http_overhead.sh --otlp BINARY   # the same binary, without traces (old) and
#                                                  # with --otlp-endpoint (new)
#
# Per binary and round: GET /v1/models (no body; 20000 requests from 16 clients), the same on a
# new connection each (`fresh`: 5000), a POST whose JSON is read and refused (400; 20000), and
# 600 one-image 64x64 generations from 8 clients.
# With --tls the new rows are HTTPS (--tls-cert-file, an EC P-256 certificate made with openssl;
# hey does not verify it): `fresh` then pays a TLS handshake per request. They are served on
# port 443 (so run as root) at https://localhost/: hey sends the URL's host *with its port* as
# the TLS server name, which is not a valid name, and rustls, rightly, refuses the handshake.
# With --otlp the new rows export every request's spans to scripts/bench/otlp_sink.py (a
# collector stand-in on this machine that answers each export 200 and counts its bytes), every
# second (OTEL_BSP_SCHEDULE_DELAY=1000), so that the exports happen during the runs.
# Needs `hey` (apt-get install hey), curl and, for --tls, openssl.
set -u
cd "$(dirname "$0")/../.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
NEW_TLS=()
NEW_OTLP=()
if [ "${1:-}" = "--tls" ]; then
  OLD=${2:?binary}
  NEW=$OLD
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 -subj /CN=localhost \
    -addext subjectAltName=DNS:localhost,IP:127.0.0.1 -keyout "$work/key.pem" -out "$work/cert.pem" 2>/dev/null
  NEW_TLS=(--tls-cert-file "$work/cert.pem" --tls-key-file "$work/key.pem")
elif [ "${1:-}" = "--otlp" ]; then
  OLD=${2:?binary}
  NEW=$OLD
  python3 scripts/bench/otlp_sink.py 18791 &
  sink=$!
  trap 'kill $sink; wait $sink; rm -rf "$work"' EXIT
  export OTEL_BSP_SCHEDULE_DELAY=1000
  NEW_OTLP=(--otlp-endpoint http://127.0.0.1:18791)
else
  OLD=${1:?old binary}
  NEW=${2:?new binary}
fi
echo '{"prompt":"x","n":99}' > "$work/bad.json"
echo '{"prompt":"a red fox","size":"64x64","seed":1}' > "$work/good.json"
run() {
  local bin=$1 label=$2 port=18790 base=http://127.0.0.1:18790
  shift 2
  if [ "${1:-}" = --tls-cert-file ]; then
    port=443
    base=https://localhost
  fi
  $bin serve --model-dir tests/fixtures/tiny-sdxl --device cpu --host 127.0.0.1 --port $port \
     --min-image-side 64 --default-size 64x64 --warmup-images 1 --max-queued-images 4096 "$@" 2>/dev/null &
  local pid=$!
  until curl -skf --resolve localhost:443:127.0.0.1 $base/health >/dev/null; do sleep 0.2; done
  for case in models fresh bad good; do
    case $case in
      models) out=$(hey -n 20000 -c 16 $base/v1/models) ;;
      fresh) out=$(hey -n 5000 -c 16 -disable-keepalive $base/v1/models) ;;
      bad) out=$(hey -n 20000 -c 16 -m POST -T application/json -D "$work/bad.json" $base/v1/images/generations) ;;
      good) out=$(hey -n 600 -c 8 -m POST -T application/json -D "$work/good.json" $base/v1/images/generations) ;;
    esac
    rps=$(echo "$out" | awk '/Requests\/sec/{print $2}')
    p50=$(echo "$out" | awk '/50% in/{print $3}')
    p99=$(echo "$out" | awk '/99% in/{print $3}')
    codes=$(echo "$out" | awk '/\[[0-9]+\]/{printf "%s%s ", $1, $2}')
    printf "%-4s %-7s %10s req/s  p50 %s s  p99 %s s  %s\n" "$label" "$case" "$rps" "$p50" "$p99" "$codes"
  done
  kill $pid; wait $pid 2>/dev/null
}
for round in 1 2; do
  run "$OLD" old
  run "$NEW" new "${NEW_TLS[@]}" "${NEW_OTLP[@]}"
done
