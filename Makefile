# ChatGLM-CPU-Trainer. Every target only calls `python -m app <command>`; every setting is a
# variable of app/config/settings.py, given here as `make train MAX_SAMPLES=50`, in the environment or in
# .env (precedence: command line > environment > .env > default). `make help` lists them all.
# Each command owns its mode and its checks (`python -m app <command> --help`): no logic here.
#
# Command-line variables reach the Python process through the environment (GNU make exports
# them), so this file defines no defaults of its own: app/config/settings.py is the single source.
#
# RUNTIME=docker runs each command in the image (docker-compose.yml, service `app`, built by
# `make setup`; CUDA=1 uses the CUDA image); RUNTIME=local runs it in .venv. The default is docker
# when a Docker engine and `docker compose` answer, else local. `make test` always runs the suite
# here in .venv (`make test-docker` runs it in the image).

SHELL := /bin/bash
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# the lint gate's pinned tools (requirements-dev.txt), added to .venv by the first `make lint`
DEV_STAMP := $(VENV)/.dev-installed
# help, clean and remove-run run here (not in a container), on the stdlib-only part of app/.
HOSTPY = $$( [ -x $(PY) ] && echo $(PY) || echo $(PYTHON) )

# ---- runtime: docker or local -------------------------------------------------------------------
ifeq ($(origin RUNTIME),undefined)
  # `docker info` fails at once when no engine listens; timeout only guards against a hung one.
  DOCKER_STATE := $(shell t=$$(command -v timeout >/dev/null && echo 'timeout 10'); \
	$$t docker info >/dev/null 2>&1 || { echo no-engine; exit; }; \
	$$t docker compose version >/dev/null 2>&1 || { echo no-compose; exit; }; echo ok)
  RUNTIME := $(if $(filter ok,$(DOCKER_STATE)),docker,local)
  RUNTIME_WHY := $(if $(filter ok,$(DOCKER_STATE)),a Docker engine answers,$(if $(filter no-compose,$(DOCKER_STATE)),\
	a Docker engine answers but `docker compose` is missing,no Docker engine answers)); RUNTIME=docker|local to choose
else
  RUNTIME_WHY := RUNTIME=$(RUNTIME) was given
endif
ifeq ($(filter $(RUNTIME),docker local),)
  $(error RUNTIME=$(RUNTIME): use RUNTIME=docker or RUNTIME=local)
endif
$(info runtime: $(RUNTIME) ($(RUNTIME_WHY)))

CUDA_ON := $(filter 1 true yes,$(CUDA))
COMPOSE := docker compose$(if $(CUDA_ON), -f docker-compose.yml -f docker-compose.cuda.yml)
IMAGE := chatglm-cpu-trainer:$(if $(CUDA_ON),cuda,cpu)
# Whom files written to data/ and models/ belong to: you (compose runs the container as UID:GID).
export UID := $(shell id -u)
export GID := $(shell id -g)

ifeq ($(RUNTIME),docker)
  # A rebuild keeps the base the image was built from (a mirror, scripts/make-base-image.sh's)
  # unless one is given here or in .env.
  BASE_VAR := $(if $(CUDA_ON),CUDA_BASE_IMAGE,BASE_IMAGE)
  ifeq ($(origin $(BASE_VAR))$(shell grep -s '^$(BASE_VAR)=' .env),undefined)
    $(BASE_VAR) := $(shell docker image inspect -f '{{index .Config.Labels "org.opencontainers.image.base.name"}}' $(IMAGE) 2>/dev/null)
    export $(BASE_VAR)
  endif
  # Every setting (named in the generated .env.template) given on the command line or in the
  # environment is copied into the container: `make train MAX_SAMPLES=100` means the same here.
  SETTINGS := $(shell sed -n 's/^# \([A-Z][A-Z0-9_]*\)=.*/\1/p' .env.template) HF_TOKEN HF_ENDPOINT HF_HUB_OFFLINE
  # MAKEFLAGS too: it lists the command line's assignments, which the app checks for misspelt names.
  FORWARD = $(strip $(foreach v,$(SETTINGS),$(if $(filter-out undefined,$(origin $(v))),-e $(v))) -e MAKEFLAGS)
  PYRUN = $(COMPOSE) run --rm $(FORWARD) --entrypoint python app
  # serve listens on 0.0.0.0:8000 inside; compose publishes it on the host's 127.0.0.1:SERVE_PORT
  SERVE_FORWARD = $(strip $(foreach v,$(filter-out SERVE_HOST SERVE_PORT,$(SETTINGS)),$(if $(filter-out \
	undefined,$(origin $(v))),-e $(v))) -e MAKEFLAGS)
  # webui listens on 0.0.0.0:7860 inside (so it needs WEBUI_AUTH); compose publishes it on 127.0.0.1:WEBUI_PORT
  WEBUI_FORWARD = $(strip $(foreach v,$(filter-out WEBUI_HOST WEBUI_PORT,$(SETTINGS)),$(if $(filter-out \
	undefined,$(origin $(v))),-e $(v))) -e MAKEFLAGS)
  SETUP := image
