# ChatGLM-CPU-Trainer. Every target only calls `python -m app <command>`; every setting is a
# variable of app/config.py, given here as `make train MAX_SAMPLES=50`, in the environment or in
# .env (precedence: command line > environment > .env > default). `make help` lists them all.
#
# Command-line variables reach the Python process through the environment (GNU make exports
# them), so this file defines no defaults of its own: app/config.py is the single source.

SHELL := /bin/bash
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help setup data tiny-model info train predict predict-custom predict-file chat evaluate merge demo config test bench-memory clean distclean

help: ## list targets and every variable with its default
	@echo "usage: make <target> [VAR=value ...]"
	@echo
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | awk -F'\t' '{printf "  %-16s %s\n", $$1, $$2}'
	@echo
	@$$( [ -x $(PY) ] && echo $(PY) || echo $(PYTHON) ) -m app --help | sed -n '/^settings/,$$p'

$(STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	@touch $@

setup: $(STAMP) ## create .venv with the pinned requirements (CPU torch)

data/train.jsonl: | $(STAMP)
	$(PY) -m app generate-data

data: data/train.jsonl ## write the synthetic triplet sample data (data/train.jsonl, data/dev.jsonl)

tiny-model: setup ## build the random tiny model (MODEL_NAME=tiny|tiny-qwen2|tiny-qwen3|tiny-llama|tiny-gemma3)
	$(PY) -m app make-tiny-model MODEL_NAME=$${MODEL_NAME:-tiny}

info: setup data ## detected RAM/CPUs/GPUs, the tier, every resolved setting, predicted peak memory
	$(PY) -m app info

train: setup data ## fine-tune MODEL_NAME on DATA_PATH -> OUTPUT_DIR
	$(PY) -m app train

predict: setup ## answer the built-in triplet prompt with the last adapter
	$(PY) -m app predict PROMPT= INPUT_FILE= INTERACTIVE=0

predict-custom: setup ## answer PROMPT="..." with the last adapter
	@[ -n "$$PROMPT" ] || { echo "PROMPT is empty: use make predict-custom PROMPT='你的问题'" >&2; exit 2; }
	$(PY) -m app predict INPUT_FILE= INTERACTIVE=0

predict-file: setup ## predict every line of INPUT_FILE -> OUTPUT_FILE (.jsonl)
	@[ -n "$$INPUT_FILE" ] || { echo "INPUT_FILE is empty: use make predict-file INPUT_FILE=data/dev.jsonl" >&2; exit 2; }
	$(PY) -m app predict INTERACTIVE=0

chat: setup ## interactive chat with the last adapter
	$(PY) -m app predict INTERACTIVE=1 INPUT_FILE=

evaluate: setup ## triplet P/R/F1 of the last adapter on EVAL_PATH (or PREDICTIONS=file.jsonl: score only)
	$(PY) -m app evaluate

merge: setup ## fold the last adapter into its base -> MERGED_DIR (loads without peft)
	$(PY) -m app merge

demo: setup ## offline proof of learning: tiny GLM from scratch, held-out F1 curve -> bench/demo.md
	$(PY) -m app demo

config: setup ## print the resolved settings
	$(PY) -m app config

test: setup ## run the test suite (CPU, tiny models, offline)
	$(PY) -m pytest -q

bench-memory: setup ## predicted vs measured peak RSS, tokens/s, loss per quant level -> bench/memory.md
	$(PY) -m bench.bench_memory

clean: ## remove outputs, tiny models, generated data and caches (keeps .venv)
	rm -rf models/lora-adapter models/tiny-glm models/tiny-qwen2 models/tiny-llama models/.last_run \
		models/demo models/demo-glm data/demo data/train.jsonl data/dev.jsonl .pytest_cache
	find . -name __pycache__ -not -path './$(VENV)/*' -prune -exec rm -rf {} +

distclean: clean ## clean, and remove .venv
	rm -rf $(VENV)
