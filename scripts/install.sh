#!/usr/bin/env bash
# Create .venv (if missing) and install cmcseg into it.
#   - torch is installed only when it is not importable (TORCH_SPEC overrides what is installed);
#   - every later install is constrained to the torch already present, so that nnunetv2 ->
#     timm -> torchvision cannot replace it with another build plus GBs of CUDA packages.
# Usage: scripts/install.sh [EXTRA]     e.g. scripts/install.sh test
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
EXTRA=${1:-}
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    echo "[install] torch not importable: installing $TORCH_SPEC"
    "$PY" -m pip install -q "$TORCH_SPEC"
fi
pin=$(mktemp)
trap 'rm -f "$pin"' EXIT
"$PY" -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > "$pin"
target="."
[ -n "$EXTRA" ] && target=".[$EXTRA]"
stamp="$VENV/.cmcseg-installed-$(cat setup.cfg pyproject.toml | cksum | cut -d' ' -f1)-${EXTRA:-base}"
if [ ! -f "$stamp" ]; then
    echo "[install] installing cmcseg${EXTRA:+[$EXTRA]} (constrained to $(cat "$pin"))"
    "$PY" -m pip install -q -c "$pin" -e "$target"
    touch "$stamp"
fi
# nnunetv2 -> timm pulls a torchvision that may not match the installed torch. Installed but not
# importable, it breaks transformers (used by the Any2Seg teacher), which imports it whenever it is
# installed. cmcseg never imports torchvision, so an unimportable one is removed; a working one stays.
if "$PY" -m pip show -q torchvision >/dev/null 2>&1 && ! "$PY" -c "import torchvision" >/dev/null 2>&1; then
    echo "[install] torchvision is installed but cannot be imported with this torch: uninstalling it"
    "$PY" -m pip uninstall -y -q torchvision
fi
