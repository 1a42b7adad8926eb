#!/usr/bin/env bash
# Contract test with the official `openai` SDKs as the clients: starts the real `turbine serve`
# on a free port with the tiny fixture model on CPU, runs tests/openai_sdk_test.py (Python),
# tests/openai_node_test.mjs (Node.js) and tests/ai_sdk_test.mjs (the Vercel AI SDK's
# generateImage, with @ai-sdk/openai and @ai-sdk/openai-compatible) against it, stops the server. Then the same over
# HTTPS (--tls-cert-file, a certificate for localhost from a CA made here with openssl) for the
# tests that touch the transport, each SDK given the CA as its users give it: Python's an
# `httpx` client with an SSL context, Node's NODE_EXTRA_CA_CERTS. Between the two, over HTTP,
# tests/gateway_test.py puts LiteLLM (the multi-provider gateway library) in front of the server:
# turbine as a provider, and as the fallback tier behind a rate-limited hosted API (a local
# stand-in). Any failing fails it.
#
# The Python SDK goes into a venv under target/openai-venv, LiteLLM (with the same Python SDK)
# into target/litellm-venv, the Node SDK into target/openai-node (npm), the AI SDK into
# target/ai-sdk (npm), each on first use.
# Environment:
#   PYTHON                   interpreter for the venvs (default python3)
#   OPENAI_SDK_VERSION       the Python SDK's version (default: the one the test was written with)
#   LITELLM_VERSION          LiteLLM's version (default: likewise)
#   OPENAI_NODE_SDK_VERSION  the Node SDK's version (default: likewise; it needs `node` >= 20)
#   AI_SDK_VERSION, AI_SDK_OPENAI_VERSION, AI_SDK_OPENAI_COMPATIBLE_VERSION
#                            `ai`, `@ai-sdk/openai`, `@ai-sdk/openai-compatible` (likewise)
#   TURBINE_BIN              a prebuilt turbine binary (default: `cargo build`, target/debug/turbine)
# `--install-only` installs the SDKs and stops (.ci/run fetches them while cargo compiles).
set -euo pipefail
cd "$(dirname "$0")/.."
INSTALL_ONLY=0
[ "${1:-}" = "--install-only" ] && INSTALL_ONLY=1

VENV=target/openai-venv
SDK_VERSION=${OPENAI_SDK_VERSION:-3.57.0}
if ! "$VENV/bin/python" -c "import openai, sys; sys.exit(openai.__version__ != '$SDK_VERSION')" 2>/dev/null; then
    echo "installing openai==$SDK_VERSION into $VENV" >&2
    "${PYTHON:-python3}" -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "openai==$SDK_VERSION"
fi

GATEWAY_VENV=target/litellm-venv
LITELLM_VERSION=${LITELLM_VERSION:-1.110.2}
if ! "$GATEWAY_VENV/bin/python" -c "
import importlib.metadata as m, sys
sys.exit((m.version('litellm'), m.version('openai')) != ('$LITELLM_VERSION', '$SDK_VERSION'))
" 2>/dev/null; then
    echo "installing litellm==$LITELLM_VERSION (with openai==$SDK_VERSION) into $GATEWAY_VENV" >&2
    "${PYTHON:-python3}" -m venv "$GATEWAY_VENV"
    "$GATEWAY_VENV/bin/pip" install --quiet --disable-pip-version-check \
        "litellm==$LITELLM_VERSION" "openai==$SDK_VERSION"
fi

NODE_DIR=target/openai-node
NODE_SDK_VERSION=${OPENAI_NODE_SDK_VERSION:-7.59.0}
command -v node >/dev/null || { echo "node is required for the Node SDK's contract test" >&2; exit 1; }
if [ "$(node -p "try { require('./$NODE_DIR/node_modules/openai/package.json').version } catch { '' }")" != "$NODE_SDK_VERSION" ]; then
    echo "installing openai@$NODE_SDK_VERSION (npm) into $NODE_DIR" >&2
    mkdir -p "$NODE_DIR"
    [ -f "$NODE_DIR/package.json" ] || echo '{"private": true}' > "$NODE_DIR/package.json"
    # The SDK declares node >= 22 and runs on the Node 20 of the CI machines (fetch, FormData,
    # File): the test is the proof.
    npm install --prefix "$NODE_DIR" --no-audit --no-fund --loglevel=error --engine-strict=false \
        "openai@$NODE_SDK_VERSION"
fi

# The Vercel AI SDK (`ai`'s generateImage) with its two providers a turbine user would pick.
AI_SDK_DIR=target/ai-sdk
AI_SDK_PACKAGES="ai@${AI_SDK_VERSION:-6.0.326} @ai-sdk/openai@${AI_SDK_OPENAI_VERSION:-3.0.141} @ai-sdk/openai-compatible@${AI_SDK_OPENAI_COMPATIBLE_VERSION:-2.0.92} @ai-sdk/azure@${AI_SDK_AZURE_VERSION:-3.0.128}"
installed_ai_sdk=$(node -p "try { ['ai', '@ai-sdk/openai', '@ai-sdk/openai-compatible', '@ai-sdk/azure'].map((p) => p + '@' + require('./$AI_SDK_DIR/node_modules/' + p + '/package.json').version).join(' ') } catch { '' }")
if [ "$installed_ai_sdk" != "$AI_SDK_PACKAGES" ]; then
    echo "installing $AI_SDK_PACKAGES (npm) into $AI_SDK_DIR" >&2
    mkdir -p "$AI_SDK_DIR"
    [ -f "$AI_SDK_DIR/package.json" ] || echo '{"private": true}' > "$AI_SDK_DIR/package.json"
    # shellcheck disable=SC2086 # four package specs
    npm install --prefix "$AI_SDK_DIR" --no-audit --no-fund --loglevel=error $AI_SDK_PACKAGES
