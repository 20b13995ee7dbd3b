# The two quick-start commands: `make demo` and `make test`.
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install install-test demo test

install:
	bash scripts/install.sh

install-test:
	bash scripts/install.sh test

# The main job on the embedded default: a phantom MSCMR dataset through synth and plan.
# The demo always works in ./cmcseg_work, whatever nnUNet_* variables the user has set.
DEMO_ROOTS := --raw cmcseg_work/raw --preprocessed cmcseg_work/preprocessed --results cmcseg_work/results

demo: install
	$(BIN)/cmcseg synth -d MSCMR --size small $(DEMO_ROOTS)
	$(BIN)/cmcseg plan -d MSCMR -np 2 $(DEMO_ROOTS)

test: install-test
	$(BIN)/pytest -q
