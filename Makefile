# The two commands of the README: `make run` (ingest a release) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RELEASE ?=
# A CPU build of torch keeps the install small; on a machine with the PyTorch CPU index
# reachable, `make run TORCH_INDEX=https://download.pytorch.org/whl/cpu` does the same.
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=

export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DO_NOT_TRACK ?= true

.PHONY: run test bench clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

run: $(BIN)/.installed
	$(BIN)/docsrag ingest $(if $(RELEASE),--release "$(RELEASE)")

test: $(BIN)/.installed
	$(BIN)/python -m pytest

bench: $(BIN)/.installed
	$(BIN)/python bench/ingest.py --release "$(or $(RELEASE),../shared/data/releases/milvus_docs_2.4.x_en.zip)"

clean:
	rm -rf $(VENV) .docsrag
