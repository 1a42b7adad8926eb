#!/usr/bin/env bash
# Downloads a model's weights into models/<name>/ (default: sdxl-turbo, about 7 GB of fp16
# weights from stabilityai/sdxl-turbo), building turbine first if needed.
#
#   scripts/download_weights.sh [MODEL] [turbine download options...]
#   scripts/download_weights.sh sdxl-turbo --vae fp16-fix
#   HF_ENDPOINT=https://hf-mirror.com scripts/download_weights.sh      # through a mirror
#   HF_TOKEN=hf_... scripts/download_weights.sh                        # gated/private repos
#
# Re-running resumes an interrupted download and skips files already verified.
# TURBINE_BIN=/path/to/turbine uses that binary instead of building one;
# TURBINE_FEATURES=cuda builds with those cargo features.
set -euo pipefail

cd "$(dirname "$0")/.."

model=sdxl-turbo
if [[ $# -gt 0 && "$1" != -* ]]; then
    model="$1"
    shift
fi

bin="${TURBINE_BIN:-}"
if [[ -z "$bin" ]]; then
    bin=target/release/turbine
    # Rebuild when the binary is missing or older than any source file.
    if [[ ! -x "$bin" ]] || [[ -n "$(find src Cargo.toml Cargo.lock models -newer "$bin" -print -quit 2>/dev/null)" ]]; then
        echo "building turbine (cargo build --release)..." >&2
        features=()
        if [[ -n "${TURBINE_FEATURES:-}" ]]; then
            features=(--features "$TURBINE_FEATURES")
        fi
        cargo build --release --bin turbine "${features[@]}" >&2
    fi
fi

set +e
"$bin" download --model "$model" "$@"
rc=$?
set -e

endpoint="${HF_ENDPOINT:-https://huggingface.co}"
case $rc in
    0) ;;
    3) cat >&2 <<MSG

download_weights.sh: the network is the problem (cannot reach $endpoint, or it broke off).
  - Run this script again: finished files are kept and a partial file resumes.
  - If huggingface.co is slow or blocked where you are, use a mirror:
        HF_ENDPOINT=https://hf-mirror.com scripts/download_weights.sh $model
  - Behind a proxy, set HTTPS_PROXY.
MSG
    ;;
    4) cat >&2 <<MSG

download_weights.sh: the token is the problem ($endpoint refused access).
  - Accept the model's terms on its Hub page while logged in, then create a read token at
    https://huggingface.co/settings/tokens and run:
        HF_TOKEN=hf_... scripts/download_weights.sh $model
    (or \`huggingface-cli login\`, which stores the token in \$HF_HOME/token).
MSG
    ;;
    6) echo "download_weights.sh: free disk space or pass --dir DIR on a larger disk." >&2 ;;
    7) echo "download_weights.sh: a file failed its checksum; run again, or try another HF_ENDPOINT." >&2 ;;
esac
exit $rc