else
  ifneq ($(MEM_LIMIT)$(CPUS),)
    $(warning MEM_LIMIT/CPUS are container limits (RUNTIME=docker); here use MEMORY_LIMIT_MB=... and NUM_THREADS=...)
  endif
  PYRUN = $(PY)
  SETUP := $(STAMP)
endif
APP = $(PYRUN) -m app

.DEFAULT_GOAL := help
.PHONY: help setup setup-gguf image docker-engine data tiny-model info train predict predict-custom predict-file chat evaluate serve webui merge export-onnx export-gguf demo config test test-fast test-gpu lint test-docker bench-memory bench-data bench-scale bench-serve bench-onnx bench-infer clean remove-run distclean

##@ use: set up, train, and use what was trained
setup: $(SETUP) ## local: .venv, pinned (CPU torch unless an NVIDIA GPU answers); docker: the image

image: docker-engine
	$(COMPOSE) build setup
	@echo "image $(IMAGE): $$(( $$(docker image inspect -f '{{.Size}}' $(IMAGE)) / 1000000 )) MB"

docker-engine:
	@docker info >/dev/null 2>&1 || { echo "RUNTIME=docker: no Docker engine answers (docker info failed); start it (e.g. dockerd &) or use RUNTIME=local" >&2; exit 2; }
	@docker compose version >/dev/null 2>&1 || { echo "RUNTIME=docker: the docker compose plugin is missing; install it, or use RUNTIME=local" >&2; exit 2; }

$(STAMP): requirements.txt scripts/setup-venv.sh
	scripts/setup-venv.sh $(VENV) $(PYTHON)
	@touch $@

# order-only: a rebuilt .venv keeps the dev tools; a changed requirements-dev.txt reinstalls them
$(DEV_STAMP): requirements-dev.txt | $(STAMP)
	$(PY) -m pip install -q -r requirements-dev.txt
	@touch $@

setup-gguf: $(SETUP) ## optional, once: llama.cpp for export-gguf and INFER_BACKEND=llama.cpp
ifeq ($(RUNTIME),local)
	scripts/setup-gguf.sh $(VENV)
else
	@echo "setup-gguf: the image $(IMAGE) has llama.cpp already (its deps stage builds it)"
endif

data: setup ## synthetic sample data -> DATA_PATH and dev.jsonl beside it (never over your files)
	$(APP) generate-data

train: setup ## fine-tune MODEL_NAME on DATA_PATH -> OUTPUT_DIR (none at the default: sample data)
	$(APP) train

predict: setup ## answer the built-in triplet prompt with the last adapter
	$(APP) predict

predict-custom: setup ## answer PROMPT="..." with the last adapter
	$(APP) predict-custom

predict-file: setup ## predict every line of INPUT_FILE -> OUTPUT_FILE (.jsonl)
	$(APP) predict-file

chat: setup ## interactive chat with the last adapter
	$(APP) chat

evaluate: setup ## score the last adapter on its held-out data or EVAL_PATH; PREDICTIONS=file.jsonl
	$(APP) evaluate

serve: setup ## adapters under models/ as an OpenAI-compatible API on 127.0.0.1:SERVE_PORT
ifeq ($(RUNTIME),docker)
	$(COMPOSE) run --rm --service-ports $(SERVE_FORWARD) serve
else
	$(APP) serve
endif

