# Two commands on a fresh clone: `make run` (set up + whole default pipeline) and `make test`.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# pip.conf on these machines lists find-links folders that may not exist: hide that noise only.
PIP_QUIET := 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install run test test-unit test-e2e bench clean help vllm gpu-check

help:
	@echo "make run    - create .venv if missing, install, run the whole default pipeline"
	@echo "make test   - same install, then the test suite (unit, training, integration, e2e)"
	@echo "make bench  - throughput benchmarks (not part of make test)"

# torch first and pinned: an unpinned torch requirement pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip $(PIP_QUIET)
	$(BIN)/python -m pip install -q torch==2.13.0 $(PIP_QUIET)
	$(BIN)/python -m pip install -q -e '.[test]' $(PIP_QUIET)
	touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/llmops run

test: install
	$(BIN)/python -m pytest

test-unit: install
	$(BIN)/python -m pytest -m unit

test-e2e: install
	$(BIN)/python -m pytest -m e2e

# Peers (text-dedup needs Python >= 3.12, datatrove its own pins) run in their own venvs:
# see the docstring of benchmarks/bench_dedup.py.
bench: install
	$(BIN)/python benchmarks/bench_stages.py
	$(BIN)/python benchmarks/bench_dedup.py
	$(BIN)/python benchmarks/bench_eval.py

# GPU hosts: vLLM in a venv of its own (it pins torch 2.14 and a compressed-tensors that llm-compressor's
# pins exclude); `llmops serve --backend auto` finds .venv-vllm/bin/vllm and talks to it over HTTP only.
vllm:
	test -x .venv-vllm/bin/python || $(PYTHON) -m venv .venv-vllm
	.venv-vllm/bin/python -m pip install -q --upgrade pip $(PIP_QUIET)
	.venv-vllm/bin/python -m pip install -q 'vllm==0.33.*' $(PIP_QUIET)

# One NVIDIA GPU: vLLM, 125m bf16 pretraining (MFU), quantization, vLLM serving and the serving benchmark in <= 12 min;
# writes reports/gpu_check/report.{json,md}. `benchmarks/gpu_check.sh --dry-run` prints the plan on any machine.
gpu-check: install
	benchmarks/gpu_check.sh $(GPU_CHECK_ARGS)

clean:
	rm -rf data models reports metrics mlflow.db mlartifacts .dvcstore
