#!/usr/bin/env bash
# mypy over cmcseg as it is installed. setup.cfg maps plans/, preprocessing/ and cli/ into the package
# (cmcseg.plans, ...); mypy cannot follow that mapping, so it checks a tree of links with the installed
# layout. The settings are in pyproject.toml [tool.mypy]. Errors name files as cmcseg/plans/..., i.e. plans/...
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
MYPY=${MYPY:-$repo/.venv/bin/mypy}
tree=$(mktemp -d)
trap 'rm -rf "$tree"' EXIT
mkdir "$tree/cmcseg"
for f in cmcseg/*; do ln -s "$repo/$f" "$tree/cmcseg/"; done
for d in plans preprocessing cli; do ln -s "$repo/$d" "$tree/cmcseg/$d"; done
cd "$tree"
"$MYPY" --config-file "$repo/pyproject.toml" --cache-dir "$repo/.mypy_cache" -p cmcseg
