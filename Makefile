# Two entry points: `make demo` and `make test`. Both create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch/torchvision pinned in the same command as timm so pip takes the local wheels
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test test-slow lint install clean

$(BIN)/kdcli: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH) -e '.[test]'
	touch $@

install: $(BIN)/kdcli

demo: install
	$(BIN)/kdcli demo

test: install
	$(BIN)/ruff check kdcli tests benchmarks
	$(BIN)/python -m mypy
	$(BIN)/python -m pytest -m "not slow" --durations=15 tests

# the end-to-end runs (real training, torchrun with 2 ranks, a pty, full disks): CI runs them after `make test`
test-slow: install
	$(BIN)/python -m pytest -m slow --durations=15 tests

# mypy reads [tool.mypy] in pyproject.toml: the kdcli package, minus the allow-list that only shrinks
lint: install
	$(BIN)/ruff check kdcli tests benchmarks
	$(BIN)/python -m mypy

clean:
	rm -rf $(VENV) runs .pytest_cache