fi
[ "$INSTALL_ONLY" = 0 ] || exit 0

if [ -z "${TURBINE_BIN:-}" ]; then
    cargo build --quiet --bin turbine
    TURBINE_BIN=target/debug/turbine
fi

# shellcheck source=lib/tiny_server.sh
source scripts/lib/tiny_server.sh
work=$(mktemp -d)
server_pid=
stop_server() {
    if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
        kill -TERM "$server_pid"
        wait "$server_pid" || true
    fi
    server_pid=
}
cleanup() {
    stop_server
    rm -rf "$work"
}
trap cleanup EXIT

cat > "$work/keys" <<KEYS
sk-sdk-test
sk-sdk-limited requests_per_minute=1
sk-sdk-limited-node requests_per_minute=1
sk-gateway-limited requests_per_minute=1
KEYS

# start_server LOG [ARGS...]: the server on a free port; sets server_pid and base (its
# http(s)://host:port, with localhost for https, the name its certificate has) once /health is 200
# (after the warm-up batch). $CA_FILE, if set, verifies the health checks' HTTPS.
start_server() {
    local log=$1
    shift
    NO_COLOR=1 RUST_LOG=info "$TURBINE_BIN" serve \
        --model-dir tests/fixtures/tiny-sdxl --device cpu \
        --host 127.0.0.1 --port 0 \
        --min-image-side 64 --default-size 64x64 --warmup-images 1 \
        --api-keys-file "$work/keys" "$@" \
        2> "$log" &
    server_pid=$!
    listening_base "$log" "$server_pid"
    case $base in https://*) base="https://localhost:${base##*:}" ;; esac
    "$VENV/bin/python" - "$base/health" "${CA_FILE:-}" <<'PY'
import ssl, sys, time, urllib.request, urllib.error
context = ssl.create_default_context(cafile=sys.argv[2]) if sys.argv[2] else None
for _ in range(3000):
    try:
        if urllib.request.urlopen(sys.argv[1], timeout=5, context=context).status == 200:
            sys.exit(0)
    except (urllib.error.URLError, ConnectionError):
        pass
    time.sleep(0.1)
sys.exit("server never became healthy")
PY
}

status=0
start_server "$work/server.log"
"$VENV/bin/python" tests/openai_sdk_test.py --base-url "$base/v1" \
    --api-key sk-sdk-test --limited-key sk-sdk-limited || status=$?
"$GATEWAY_VENV/bin/python" tests/gateway_test.py --base-url "$base/v1" \
    --api-key sk-sdk-test --limited-key sk-gateway-limited || status=$?
# The tests run from their SDK's directory, where their imports resolve.
cp tests/openai_node_test.mjs tests/node_test_helpers.mjs "$NODE_DIR/"
node "$NODE_DIR/openai_node_test.mjs" --base-url "$base/v1" \
    --api-key sk-sdk-test --limited-key sk-sdk-limited-node || status=$?
cp tests/ai_sdk_test.mjs tests/node_test_helpers.mjs "$AI_SDK_DIR/"
node "$AI_SDK_DIR/ai_sdk_test.mjs" --base-url "$base/v1" --api-key sk-sdk-test || status=$?
if [ "$status" -ne 0 ]; then
    echo "--- server log ---" >&2
    cat "$work/server.log" >&2
fi
stop_server

# HTTPS: a CA, and a certificate it signs for localhost and 127.0.0.1 (P-256, a day), with the
# extensions strict verifiers (Python 3.13's default context) ask for.
if ! command -v openssl >/dev/null && [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && apt-get install -y -qq openssl >/dev/null
fi
command -v openssl >/dev/null || { echo "openssl is required for the HTTPS part" >&2; exit 1; }
tls=$work/tls
mkdir -p "$tls"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 \
    -subj "/CN=turbine SDK test CA" -keyout "$tls/ca.key" -out "$tls/ca.pem" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign" \
    2> "$tls/openssl.log"
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=localhost" \
    -keyout "$tls/key.pem" -out "$tls/cert.csr" 2>> "$tls/openssl.log"
printf '%s\n' "subjectAltName=DNS:localhost,IP:127.0.0.1" "basicConstraints=critical,CA:FALSE" \
    "keyUsage=critical,digitalSignature" "extendedKeyUsage=serverAuth" \
    "authorityKeyIdentifier=keyid" "subjectKeyIdentifier=hash" > "$tls/leaf.ext"
openssl x509 -req -in "$tls/cert.csr" -CA "$tls/ca.pem" -CAkey "$tls/ca.key" -CAcreateserial \
    -days 1 -extfile "$tls/leaf.ext" -out "$tls/cert.pem" 2>> "$tls/openssl.log"

https_status=0
CA_FILE=$tls/ca.pem start_server "$work/server-https.log" \
    --tls-cert-file "$tls/cert.pem" --tls-key-file "$tls/key.pem"
echo "over HTTPS ($base):"
transport="b64_json,url then fetch,stream,edit"
"$VENV/bin/python" tests/openai_sdk_test.py --base-url "$base/v1" --ca-file "$tls/ca.pem" \
    --api-key sk-sdk-test --limited-key sk-sdk-limited --only "$transport" || https_status=$?
NODE_EXTRA_CA_CERTS=$tls/ca.pem node "$NODE_DIR/openai_node_test.mjs" --base-url "$base/v1" \
    --api-key sk-sdk-test --limited-key sk-sdk-limited-node --only "$transport" || https_status=$?
if [ "$https_status" -ne 0 ]; then
    echo "--- server log (HTTPS) ---" >&2
    cat "$work/server-https.log" >&2
    status=$https_status
fi
exit "$status"
