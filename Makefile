# The README's two commands: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch and torchvision come from this machine's local wheel cache (pinned in pyproject.toml).
TORCH_PINS := "torch==2.14.1" "torchvision==0.29.1"
KDFORGE := $(BIN)/kdforge
RUN := $(KDFORGE) run --overwrite

.PHONY: demo test zoo install install-dev clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet $(TORCH_PINS)
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/pip install --quiet -e ".[dev]"
	$(BIN)/pip install --quiet ./tests/fixtures/kdforge-logit-l1 ./tests/fixtures/kdforge-regression
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

## Train a teacher, a baseline student and a distilled student on the bundled digits, then compare.
demo: $(VENV)/.installed
	$(RUN) recipes/digits/teacher.yaml
	$(RUN) recipes/digits/student.yaml
	$(RUN) recipes/digits/kd.yaml
	@echo
	$(KDFORGE) compare runs/digits-teacher runs/digits-student runs/digits-kd

## Every method's digits recipe with 3 seeds, mean +- std against the student alone and plain kd (minutes).
zoo: $(VENV)/.installed
	$(BIN)/python benchmarks/zoo.py --seeds 0 1 2

## Run the whole test suite.
test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -q

clean:
	rm -rf runs build dist *.egg-info .pytest_cache
