# The README's two commands: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch and torchvision come from this machine's local wheel cache (pinned in pyproject.toml).
TORCH_PINS := "torch==2.14.1" "torchvision==0.29.1"
KDFORGE := $(BIN)/kdforge
RUN := $(KDFORGE) run --overwrite

.PHONY: demo demo-lm test zoo bench docs docs-serve install install-dev clean

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

$(VENV)/.installed-bench: $(VENV)/.installed
	$(BIN)/pip install --quiet -e ".[bench]"
	touch $@

$(VENV)/.installed-lm: $(VENV)/.installed
	$(BIN)/pip install --quiet -e ".[lm]"
	touch $@

$(VENV)/.installed-docs: $(VENV)/.installed
	$(BIN)/pip install --quiet -e ".[docs]"
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

## Language models on 2 CPU cores (minutes): a small code-model teacher trained on the standard library's
## sources, a smaller student alone, and the student distilled with forward KL, JSD and on-policy; then compare,
## on their held-out files and on 24 files no run trained or was tuned on.
# One intra-op thread: these models are tiny, and two threads that wait on each other are far slower on shared cores.
demo-lm lm-student-then-onpolicy lm-forward_kl-then-jsd: export OMP_NUM_THREADS := 1
demo-lm: $(VENV)/.installed-lm
	$(RUN) recipes/lm/teacher.yaml
	$(MAKE) --no-print-directory -j2 $(OUTPUT_SYNC) lm-student-then-onpolicy lm-forward_kl-then-jsd
	@echo
	$(KDFORGE) compare runs/lm-teacher runs/lm-student runs/lm-kd-forward_kl runs/lm-kd-jsd runs/lm-kd-onpolicy
	@echo
	$(BIN)/python benchmarks/lm_unseen_eval.py

# The four students need only the teacher, so they run two at a time, one per core (each pair
# takes about three minutes). GNU make 4 prints each pair's output when the pair ends, so nothing
# shows for about three minutes; make 3.81 (macOS) has no --output-sync and interleaves it.
OUTPUT_SYNC := $(if $(filter 3.%,$(MAKE_VERSION)),,--output-sync=target)
.PHONY: lm-student-then-onpolicy lm-forward_kl-then-jsd
lm-student-then-onpolicy: $(VENV)/.installed-lm
	$(RUN) recipes/lm/student.yaml
	$(RUN) recipes/lm/kd-onpolicy.yaml

lm-forward_kl-then-jsd: $(VENV)/.installed-lm
	$(RUN) recipes/lm/kd-forward_kl.yaml
	$(RUN) recipes/lm/kd-jsd.yaml

## Every method's digits recipe with 3 seeds, mean +- std against the student alone and plain kd (minutes).
zoo: $(VENV)/.installed
	$(BIN)/python benchmarks/zoo.py --seeds 0 1 2

## kdforge next to a hand-written loop and torchdistill 1.1.5, interleaved rounds (see benchmarks/README.md; long).
bench: $(VENV)/.installed-bench
	$(BIN)/python benchmarks/bench.py

## Run the whole test suite.
test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -q -n 2 --dist worksteal

## Build the documentation site into site/ (strict: a broken link, anchor or API reference fails it).
docs: $(VENV)/.installed-docs
	$(BIN)/mkdocs build --strict --site-dir site

## Serve the documentation site on http://127.0.0.1:8000 with live reload.
docs-serve: $(VENV)/.installed-docs
	$(BIN)/mkdocs serve --strict

clean:
	rm -rf runs build dist site *.egg-info .pytest_cache
