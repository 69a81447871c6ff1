# headrace: `make up` runs the local stack, `make test` runs every check CI runs.
VENV   ?= .venv
PYTHON ?= python3
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.headrace-installed
LLM_STAMP := $(VENV)/.headrace-llm
BENCH_STAMP := $(VENV)/.headrace-bench
SD_STAMP := $(VENV)/.headrace-sd
# torch first, on its own: then diffusers finds its requirement met. Left to diffusers' resolver,
# pip picks a multi-GB CUDA build. GPU hosts: make install-sd TORCH_SPEC='torch==2.13.0' with
# PIP_INDEX_URL pointing at the CUDA wheels they want.
TORCH_SPEC ?= torch==2.13.0
# llama-cpp-python 0.3.36 has no wheel and builds from source (~6 min on 2 cores).
# GGML_NATIVE=OFF with explicit AVX2/FMA/F16C: the default native build crashes
# (general-protection fault in libggml-cpu) on VMs whose CPU reports AMX it may not use.
# GPU hosts: make install-llm LLAMA_CMAKE_ARGS="-DGGML_CUDA=on"
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON

.PHONY: up test install install-llm install-sd install-bench llama-server lint typecheck unit schemas bench loadtest loadtest-smoke soak clean FORCE

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --progress-bar on --upgrade pip

# Reinstalls when pyproject.toml changes.
$(STAMP): pyproject.toml | $(BIN)/python
	@echo "installing headrace and its dev tools into $(VENV) ..."
	$(BIN)/pip install --progress-bar on -e '.[dev]'
	touch $@

install: $(STAMP)

# --no-cache-dir: pip caches a built wheel by version, not by CMAKE_ARGS, so a
# wheel cached from an earlier default (crashing) build would be reused silently.
# Once installed, pip sees the requirement met and builds nothing, so re-running
# this (after a pyproject.toml change) costs seconds, not a rebuild.
$(LLM_STAMP): $(STAMP)
	@echo "building llama-cpp-python from source (about 6 minutes on 2 cores) ..."
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/pip install --progress-bar on --no-cache-dir \
		'llama-cpp-python>=0.3.36,<0.4'
	$(BIN)/pip install --progress-bar on -e '.[llm]'
	touch $@

install-llm: $(LLM_STAMP)

# The image worker: torch, diffusers, transformers, pillow (the ``sd`` extra).
$(SD_STAMP): $(STAMP)
	@echo "installing torch, then diffusers and transformers ..."
	$(BIN)/pip install --progress-bar on '$(TORCH_SPEC)'
	$(BIN)/pip install --progress-bar on -e '.[sd]'
	touch $@

install-sd: $(SD_STAMP)

# llama_cpp.server's dependencies, for `headrace bench llm` (after llama-cpp-python's own build).
$(BENCH_STAMP): $(LLM_STAMP)
	$(BIN)/pip install --progress-bar on -e '.[bench]'
	touch $@

install-bench: $(BENCH_STAMP)

# llama.cpp's own server, the peer row of `headrace bench llm` (not part of `make test`). Built
# from the llama.cpp that llama-cpp-python's source distribution vendors (the version installed
# in $(VENV), else LLAMA_SERVER_VERSION), with the engine's cmake flags, as a static binary in
# $(PEER_DIR)/bin. About 6 minutes on 2 cores; a second run builds nothing unless the version or
# flags changed. GPU hosts: make llama-server LLAMA_CMAKE_ARGS="-DGGML_CUDA=on"
PEER_DIR ?= .cache/llama-server
LLAMA_SERVER_VERSION ?= $(shell $(BIN)/python -c "import importlib.metadata as m; print(m.version('llama_cpp_python'))" 2>/dev/null || echo 0.3.36)
PEER_CMAKE_ARGS = $(LLAMA_CMAKE_ARGS) -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
	-DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
	-DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_OPENSSL=OFF
PEER_SRC := $(PEER_DIR)/src/llama_cpp_python-$(LLAMA_SERVER_VERSION)
PEER_JOBS ?= $(shell nproc 2>/dev/null || echo 2)

# Rewritten only when the version or the flags change, so the binary rebuilds exactly then.
$(PEER_DIR)/build-config: FORCE
	@mkdir -p $(PEER_DIR)
	@echo '$(LLAMA_SERVER_VERSION) $(PEER_CMAKE_ARGS)' | cmp -s - $@ 2>/dev/null \
		|| echo '$(LLAMA_SERVER_VERSION) $(PEER_CMAKE_ARGS)' > $@

$(PEER_SRC)/vendor/llama.cpp/CMakeLists.txt: | $(BIN)/python
	@echo "downloading llama-cpp-python $(LLAMA_SERVER_VERSION)'s source distribution ..."
	@mkdir -p $(PEER_DIR)/src
	$(BIN)/pip download --progress-bar on --no-binary :all: --no-deps \
		'llama-cpp-python==$(LLAMA_SERVER_VERSION)' -d $(PEER_DIR)/src
	tar -xzf $(PEER_DIR)/src/llama_cpp_python-$(LLAMA_SERVER_VERSION).tar.gz -C $(PEER_DIR)/src
	touch $@

$(PEER_DIR)/bin/llama-server: $(PEER_DIR)/build-config $(PEER_SRC)/vendor/llama.cpp/CMakeLists.txt
	@echo "building llama-server from llama.cpp in llama-cpp-python $(LLAMA_SERVER_VERSION) ..."
	cmake -S $(PEER_SRC)/vendor/llama.cpp -B $(PEER_DIR)/build $(PEER_CMAKE_ARGS)
	cmake --build $(PEER_DIR)/build --target llama-server -j $(PEER_JOBS)
	@mkdir -p $(PEER_DIR)/bin
	cp $(PEER_DIR)/build/bin/llama-server $@
	@echo "built $@ (headrace bench llm finds it there)"

llama-server: $(PEER_DIR)/bin/llama-server

up: install install-llm install-sd
	$(BIN)/headrace up

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install install-llm install-sd
	$(BIN)/mypy

unit: install install-llm install-sd install-bench
	HF_HUB_OFFLINE=1 $(BIN)/pytest

test: lint typecheck unit

# Regenerate schemas/json/ after changing the contract (a test fails while they are stale).
schemas: install
	$(BIN)/python -m schemas.jsonschema

# Every benchmark in one invocation: the echo pipeline and edge, SmolLM2 side by side, tiny-sd
# in-process versus headrace and the object store (about 8 minutes on 2 cores).
bench: install install-bench install-sd
	$(BIN)/headrace bench all

# Against a running `make up`: 16 users for 30 s; fails on >1 % errors or p95 TTFT > 1 s.
loadtest: install
	$(BIN)/python loadtests/run.py

# A 3-second locust run against a private edge and echo worker, with its thresholds checked.
loadtest-smoke: install
	$(BIN)/pytest -m loadtest

# Locust for SOAK_S seconds (default 30 min) while workers are SIGKILLed every ~20 s and
# nats-server restarted every ~5 min; writes bench-results/soak.{json,md,png}. Fails on a lost
# job, a disallowed 5xx or wrong text.
SOAK_S ?= 1800
soak: install
	$(BIN)/python loadtests/soak.py --duration-s $(SOAK_S)

clean:
	rm -rf .headrace bench-results .pytest_cache .mypy_cache .ruff_cache .hypothesis