webui: setup ## the web UI (train, watch, chat, evaluate, export) on http://127.0.0.1:WEBUI_PORT
ifeq ($(RUNTIME),docker)
	$(COMPOSE) run --rm --service-ports $(WEBUI_FORWARD) webui
else
	$(APP) webui
endif

merge: setup ## fold the last adapter into its base -> MERGED_DIR (loads without peft)
	$(APP) merge

export-onnx: setup ## merged model (merged first if needed) as ONNX -> ONNX_DIR, usable as ADAPTER_DIR
	$(APP) export-onnx

export-gguf: setup ## the run as one GGUF (GGUF_QUANT) + Ollama Modelfile -> GGUF_DIR
	$(APP) export-gguf

remove-run: ## delete one trained run, named: make remove-run OUTPUT_DIR=models/tiny-lora
	@$(HOSTPY) -m app remove-run

clean: ## delete tiny models, unchanged sample data and caches (never your data or runs)
	@$(HOSTPY) -m app clean

##@ inspect: what this machine can do, what a run would use, whether it learns
help: ## these targets by group, and every setting with its default
	@echo "usage: make <target> [VAR=value ...]    (python -m app <command> --help: one command)"
	@awk '/^##@ /{printf "\n%s\n", substr($$0, 5)} /^[a-z-]+:.*## /{printf "  %-15s %s\n", substr($$0, 1, index($$0, ":") - 1), substr($$0, index($$0, "## ") + 3)}' $(MAKEFILE_LIST)
	@echo
	@$(HOSTPY) -m app --help | sed -n '/^settings/,$$p'

info: setup ## detected RAM/CPUs/GPUs, the tier, every resolved setting, predicted peak memory
	$(APP) info

config: setup ## print the resolved settings
	$(APP) config

demo: setup ## offline proof of learning: a tiny GLM from scratch, held-out F1 -> bench/demo.md
	$(APP) demo

##@ develop: tests, benchmarks, tiny models
tiny-model: setup ## a random tiny model: MODEL_NAME=tiny|tiny-qwen2|tiny-qwen3|tiny-llama|tiny-gemma3
	$(APP) make-tiny-model

test: $(STAMP) ## the whole suite here in .venv, whatever RUNTIME is (CPU, tiny models, offline)
	$(PY) -m pytest -q

test-fast: $(STAMP) ## the edit loop: the suite without the tests marked slow (under a minute)
	$(PY) -m pytest -q -m "not slow"

test-gpu: $(STAMP) ## the GPU tier (tests/gpu), speed vs TRL -> bench/gpu.md; skips without CUDA
	$(PY) -m bench.bench_gpu

lint: $(DEV_STAMP) ## the gate CI runs first: ruff check, ruff format --check, mypy (pinned)
	$(PY) -m ruff check app tests bench scripts
	$(PY) -m ruff format --check app tests bench scripts
	$(PY) -m mypy

test-docker: image ## run the test suite inside the image
	$(COMPOSE) run --rm test

.PHONY: bench
bench: setup ## training speed vs the tutorial way, DPO vs TRL -> bench/results.md, bench/dpo.md
	$(PYRUN) -m bench.bench_speed
	$(PYRUN) -m bench.bench_dpo

bench-memory: setup ## predicted vs measured peak RSS, tokens/s, loss per quant level -> bench/memory.md
	$(PYRUN) -m bench.bench_memory

bench-data: setup ## read, sample and cache 1-16 GB JSONL: time, MB/s, peak RSS -> bench/data.md
	$(PYRUN) -m bench.bench_data

bench-scale: setup ## (Q)LoRA on random 6B/9B GLMs in 8/16 GB cgroups (root) -> bench/scale.md
	$(PYRUN) -m bench.bench_scale

bench-serve: setup ## serve at 1/4/16 clients, batched vs one at a time, ~100M model -> bench/serve.md
	$(PYRUN) -m bench.bench_serve

bench-onnx: setup ## generation tokens/s, ONNX Runtime vs PyTorch, ~100M random models -> bench/onnx.md
	$(PYRUN) -m bench.bench_onnx

bench-infer: setup-gguf ## tokens/s and RSS, torch vs llama.cpp GGUF, random 1.5B/6B (root) -> bench/infer.md
	$(PYRUN) -m bench.bench_infer

distclean: clean ## clean, and remove .venv (your data and trained runs stay)
	rm -rf $(VENV)
