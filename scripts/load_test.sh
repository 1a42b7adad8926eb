#!/usr/bin/env bash
# Whole-system load test of `turbine serve`: many concurrent HTTP clients over a concurrency
# sweep, reporting images/s, latency p50/p95/p99, errors and the mean batch size the server ran
# (from the turbine_batch_size histogram on /metrics).
#
#   scripts/load_test.sh [--url http://127.0.0.1:8000] [--concurrency 1,2,4,8,16]
#                        [--requests-per-client 4] [--size 256x256] [--format png]
#                        [--append-results] [-- EXTRA `turbine serve` ARGS]
#
# Without --url it starts `turbine serve` on 127.0.0.1 (a free port) with the tiny fixture model
# on the CPU (override with `-- --model-dir DIR --device cuda:0 ...`) and stops it at the end.
# The load generator is Debian's `hey` (installed with apt-get when missing); each request is one
# image. Only loopback addresses are targeted by default; every run is bounded in requests and
# time (hey's per-request timeout is --timeout seconds).
#
# Per level: requests = concurrency x requests-per-client; images/s = successful images / wall
# time of the level (first request sent to last response); latency percentiles over successful
# requests; mean batch size = delta(turbine_batch_size_sum) / delta(turbine_batch_size_count)
# over the level.
set -euo pipefail
cd "$(dirname "$0")/.."

URL=""
CONC="1,2,4,8,16"
PER_CLIENT=4
SIZE="256x256"
FORMAT="png"
TIMEOUT=600
APPEND=0
SERVE_ARGS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --url) URL="$2"; shift 2 ;;
        --concurrency) CONC="$2"; shift 2 ;;
        --requests-per-client) PER_CLIENT="$2"; shift 2 ;;
        --size) SIZE="$2"; shift 2 ;;
        --format) FORMAT="$2"; shift 2 ;;
        --timeout) TIMEOUT="$2"; shift 2 ;;
        --append-results) APPEND=1; shift ;;
        --) shift; SERVE_ARGS=("$@"); break ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done
[[ "$CONC" =~ ^[0-9]+(,[0-9]+)*$ ]] || { echo "--concurrency: comma-separated integers, got '$CONC'" >&2; exit 2; }
[[ "$PER_CLIENT" =~ ^[1-9][0-9]*$ ]] || { echo "--requests-per-client: a positive integer, got '$PER_CLIENT'" >&2; exit 2; }
[[ "$SIZE" =~ ^[0-9]+x[0-9]+$ ]] || { echo "--size: WIDTHxHEIGHT, got '$SIZE'" >&2; exit 2; }

if ! command -v hey >/dev/null; then
    echo "installing the load generator (Debian package hey)" >&2
    apt-get install -y -qq hey >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq hey; }
fi

WORK=$(mktemp -d target/load-test.XXXXXX 2>/dev/null || mktemp -d)
SERVER_PID=""
cleanup() {
    if [ -n "$SERVER_PID" ]; then
        kill "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
}
trap cleanup EXIT

