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

.PHONY: setup system-deps browser-deps kenlm run test regression regression-baseline lint ui \
	screenshots reproduce-small reproduce-medium reproduce-wlm reproduce-wlm40 clean \
	converged-window converged-rnn converged-gru converged-lstm exp team-server-deps team-server-test push pull

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

# Headless Chromium for the UI checks (tests/ui_check.py).
browser-deps:
	@if ! command -v chromium >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian's chromium (for the browser checks)"; \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; \
	  else \
	    echo "the browser checks need Chromium; install it as root: sudo apt-get install chromium"; \
	    exit 1; \
	  fi; \
	fi

kenlm: system-deps $(VENV)/.installed
	@$(BIN)/python -m pipeline.kenlm_tools > /dev/null

# Prints the wall time of every stage group at the end and writes it to
# reports/timings.json (pipeline/timings.py; the set-up group counts from here).
run:
	@start=$$(date +%s); $(MAKE) --no-print-directory setup && \
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pipeline.timings --since $$start \
	  --out reports/timings.json -- $(BIN)/dvc repro
	@cat reports/leaderboard.md

# `dvc exp run` with the virtual environment first on PATH, so that the stages' `python`
# is the one with the pinned dependencies: make exp ARGS='-S train.preset=small'
exp: setup
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc exp run $(ARGS)

test: setup browser-deps
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest

# The CI regression alone (also part of `make test`): the small pipeline against
# tests/regression_baseline.json. After an intended change of numbers, rewrite the
# baseline with `make regression-baseline`, review the diff and commit it.
regression: setup
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m tests.regression

regression-baseline: setup
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m tests.regression --update

# The committed reproductions, through the pipeline's own prepare and train stages, each
# under its preset, writing reports/reproductions/<name>/{metrics,curve}.json:
#   reproduce-small   Zaremba et al. 2014 "small" (PTB 2 x 200 LSTM, 13 epochs): about 30
#                     minutes on a 2-core CPU
#   reproduce-medium  Zaremba et al. 2014 "medium" (2 x 650, 39 epochs): about 3 minutes on
#                     one H200 GPU (hours on a CPU)
#   reproduce-wlm     PyTorch's word_language_model, `--epochs 6 --tied` (2 x 200): about 25
#                     minutes on a 2-core CPU
#   reproduce-wlm40   the same, `--epochs 40 --tied`: about 70 minutes on a 2-core CPU (bf16)
# then the page of the committed reproductions, reports/reproductions/leaderboard.md
# ("ours - published" under each paper's selection protocol, pipeline/references.py).
REPRO_small := zaremba-small
REPRO_medium := zaremba-medium
REPRO_wlm := wlm-tied-6ep
REPRO_wlm40 := wlm-tied-40ep
# One committed run: $(call reproduce,<preset>,<model>,<run name>)
define reproduce
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc repro prepare@ptb
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pipeline.stages.train --preset $(1) \
	  --corpus ptb --model $(2) --data data/prepared/ptb \
	  --checkpoints models/reproductions/$(3).ckpt \
	  --out models/reproductions/$(3).pt \
	  --metrics reports/reproductions/$(3)/metrics.json \
	  --curve reports/reproductions/$(3)/curve.json
	$(BIN)/python -m pipeline.stages.leaderboard --reproductions reports/reproductions \
	  --out-md reports/reproductions/leaderboard.md
endef
reproduce-small reproduce-medium reproduce-wlm reproduce-wlm40: reproduce-%: setup
	$(call reproduce,$*,lstm2,$(REPRO_$*))

# The converged runs (README, "Converged runs"): each one-layer model on PTB under the
# `converged` preset (lr / 4 after an epoch that gains under 1%; the 4th such epoch ends
# the run), committed as reports/reproductions/ptb-<model>-converged/; tens of minutes
# each on a 2-core CPU.
# Interrupted, the same command resumes exactly from the last resume point.
converged-window converged-rnn converged-gru converged-lstm: converged-%: setup
	$(call reproduce,converged,$*,ptb-$*-converged)

lint: setup
	$(BIN)/ruff check pipeline tests

# A team's tracking server (notes in the README, "scaling out"): tests/test_team_server.py
# starts a real PostgreSQL server (Debian's postgresql, installed here when run as root)
# and `mlflow server --app-name basic-auth` on it, checks that it refuses anonymous and
# wrong logins and a reader's writes, runs the tiny pipeline into it as a writer and checks
# every run and metric history through the REST API. 2 to 3 minutes on 2 cores, so
# `make test` (CI) skips it unless LMB_TEAM_SERVER=1; this target runs it.
team-server-deps:
	@if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian's postgresql (for the team tracking server's test)"; \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql; \
	  else \
	    echo "the team server's test needs PostgreSQL; install it as root: sudo apt-get install postgresql"; \
	    exit 1; \
	  fi; \
	fi

team-server-test: setup team-server-deps
	PATH="$(abspath $(BIN)):$$PATH" LMB_TEAM_SERVER=1 $(BIN)/python -m pytest -p no:randomly \
	  tests/test_team_server.py

# Shared DVC storage (a remote set once with `dvc remote add -d ...`; see the README): send
# this checkout's cached outputs (corpora, n-gram binaries, models) to it, or fetch them
# on another machine instead of rebuilding them (`make pull run` reruns nothing).
push: setup
	$(BIN)/dvc push

pull: setup
	$(BIN)/dvc pull

# MLflow UI on the local store, loopback only.
ui: setup
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pipeline.tracking_admin --port $${PORT:-5000}

# Screenshots of the MLflow runs table and reports/leaderboard.html, from this checkout's store.
screenshots: setup browser-deps
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m tests.ui_check --out reports/screenshots

clean:
	rm -rf data models reports/metrics mlflow.db mlflow.db.lock mlruns
