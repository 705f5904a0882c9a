# make demo   - build the toy world and run the 3-process PADD skeleton on CPU
# make test   - the whole test suite
# Both create .venv and install everything on first use.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export DS_ACCELERATOR ?= cpu
export OMP_NUM_THREADS ?= 1
export PYTHONUNBUFFERED := 1

.PHONY: demo test install clean

$(STAMP): requirements.txt setup.py
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/padd demo

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf runs .pytest_cache