MODEL_DESC="external server"
if [ -z "$URL" ]; then
    BIN="${TURBINE_BIN:-target/release/turbine}"
    if [ -z "${TURBINE_BIN:-}" ]; then
        cargo build --release --bin turbine >&2
    fi
    PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    URL="http://127.0.0.1:$PORT"
    if [ ${#SERVE_ARGS[@]} -eq 0 ]; then
        SERVE_ARGS=(--model-dir tests/fixtures/tiny-sdxl --device cpu --min-image-side 64)
    fi
    MODEL_DESC="turbine serve ${SERVE_ARGS[*]}"
    echo "starting: $BIN serve --host 127.0.0.1 --port $PORT ${SERVE_ARGS[*]}" >&2
    "$BIN" serve --host 127.0.0.1 --port "$PORT" "${SERVE_ARGS[@]}" >"$WORK/server.log" 2>&1 &
    SERVER_PID=$!
    for _ in $(seq 1 600); do
        if curl -sf "$URL/health" >/dev/null 2>&1; then break; fi
        kill -0 "$SERVER_PID" 2>/dev/null || { echo "server exited:" >&2; tail -20 "$WORK/server.log" >&2; exit 1; }
        sleep 0.5
    done
    curl -sf "$URL/health" >/dev/null || { echo "server not healthy after 300 s" >&2; exit 1; }
fi

BODY="$WORK/body.json"
printf '{"model":"sdxl-turbo","prompt":"a photograph of an astronaut riding a horse on the moon","n":1,"size":"%s","response_format":"b64_json","output_format":"%s"}' \
    "$SIZE" "$FORMAT" >"$BODY"

# turbine_batch_size_{sum,count} and the prompts run through the text encoders, from /metrics.
batch_stats() {
    curl -sf "$URL/metrics" | awk '/^turbine_batch_size_sum /{s=$2} /^turbine_batch_size_count /{c=$2}
        /^turbine_prompt_embeddings_total\{source="encoded"\} /{e=$2} END {print s+0, c+0, e+0}'
}

# One request first, so connection set-up and the server's lazy work are not in the first level.
curl -sf -o /dev/null -H 'Content-Type: application/json' --data @"$BODY" "$URL/v1/images/generations" \
    || { echo "the warm-up request failed: $(curl -s -H 'Content-Type: application/json' --data @"$BODY" "$URL/v1/images/generations" | head -c 400)" >&2; exit 1; }

ROWS="$WORK/rows.md"
: >"$ROWS"
IFS=',' read -ra LEVELS <<<"$CONC"
for c in "${LEVELS[@]}"; do
    n=$((c * PER_CLIENT))
    read -r s0 c0 e0 < <(batch_stats)
    hey -n "$n" -c "$c" -t "$TIMEOUT" -m POST -T application/json -D "$BODY" -o csv \
        "$URL/v1/images/generations" >"$WORK/c$c.csv"
    read -r s1 c1 e1 < <(batch_stats)
    # hey's csv: response-time (s), DNS+dialup, DNS, request-write, response-delay, response-read,
    # status-code, offset (s since the start). Requests that got no response at all are missing.
    python3 - "$WORK/c$c.csv" "$c" "$n" "$s0" "$c0" "$s1" "$c1" "$e0" "$e1" >>"$ROWS" <<'PY'
import csv, math, sys
path, conc, n, s0, c0, s1, c1, e0, e1 = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), *map(float, sys.argv[4:])
rows = list(csv.DictReader(open(path)))
ok = [r for r in rows if r["status-code"] == "200"]
errors = n - len(ok)
lat = sorted(float(r["response-time"]) for r in ok)
def pct(p):
    if not lat:
        return float("nan")
    k = max(0, min(len(lat) - 1, math.ceil(p / 100 * len(lat)) - 1))  # nearest rank
    return lat[k] * 1e3
wall = max((float(r["offset"]) + float(r["response-time"]) for r in rows), default=float("nan"))
mean_batch = (s1 - s0) / (c1 - c0) if c1 > c0 else float("nan")
print(f"| {conc} | {n} | {errors} | {len(ok) / wall:.2f} | {pct(50):.0f} | {pct(95):.0f} | {pct(99):.0f} | "
      f"{mean_batch:.2f} | {e1 - e0:.0f} |")
PY
    tail -1 "$ROWS" >&2
done

NOW=$(date -u '+%Y-%m-%d %H:%M UTC')
COMMIT="$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD -- src 2>/dev/null || echo -dirty)"
CPU=$(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -1)
{
    echo
    echo "### Load test ($NOW)"
    echo
    echo "- machine: $CPU, $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f", $2/1048576}' /proc/meminfo) GiB"
    echo "- command: \`scripts/load_test.sh --concurrency $CONC --requests-per-client $PER_CLIENT --size $SIZE --format $FORMAT\`"
    if [ -n "${TURBINE_BIN:-}" ]; then
        echo "- commit: $COMMIT (this checkout; the server binary was given: $TURBINE_BIN, built $(date -u -r "$TURBINE_BIN" '+%Y-%m-%d %H:%M UTC' 2>/dev/null))"
    else
        echo "- commit: $COMMIT"
    fi
    echo "- server: $MODEL_DESC; load generator: hey $(dpkg-query -W -f='${Version}' hey 2>/dev/null), one image per request"
    echo "- every request has the same prompt: the server encodes it at most once per batch, and not at all while"
    echo "  \`--prompt-cache-entries\` (default 256) keeps it; 'prompts encoded' counts the text-encoder runs"
    echo
    echo "| concurrency | requests | errors | images/s | p50 ms | p95 ms | p99 ms | mean batch size | prompts encoded |"
    echo "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    cat "$ROWS"
} >"$WORK/result.md"
cat "$WORK/result.md"
if [ "$APPEND" = 1 ]; then
    cat "$WORK/result.md" >>benches/RESULTS.md
    echo "appended to benches/RESULTS.md" >&2
fi
