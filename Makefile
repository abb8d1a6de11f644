# aelab: every target creates or reuses .venv and installs the project first.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.aelab-installed
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
UI_PORT ?= 5000
# `make server`: an MLflow tracking server (REST API + UI); stages log to it when
# MLFLOW_TRACKING_URI=http://127.0.0.1:$(SERVER_PORT). Loopback only unless SERVER_HOST is set
# (e.g. 0.0.0.0; host names other than localhost and private IPs also need --allowed-hosts in
# SERVER_OPTS). A team sets BACKEND_URI=postgresql://user@host/db (the server needs psycopg2)
# and SERVER_ARTIFACTS to shared storage (e.g. s3://bucket/aelab); the server proxies artifacts,
# so clients need no storage credentials. The default store is its own, in SERVER_DIR (default
# .aelab/server, git-ignored), not mlflow.db: runs there keep artifacts at this machine's file
# paths, and an experiment made through a server gets mlflow-artifacts:/ paths that a stage
# logging to mlflow.db directly cannot write. Port 5001: `make ui` (5000) can run beside it.
SERVER_HOST ?= 127.0.0.1
SERVER_PORT ?= 5001
SERVER_DIR ?= $(CURDIR)/.aelab/server
BACKEND_URI ?= sqlite:///$(SERVER_DIR)/mlflow.db
SERVER_ARTIFACTS ?= $(SERVER_DIR)/artifacts
# More `mlflow server` options, e.g. SERVER_OPTS="--workers 4 --allowed-hosts mlflow.lab.org"
SERVER_OPTS ?=
# Training repeats of the demo: two, so every cell shows mean ± std; `make demo DEMO_SEEDS=[0]`
# is the quicker single-seed run.
DEMO_SEEDS ?= [0,1]

# The demo: the same DAG, stages and table on the built-in `shapes` dataset with small settings,
# applied the DVC way as experiment overrides on top of params.yaml. Chosen from measured learning
# curves (benchmarks/curves.py) to train 2 seeds x 6 variants x 5 modes on 2 CPU
# cores (the seeds in two workers): 9-24 minutes, with the machine's speed that day (README
# "Demo" gives the measured times and the reason for each departure from the committed
# settings).
DEMO_SET := \
	-S dataset=shapes -S "seeds=$(DEMO_SEEDS)" -S data.shapes_train=6000 -S data.shapes_test=1000 \
	-S "variants.fc_l1.model.hidden=[384,192,96]" -S "variants.fc_l2.model.hidden=[384,192,96]" \
	-S variants.fc_l1.pretrain.epochs=10 -S variants.fc_l2.pretrain.epochs=10 \
	-S variants.fc_l1.pretrain.lr=1e-3 -S variants.fc_l2.pretrain.lr=1e-3 \
	-S ++variants.fc_l1.pretrain.schedule=cosine -S ++variants.fc_l2.pretrain.schedule=cosine \
	-S ++variants.fc_l1.classify.lr=1e-3 -S ++variants.fc_l2.classify.lr=1e-3 \
	-S ++variants.fc_l1.classify.epochs=40 -S ++variants.fc_l2.classify.epochs=40 \
	-S "variants.conv_192.model.channels=[16,32,48,48]" \
	-S "variants.conv_256.model.channels=[16,32,64,64]" \
	-S variants.conv_192.pretrain.epochs=8 -S variants.conv_256.pretrain.epochs=8 \
	-S variants.conv_192.pretrain.lr=2e-3 -S variants.conv_256.pretrain.lr=2e-3 \
	-S variants.conv_192.pretrain.batch_size=128 -S variants.conv_256.pretrain.batch_size=128 \
	-S ++variants.conv_192.pretrain.schedule=cosine -S ++variants.conv_256.pretrain.schedule=cosine \
	-S variants.mae.model.patch_size=8 -S variants.mae.model.dim=64 -S variants.mae.model.depth=2 \
	-S variants.mae.model.heads=4 -S variants.mae.model.decoder_dim=64 \
	-S variants.mae.model.decoder_depth=1 -S variants.mae.model.decoder_heads=2 \
	-S variants.mae.model.norm_pix_loss=true -S variants.mae.model.pool=mean \
	-S variants.mae.pretrain.epochs=12 -S variants.mae.pretrain.batch_size=128 \
	-S variants.mae.pretrain.lr=1.5e-3 -S variants.mae.pretrain.warmup_epochs=2 \
	-S ++variants.mae.classify.epochs=44 -S variants.mae.classify.lr=1e-3 \
	-S variants.mae.classify.warmup_epochs=2 \
	-S "variants.mconv.model.channels=[16,32,64]" -S variants.mconv.model.blocks=1 \
	-S ++variants.mconv.model.stem_stride=2 -S variants.mconv.pretrain.epochs=8 \
	-S variants.mconv.pretrain.batch_size=128 -S variants.mconv.pretrain.warmup_epochs=1 \
	-S ++variants.mconv.classify.epochs=24 -S variants.mconv.classify.lr=6e-3 \
	-S variants.mconv.classify.warmup_epochs=2 \
	-S classify.epochs=24 -S classify.lr=2e-3 -S classify.warmup_epochs=4 \
	-S ++classify.probe.epochs=60 -S runtime.seed_workers=2

