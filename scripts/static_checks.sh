#!/usr/bin/env bash
# The layer contract (import-linter) and the type checker (mypy) over cmcseg as it is installed.
# setup.cfg maps plans/, preprocessing/ and cli/ into the package (cmcseg.plans, ...); neither tool can follow that
# mapping, so both read a tree with the installed layout: real folders, each file a link to the repository's.
# The settings are in pyproject.toml ([tool.importlinter], [tool.mypy]). Errors name files as cmcseg/plans/...,
# i.e. plans/...
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
BIN=${BIN:-$repo/.venv/bin}
tree=$(mktemp -d)
trap 'rm -rf "$tree"' EXIT
mkdir "$tree/cmcseg"
for f in cmcseg/*; do cp -rs "$repo/$f" "$tree/cmcseg/"; done
for d in plans preprocessing cli; do cp -rs "$repo/$d" "$tree/cmcseg/$d"; done
find "$tree" -name __pycache__ -prune -exec rm -rf {} +
cd "$tree"
echo "[static checks] import-linter: the layer contract"
PYTHONPATH="$tree" "$BIN/lint-imports" --no-cache "$repo/pyproject.toml"
echo "[static checks] mypy"
"$BIN/mypy" --config-file "$repo/pyproject.toml" --cache-dir "$repo/.mypy_cache" -p cmcseg
