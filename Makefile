# The two quick-start commands: `make demo` and `make test`.
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install install-test demo test

install:
	bash scripts/install.sh

install-test:
	bash scripts/install.sh test

# The main job on the embedded default: an MSCMR phantom through synth, plan, train (fold 0, --labeled 0.2),
# predict and evaluate in a few minutes on a CPU (cmcseg demo). It always works in ./cmcseg_work/demo,
# whatever nnUNet_* variables the user has set.
demo: install
	$(BIN)/cmcseg demo --work cmcseg_work/demo

# the linter, the layer contract and the type checker first (pyproject.toml [tool.ruff], [tool.importlinter],
# [tool.mypy]), then the whole suite
test: install-test
	$(BIN)/ruff check .
	BIN=$(abspath $(BIN)) bash scripts/static_checks.sh
	$(BIN)/pytest -q