.PHONY: help setup demo repro ui server test bench

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | expand -t 14

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

EMPTY_DIR_MD5 := d751713988987e9331980363e24189ce.dir

setup: $(STAMP)  ## create or reuse .venv and install the project with dev extras (idempotent)
	@# data/external is tracked by data.dvc; a fresh clone has none. While data.dvc records the
	@# empty folder, create it and put its (empty) listing in the DVC cache; otherwise the data
	@# lives in a DVC remote: `dvc pull data.dvc`.
	@if [ ! -d data/external ]; then \
	  if grep -q "$(EMPTY_DIR_MD5)" data.dvc; then \
	    mkdir -p data/external && dvc commit -q -f data.dvc; \
	  else echo "data/external is missing: run 'dvc pull data.dvc'"; fi; fi

demo: setup  ## the whole DAG on the built-in shapes dataset, CPU, minutes (a DVC experiment)
	@# The output is also kept in .aelab/demo-log.txt (git-ignored, so not part of the
	@# experiment): `make bench` reads each stage's timing line from it. pipefail: the target
	@# fails when the experiment does.
	@mkdir -p .aelab
	set -o pipefail; PYTHONUNBUFFERED=1 dvc exp run -n demo-$$(date +%Y%m%d-%H%M%S) $(DEMO_SET) \
	  2>&1 | tee .aelab/demo-log.txt
	@echo "table: reports/results.md   figures: reports/figures/   runs: make ui   log: .aelab/demo-log.txt"

repro: setup  ## dvc repro: the real experiment with params.yaml as committed (CIFAR; GPU advised)
	dvc repro

ui: setup  ## MLflow UI on 127.0.0.1 over the local store (mlflow.db, mlartifacts/)
	mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 --port $(UI_PORT)

server: setup  ## MLflow tracking server on 127.0.0.1:5001 that stages log to over HTTP (team store)
	@# Job execution (GenAI jobs; 7 extra processes) is off unless the environment turns it on.
	@mkdir -p $(SERVER_DIR)
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=$${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false} mlflow server \
	  --backend-store-uri '$(BACKEND_URI)' --artifacts-destination '$(SERVER_ARTIFACTS)' \
	  --host $(SERVER_HOST) --port $(SERVER_PORT) $(SERVER_OPTS)

test: setup  ## the test suite (what CI runs)
	$(PY) -m pytest -q

bench: setup  ## speed ratios side by side (MAE step, probes, data path, dvc repro): reports/bench.json
	$(PY) benchmarks/bench.py --out reports/bench.json
