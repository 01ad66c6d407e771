# SO8T /think pipeline. `make test` sets up .venv from nothing and runs the suite (what .ci/run calls).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
export PYTHONUNBUFFERED := 1

.PHONY: test lint venv
venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt scripts/install-llama-cpp.sh
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	scripts/install-llama-cpp.sh $(PY)
	touch $@

test: lint
	$(PY) -m pytest

lint: $(VENV)/.installed  ## ruff (lint + format check) over the repo, mypy on shared/ and services/
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# ---- the compose stack (a GPU box with Docker and the NVIDIA container toolkit) and the native demo -------------
# Settings live in .env (cp .env.example .env); compose reads it, make reads only the keys below from it.
COMPOSE ?= docker compose
env_get = $(shell sed -n 's/^$(1)=//p' .env 2>/dev/null | tail -n 1 | tr -d "\"'")
# the compose files: compose's own COMPOSE_FILE (colon-separated; command line, environment or .env), e.g.
# COMPOSE_FILE=compose.yaml:docker/compose.cpu.yaml for the CPU stack; unset: compose.yaml
COMPOSE_FILE ?= $(call env_get,COMPOSE_FILE)
ifneq ($(strip $(COMPOSE_FILE)),)
export COMPOSE_FILE
endif
DATA_DIR ?= $(or $(call env_get,DATA_DIR),./data)
REGISTRY ?= $(call env_get,REGISTRY)
# like compose: the shell's environment first, then .env, then the default; the profile names the run (its run_id)
export SO8T_PROFILE ?= $(or $(call env_get,SO8T_PROFILE),full)
RUN_ID := $(shell sed -n 's/^run_id: *//p' configs/pipeline/$(SO8T_PROFILE).yaml)
# paths on the data volume, from shared/layout.py (stdlib only: no venv needed)
LAYOUT = python3 -m shared.layout --data-dir "$(DATA_DIR)" --run-id "$(RUN_ID)"
# BUILD=0 (pipeline, up, one stage): use the images on the engine as they are (make pull), build and pull nothing;
# a missing image stops the target before anything starts, named
BUILD ?= 1
# make push writes the pushed digests here; make pull pins the images it lists to them (copy it to the other box)
IMAGES_LOCK ?= $(or $(call env_get,IMAGES_LOCK),images.lock)
# extra arguments for one stage (make train ARGS="--max-steps 50"), one service for logs/build (SERVICE=trainer)
ARGS ?=
SERVICE ?=
# stages run as the invoking user, so their files on the bind-mounted data folder are the user's
export SO8T_UID ?= $(or $(call env_get,SO8T_UID),$(shell id -u))
export SO8T_GID ?= $(or $(call env_get,SO8T_GID),$(shell id -g))
PIPELINE := $(COMPOSE) --profile pipeline
# one stage alone: no pipeline id (any upstream manifest counts), no waiting (a missing upstream fails at once)
STAGE_RUN := $(PIPELINE) run --rm --no-deps -e SO8T_PIPELINE_ID= -e SO8T_WAIT_TIMEOUT=0
UP_BUILD = $(if $(filter 0,$(BUILD)),--no-build,--build)
# scripts/images.sh with a compose command: $(call IMAGES,$(PIPELINE)) check|push|pull
IMAGES = SO8T_COMPOSE="$(1)" REGISTRY="$(REGISTRY)" IMAGES_LOCK="$(IMAGES_LOCK)" scripts/images.sh
# with BUILD=0, a recipe's first line: the images of $(2) (every service of $(1) when empty) are all there
NEED_IMAGES = $(if $(filter 0,$(BUILD)),@$(call IMAGES,$(1)) check $(2),)

.PHONY: help pipeline up down logs ps build push pull demo rehearsal data-dir secrets dataset train bake convert import images-cpu stack-test deploy-test

help:  ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | expand -t 12

secrets:  ## the think API's server secret and API key (./secrets, 0600) and its audit folders, when absent
	@scripts/secrets.sh

data-dir:  ## create the data folder (so Docker does not create it as root); seed the example input if empty
	@host="$${DOCKER_HOST:-$$(docker context inspect --format '{{.Endpoints.docker.Host}}' 2>/dev/null)}"; \
	case "$$host" in ssh://*|tcp://*) \
	  echo ">> Docker engine at $$host: DATA_DIR=$(DATA_DIR) is a folder on that machine; create it there," \
	       "writable by uid $(SO8T_UID), with the input in $(DATA_DIR)/input/four_class"; exit 0;; esac; \
	input="$$($(LAYOUT) input)"; mkdir -p "$$input"; \
	if ! ls "$$input"/*.jsonl >/dev/null 2>&1; then \
	  cp examples/four_class/*.jsonl "$$input/"; \
	  echo ">> $$input was empty: copied the example set (examples/four_class) there"; \
	fi

pipeline: data-dir secrets  ## the whole chain in containers; follows the logs until the Ollama import + smoke test (else eval) ends
	$(call NEED_IMAGES,$(PIPELINE))
	@export SO8T_PIPELINE_ID="$$(date -u +%Y%m%dT%H%M%SZ)"; \
	echo ">> pipeline $$SO8T_PIPELINE_ID: data in $(DATA_DIR), profile $(SO8T_PROFILE) (run $(RUN_ID))" \
	     "(Ctrl-C stops following the logs, not the stack: make down stops it)"; \
	$(PIPELINE) up --detach $(UP_BUILD) || exit $$?; \
	stages="$$($(PIPELINE) config --services 2>/dev/null | grep -vx -e ollama -e think-api | tr '\n' ' ')"; \
	last=ollama-import; case " $${stages:-ollama-import} " in *" ollama-import "*) ;; *) last=eval;; esac; \
	$(PIPELINE) logs --follow $$stages & logs=$$!; \
	rc=$$(docker wait "$$($(PIPELINE) ps --all --quiet $$last)") || rc=1; \
	kill $$logs 2>/dev/null; wait $$logs 2>/dev/null; \
	run="$$($(LAYOUT) run)"; echo; ls -1 "$$run"/*/manifest.json "$$run"/train/final/manifest.json 2>/dev/null; \
	if [ "$$rc" = 0 ]; then \
	  echo ">> pipeline $$SO8T_PIPELINE_ID done: artifacts under $$run/, /think served by think-api (make ps)"; \
	else \
	  echo ">> $$last exited $$rc (its restart policy may retry it): make ps, make logs SERVICE=<stage>"; \
	fi; exit $$rc

