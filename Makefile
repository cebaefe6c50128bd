# The two commands of the README: `make run` (ingest a release) and `make test`. Both install
# exactly the versions of requirements.lock (the set the suite passed with), hashes checked.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RELEASE ?=
LOCK := requirements.lock
# The lock pins a CPU build of torch (torch==2.13.0+cpu), which keeps the install small: pip finds it
# in this machine's wheel folder, or on the PyTorch CPU index:
# `make run TORCH_INDEX=https://download.pytorch.org/whl/cpu`.
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
# uv (used by `make lock`) does not read pip's configuration: the same wheel folders and indexes, from it.
PIP_SOURCES = $(foreach link,$(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null),--find-links $(link)) \
	$(foreach index,$(shell $(PYTHON) -m pip config get global.extra-index-url 2>/dev/null),--extra-index-url $(index))

export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DO_NOT_TRACK ?= true

.PHONY: run test test-latest lock bench server-up server-down stack-up stack-down stack-status clean

$(BIN)/.installed: pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --require-hashes -r $(LOCK) $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $@

# Re-resolve the lock from pyproject.toml's ranges (after changing a dependency, or to take upstream
# fixes); then `make test` on it before committing it. Resolved for Linux x86_64, CPython 3.11.
TOOLS := $(VENV)-tools/bin
lock:
	test -x $(TOOLS)/python || $(PYTHON) -m venv $(VENV)-tools
	$(TOOLS)/python -m pip install --quiet "uv>=0.13"
	$(TOOLS)/uv pip compile pyproject.toml --extra test --python-version 3.11 --generate-hashes \
		--override .torch-cpu.txt --index-strategy unsafe-best-match $(PIP_SOURCES) \
		$(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) --custom-compile-command "make lock" -o $(LOCK)

run: $(BIN)/.installed
	$(BIN)/docsrag ingest $(if $(RELEASE),--release "$(RELEASE)")

# The page test drives Debian's chromium through playwright (playwright's own browser download
# fails on these machines): installed here when missing, as root or through sudo.
CHROMIUM ?= /usr/bin/chromium
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

$(CHROMIUM):
	$(SUDO) apt-get install -y chromium || ($(SUDO) apt-get update && $(SUDO) apt-get install -y chromium)

# The terminal test (tests/integration/cli/test_first_hour.py) runs `docsrag ingest` in a real terminal: tmux.
TMUX_BIN ?= /usr/bin/tmux

$(TMUX_BIN):
	$(SUDO) apt-get install -y tmux || ($(SUDO) apt-get update && $(SUDO) apt-get install -y tmux)

# Two workers, a test module each at a time (its shared index and servers stay in one process):
# most tests wait on servers they started, so two share 2 cores well (16 min, not 28, on one).
PYTEST_ARGS ?= -n 2 --dist loadfile

test: $(BIN)/.installed $(CHROMIUM) $(TMUX_BIN)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The suite against the newest versions pyproject.toml's ranges allow, in a venv of its own: run it
# weekly and before `make lock`, so the next upstream break is found here, not by a user.
LATEST := $(VENV)-latest/bin
test-latest: $(CHROMIUM) $(TMUX_BIN)
	test -x $(LATEST)/python || $(PYTHON) -m venv $(VENV)-latest
	$(LATEST)/python -m pip install --quiet --upgrade pip
	$(LATEST)/python -m pip install --quiet "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	# torch stays the CPU build named here: the newest torch is a CUDA build of gigabytes.
	$(LATEST)/python -m pip install --quiet --upgrade --upgrade-strategy eager -e ".[test]" "$(TORCH_SPEC)"
	DOCSRAG_TEST_LATEST=1 $(LATEST)/python -m pytest $(PYTEST_ARGS)

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
	rm -rf $(VENV) $(VENV)-latest $(VENV)-tools .docsrag
