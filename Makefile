# make demo   - build the toy models and run the 3-process PADD skeleton on CPU
# make test   - the whole test suite
# Both create .venv and install everything on first use.
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

.PHONY: demo test install clean

$(STAMP): requirements.txt setup.py
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt
	$(BIN)/pip install --quiet --no-deps -e .
	# Build DeepSpeed's CPU shared-memory comm op now, once, rather than racing in the first run.
	$(BIN)/python -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/padd demo

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf runs .pytest_cache
