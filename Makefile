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

.PHONY: run test bench server-up server-down stack-up stack-down stack-status clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

run: $(BIN)/.installed
	$(BIN)/docsrag ingest $(if $(RELEASE),--release "$(RELEASE)")

# The page test drives Debian's chromium through playwright (playwright's own browser download
# fails on these machines): installed here when missing, as root or through sudo.
CHROMIUM ?= /usr/bin/chromium
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

$(CHROMIUM):
	$(SUDO) apt-get install -y chromium || ($(SUDO) apt-get update && $(SUDO) apt-get install -y chromium)

test: $(BIN)/.installed $(CHROMIUM)
	$(BIN)/python -m pytest

bench: $(BIN)/.installed
	$(BIN)/python bench/ingest.py --release "$(or $(RELEASE),../shared/data/releases/milvus_docs_2.4.x_en.zip)"

# Prefect's own server kept in the background (UI at the address it prints). `docsrag` commands with no
# PREFECT_API_URL start it themselves when none runs (DOCSRAG_PREFECT_SERVER=kept, the default);
# `server-down` stops it and waits until its process is gone.
server-up: $(BIN)/.installed
	$(BIN)/docsrag server start

server-down:
	$(BIN)/docsrag server stop

# The local real stack (infra/local/stack.py): S3, Milvus server, Prefect server on PostgreSQL, worker.
# `source $(DOCSRAG_HOME)/stack.env` afterwards (default .docsrag/stack.env). STACK_ARGS=--free-ports etc.
stack-up: $(BIN)/.installed
	$(BIN)/python infra/local/stack.py up $(STACK_ARGS)

stack-down:
	$(BIN)/python infra/local/stack.py down $(STACK_ARGS)

stack-status:
	$(BIN)/python infra/local/stack.py status $(STACK_ARGS)

clean:
	-test -x $(BIN)/docsrag && $(BIN)/docsrag server stop
	rm -rf $(VENV) .docsrag
