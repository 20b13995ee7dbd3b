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
started=$SECONDS
step() { echo "[install] ($1/4, $((SECONDS - started)) s) $2"; }
if [ ! -x "$VENV/bin/python" ]; then
    step 1 "creating $VENV"
    python3 -m venv "$VENV"
else
    step 1 "$VENV exists"
fi
PY="$VENV/bin/python"
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    step 2 "torch not importable: installing $TORCH_SPEC (about a minute; CPU wheel ~200 MB)"
    "$PY" -m pip install -q "$TORCH_SPEC"
else
    step 2 "torch $("$PY" -c 'import torch; print(torch.__version__)') already installed: kept"
fi
pin=$(mktemp)
trap 'rm -f "$pin"' EXIT
"$PY" -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > "$pin"
target="."
[ -n "$EXTRA" ] && target=".[$EXTRA]"
stamp="$VENV/.cmcseg-installed-$(cat setup.cfg pyproject.toml | cksum | cut -d' ' -f1)-${EXTRA:-base}"
if [ ! -f "$stamp" ]; then
    step 3 "installing cmcseg${EXTRA:+[$EXTRA]} and its dependencies (nnunetv2, monai, transformers, ...), constrained to $(cat "$pin"): a few minutes on a fresh machine"
    # one line per package as pip fetches it, so that the minutes are not silent
    "$PY" -m pip install --progress-bar off -c "$pin" -e "$target" \
        | { grep --line-buffered -E "^(Collecting|Successfully installed)" || true; } \
        | sed -u -e 's/^Collecting /[install]     fetching /' -e 's/^Successfully installed .*/[install]     installed/'
    touch "$stamp"
else
    step 3 "cmcseg${EXTRA:+[$EXTRA]} already installed for this setup.cfg: skipped"
fi
# nnunetv2 -> timm pulls a torchvision that may not match the installed torch. Installed but not
# importable, it breaks transformers (used by the Any2Seg teacher), which imports it whenever it is
# installed. cmcseg never imports torchvision, so an unimportable one is removed; a working one stays.
if "$PY" -m pip show -q torchvision >/dev/null 2>&1 && ! "$PY" -c "import torchvision" >/dev/null 2>&1; then
    step 4 "torchvision is installed but cannot be imported with this torch: uninstalling it"
    "$PY" -m pip uninstall -y -q torchvision
else
    step 4 "checked torchvision (absent or importable)"
fi
echo "[install] done in $((SECONDS - started)) s"