up: data-dir secrets  ## ollama + think-api only: serve what was imported
	$(call NEED_IMAGES,$(COMPOSE))
	$(COMPOSE) up --detach $(UP_BUILD)

down:  ## stop and remove every container of the stack (the data folder stays)
	$(PIPELINE) down

logs:  ## follow the logs (SERVICE=trainer for one)
	$(PIPELINE) logs --follow --tail 200 $(SERVICE)

ps:  ## containers of the stack and each stage's finish marker
	$(PIPELINE) ps --all
	@for f in "$$($(LAYOUT) stack)"/*.json; do [ -f "$$f" ] && echo "$$f: $$(tr -d '\n ' < "$$f" | cut -c1-160)"; done; true

build:  ## build the three images (cuda, converter, think-api)
	$(PIPELINE) build $(SERVICE)

push:  ## build (BUILD=0: as they are) and push the images to REGISTRY (from .env); digests to IMAGES_LOCK
	@test -n "$(REGISTRY)" || { echo "make push: set REGISTRY=<registry>/<namespace> in .env (images become \$$REGISTRY/so8t-cuda etc.)"; exit 2; }
	$(if $(filter 0,$(BUILD)),,REGISTRY="$(REGISTRY)" $(PIPELINE) build)
	$(call IMAGES,$(PIPELINE)) push

pull:  ## on another box: pull the images make push pushed (pinned by IMAGES_LOCK), then make pipeline BUILD=0
	@test -n "$(REGISTRY)" || { echo "make pull: set REGISTRY in .env to where make push put the images"; exit 2; }
	$(call IMAGES,$(PIPELINE)) pull

dataset: data-dir  ## one stage in its container: the dataset builder (ARGS="..." are appended)
	$(call NEED_IMAGES,$(PIPELINE),dataset)
	$(STAGE_RUN) dataset $(ARGS)

train: data-dir  ## one stage: the trainer (resumes from its newest checkpoint; ARGS="--fresh" starts over)
	$(call NEED_IMAGES,$(PIPELINE),trainer)
	$(STAGE_RUN) trainer $(ARGS)

bake: data-dir  ## one stage: the baker
	$(call NEED_IMAGES,$(PIPELINE),baker)
	$(STAGE_RUN) baker $(ARGS)

convert: data-dir  ## one stage: the GGUF converter
	$(call NEED_IMAGES,$(PIPELINE),converter)
	$(STAGE_RUN) converter $(ARGS)

import: data-dir  ## one stage: import the GGUFs into the ollama service and run the /think smoke test
	$(call NEED_IMAGES,$(PIPELINE),ollama-import ollama)
	$(PIPELINE) run --rm -e SO8T_PIPELINE_ID= -e SO8T_WAIT_TIMEOUT=0 ollama-import $(ARGS)

# the real Phi-3.5 tokenizer (a directory or the hub id) for the full-size rehearsal
TOKENIZER ?= ../shared/fixtures/phi35-tokenizer

rehearsal: $(VENV)/.installed  ## every stage at Phi-3.5-mini size on the CPU, one table (bench/full_size.py; ~1.5 h, 30 GB disk)
	$(PY) bench/full_size.py --tokenizer "$(TOKENIZER)" $(ARGS)

demo: $(VENV)/.installed  ## no Docker, no GPU: the same chain natively on a tiny random Phi-3, in minutes
	$(VENV)/bin/so8t pipeline --config configs/pipeline/tiny.yaml $(ARGS)

# ---- the CPU stack (no GPU): the same images and compose file, run for real in a private Docker engine ----------
images-cpu: $(VENV)/.installed  ## build the CPU stack's images from nothing (root; Debian's docker.io + debootstrap)
	scripts/images-cpu.sh $(PY)

stack-test: $(VENV)/.installed  ## the stack end to end with a power cut and an orderly shutdown while training
	$(PY) -m pytest tests/test_stack_e2e.py -v -s

deploy-test: $(VENV)/.installed  ## the stack to a second engine: registry push/pull, one stage, make up over ssh
	$(PY) -m pytest tests/test_deploy_e2e.py -v -s
