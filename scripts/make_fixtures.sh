#!/usr/bin/env bash
# Regenerates every test fixture: the tiny random SDXL model (tests/fixtures/tiny-sdxl), the real
# model's tensor manifest (models/sdxl-turbo/tensors.json) and the diffusers/transformers reference
# outputs (tests/fixtures/reference), by running scripts/fixtures/make_tiny_model.py,
# real_manifest.py, then each scripts/fixtures/ref_*.py in sorted order.
#
# Python: $TURBINE_PYTHON if set, else a venv in target/fixtures-venv made from
# scripts/fixtures/requirements.txt (created once, reused after).
# Deterministic: rerunning with the same package versions rewrites identical files.
set -euo pipefail

cd "$(dirname "$0")/.."

if [[ -n "${TURBINE_PYTHON:-}" ]]; then
    py="$TURBINE_PYTHON"
else
    venv=target/fixtures-venv
    if [[ ! -x "$venv/bin/python" ]] || ! cmp -s scripts/fixtures/requirements.txt "$venv/requirements.txt"; then
        rm -rf "$venv"
        python3 -m venv "$venv"
        "$venv/bin/pip" install --quiet --upgrade pip
        "$venv/bin/pip" install --quiet -r scripts/fixtures/requirements.txt
        cp scripts/fixtures/requirements.txt "$venv/requirements.txt"
    fi
    py="$venv/bin/python"
fi

export PYTHONHASHSEED=0
export TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1

echo "== make_tiny_model.py" >&2
"$py" scripts/fixtures/make_tiny_model.py
echo "== real_manifest.py" >&2
"$py" scripts/fixtures/real_manifest.py

mkdir -p tests/fixtures/reference
for script in $(ls scripts/fixtures/ref_*.py 2>/dev/null | LC_ALL=C sort); do
    echo "== $(basename "$script")" >&2
    "$py" "$script"
done

du -sh tests/fixtures >&2
