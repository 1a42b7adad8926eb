#!/usr/bin/env bash
# A venv here with the Python packages of the H200 device image (scripts/bench/requirements-device.txt:
# torch 2.11.0 with its CUDA 13.0 libraries, transformers 5.17.0, numpy 2.5.2, python 3.12) plus the
# diffusers wheel that scripts/gpu_check.sh carries, installed the way gpu_check.sh installs it
# there (no dependencies). With it, the reference side and the device machine's steps run here
# against the versions they meet there, at no device time:
#
#   bash scripts/bench/device_env.sh [VENV]            # default target/device-venv (~5 GB, minutes)
#   TURBINE_BENCH_PYTHON=target/device-venv/bin/python bash scripts/gpu_check.sh --dry-run
#   bash scripts/gpu_check.sh --rehearse               # uses target/device-venv
#
# Running it again is a no-op when the venv already holds these versions.
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=${1:-target/device-venv}
REQ=scripts/bench/requirements-device.txt
STAMP="$VENV/.device-$(sha256sum "$REQ" | cut -c1-12)"
if [ -f "$STAMP" ]; then
    echo "$VENV already holds the device's packages ($REQ)"
    exit 0
fi

# numpy 2.5 needs python 3.12, as the device has: find one (on PATH or under pyenv).
py=""
for c in python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python3.12 /usr/bin/python3.12 /usr/local/bin/python3.12; do
    if "$c" -c 'import sys; assert sys.version_info[:2] == (3, 12)' >/dev/null 2>&1; then
        py=$c
        break
    fi
done
[ -n "$py" ] || { echo "error: no python 3.12 here (the device runs 3.12; numpy 2.5 needs it)" >&2; exit 1; }

[ -x "$VENV/bin/python" ] || "$py" -m venv "$VENV"
export PIP_DISABLE_PIP_VERSION_CHECK=1
"$VENV/bin/python" -m pip install -q -r "$REQ"

# diffusers as gpu_check.sh installs it there, without dependencies: the carried wheel, or
# (none carried yet) the same version, pinned in scripts/bench/requirements.txt, from PyPI.
pin=$(grep -m1 '^diffusers==' scripts/bench/requirements.txt)
whl=$(ls target/gpu-check/wheels/diffusers-"${pin#diffusers==}"-*.whl 2>/dev/null | head -1 || true)
"$VENV/bin/python" -m pip install -q --no-deps "${whl:-$pin}"
"$VENV/bin/python" -c "import sys, torch, diffusers, transformers, numpy, pynvml
print('python', sys.version.split()[0], 'torch', torch.__version__, 'diffusers', diffusers.__version__,
      'transformers', transformers.__version__, 'numpy', numpy.__version__)"
touch "$STAMP"
