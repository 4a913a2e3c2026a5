# The two commands of the README:
#   make run    set everything up, then `dvc repro` (default preset)
#   make test   set everything up, then the test suite
# Set-up is idempotent: a virtual environment in .venv, the Debian packages
# KenLM's build needs (installed when run as root), and KenLM's lmplz and
# build_binary compiled once per machine into ~/.cache/lm-baselines.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Offline mirror of the corpora (see README). A sibling shared/corpora, when present,
# is used by default; set LMB_MIRROR= (empty) to download from the canonical URLs.
LMB_MIRROR ?= $(wildcard $(abspath ../shared/corpora))
export LMB_MIRROR

DEBIAN_PACKAGES := cmake g++ make libboost-program-options-dev libboost-system-dev \
	libboost-thread-dev libboost-test-dev zlib1g-dev libbz2-dev liblzma-dev

.PHONY: setup system-deps kenlm run test lint ui clean

setup: $(VENV)/.installed kenlm

system-deps:
	@missing=$$(for p in $(DEBIAN_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages: $$missing"; \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	  else \
	    echo "KenLM's build needs these Debian packages; install them as root:"; \
	    echo "  sudo apt-get install $$missing"; exit 1; \
	  fi; \
	fi

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

kenlm: system-deps $(VENV)/.installed
	@$(BIN)/python -m pipeline.kenlm_tools > /dev/null

run: setup
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc repro
	@cat reports/leaderboard.md

test: setup
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check pipeline tests

# MLflow UI on the local store, loopback only.
ui: setup
	$(BIN)/mlflow ui --backend-store-uri $${MLFLOW_TRACKING_URI:-sqlite:///mlflow.db} \
		--host 127.0.0.1 --port $${PORT:-5000}

clean:
	rm -rf data models reports/metrics mlflow.db mlruns
