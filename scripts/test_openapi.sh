#!/usr/bin/env bash
# The OpenAPI document against the real server. Starts `turbine serve` on a free port with the
# tiny fixture model on CPU (a key, the LoRA routes on, small bounds so generated requests stay
# cheap), then, on its own `GET /openapi.json`:
#   1. openapi-spec-validator: the document is valid OpenAPI 3.1;
#   2. scripts/openapi_walk.py: every operation taken to a success (a batch run to its end, an
#      upload completed, a webhook delivered, an adapter loaded), each answer checked against
#      what the document says of it;
#   3. schemathesis: for every operation the document's examples, boundary values (the coverage
#      phase), random requests valid and not (fuzzing) and linked sequences (stateful), with
#      every check it has but positive_data_acceptance (scripts/openapi_schemathesis.toml):
#      a 5xx; a status, content type, header or body the document does not describe; a request
#      the document calls invalid that the server took (not on the operations that take forms,
#      whose values are all text); a method a path lacks not answered 405; an object served
#      after its deletion; an operation that answered without the key.
# So the document and the validators are checked against each other from both sides.
#
# Environment:
#   PYTHON                  interpreter for the venv (default python3)
#   SCHEMATHESIS_VERSION, OPENAPI_SPEC_VALIDATOR_VERSION
#                           their versions (default: the ones this was written with)
#   OPENAPI_SEED            schemathesis' seed (default: a fresh one, printed, to replay a failure)
#   OPENAPI_MAX_EXAMPLES    fuzzing cases per operation (default 25)
#   TURBINE_BIN             a prebuilt turbine binary (default: `cargo build`, target/debug/turbine)
# `--install-only` installs schemathesis and the validator and stops (.ci/run fetches them while
# cargo compiles).
set -euo pipefail
cd "$(dirname "$0")/.."
INSTALL_ONLY=0
[ "${1:-}" = "--install-only" ] && INSTALL_ONLY=1

VENV=target/openapi-venv
VERSION=${SCHEMATHESIS_VERSION:-4.32.5}
VALIDATOR_VERSION=${OPENAPI_SPEC_VALIDATOR_VERSION:-0.9.0}
if ! "$VENV/bin/python" -c "
import importlib.metadata as m, sys
sys.exit((m.version('schemathesis'), m.version('openapi-spec-validator'))
         != ('$VERSION', '$VALIDATOR_VERSION'))
" 2>/dev/null; then
    echo "installing schemathesis==$VERSION and openapi-spec-validator==$VALIDATOR_VERSION" \
        "into $VENV" >&2
    "${PYTHON:-python3}" -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$VERSION" \
        "openapi-spec-validator==$VALIDATOR_VERSION"
fi
[ "$INSTALL_ONLY" = 0 ] || exit 0

if [ -z "${TURBINE_BIN:-}" ]; then
    cargo build --quiet --bin turbine
    TURBINE_BIN=target/debug/turbine
fi

work=$(mktemp -d)
server_pid=
cleanup() {
    if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
        kill -TERM "$server_pid"
        wait "$server_pid" || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

NO_COLOR=1 RUST_LOG=info "$TURBINE_BIN" serve \
    --model-dir tests/fixtures/tiny-sdxl --device cpu --host 127.0.0.1 --port 0 \
    --min-image-side 64 --max-image-side 128 --default-size 64x64 --max-steps 2 \
    --warmup-images 1 --api-key sk-openapi --files-dir "$work/files" \
    --allow-runtime-lora-updating --max-queued-images 64 \
    2> "$work/server.log" &
server_pid=$!
# shellcheck source=lib/tiny_server.sh
source scripts/lib/tiny_server.sh
listening_base "$work/server.log" "$server_pid"
for _ in $(seq 1 3000); do
    curl -sf "$base/health" >/dev/null && break
    sleep 0.1
done
curl -sf "$base/health" >/dev/null || { cat "$work/server.log" >&2; echo "never healthy" >&2; exit 1; }

status=0
# The document against OpenAPI 3.1's own schema, then the walk through the successes that
# made-up requests rarely reach.
curl -sf "$base/openapi.json" -o "$work/openapi.json"
"$VENV/bin/openapi-spec-validator" "$work/openapi.json" || status=$?
"$VENV/bin/python" scripts/openapi_walk.py --base-url "$base" --api-key sk-openapi \
    --lora tests/fixtures/reference/lora_kohya.safetensors || status=$?

seed=${OPENAPI_SEED:-$((RANDOM * 32768 + RANDOM))}
echo "schemathesis against $base/openapi.json, seed $seed (OPENAPI_SEED=$seed replays it)"
# From the scratch directory: schemathesis keeps a cache of its own in the directory it runs in.
(cd "$work" && "$OLDPWD/$VENV/bin/schemathesis" \
    --config-file "$OLDPWD/scripts/openapi_schemathesis.toml" run "$base/openapi.json" \
    --header "Authorization: Bearer sk-openapi" \
    --phases examples,coverage,fuzzing,stateful \
    --max-examples "${OPENAPI_MAX_EXAMPLES:-25}" --seed "$seed" \
    --workers 2 --request-timeout 120 --no-color \
    --suppress-health-check all --generation-database none \
    --report junit --report-dir "$work/report") || status=$?
if [ "$status" -ne 0 ]; then
    echo "--- server log (last 200 lines) ---" >&2
    tail -n 200 "$work/server.log" >&2
fi
exit "$status"
