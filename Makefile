# The README's commands. Each first runs `setup`, which builds .venv once: a stamp named after a hash
# of the files that define the environment makes every later run skip all installs.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
ENV_FILES := Makefile setup.py tools/install_detectron2.py
ENV_HASH := $(shell cat $(ENV_FILES) | sha256sum | cut -c1-16)
STAMP := $(VENV)/.installed-$(ENV_HASH)

.PHONY: setup test demo
setup: $(STAMP)

# Detectron2's wheel requires numpy<2, and pip resolves the extras without weighing what is
# installed: unpinned, ONNX's ml_dtypes would pull numpy 2 under it. The study's "trees" condition
# reads the aerial images bundled with deepforest, which needs none of deepforest's dependencies.
$(STAMP):
	@rm -f $(VENV)/.installed-*
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "setuptools<81" wheel
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) tools/install_detectron2.py
	$(PY) -m pip install -q -e ".[test]" "numpy<2"
	$(PY) -m pip install -q --no-deps deepforest==2.1.0
	touch $@

test: setup
	$(PY) -m pytest -q tests

demo: setup
	$(PY) tools/demo.py

# The GPU checks and measurements of benchmarks/gpu_check.py: QUICK=1 for the subset that fits
# 4 minutes on a cold H100 (its own estimate), else everything (more than one 10-minute device
# call: see the script's --sections and --budget). With .venv's python when there is one, else
# python3 (the lent device machine has no .venv); OUT=dir writes the report under dir/gpu_check
# instead of docs/gpu.
GPU_PY ?= $(if $(wildcard $(PY)),$(PY),python3)
.PHONY: gpu-check
gpu-check:
	$(GPU_PY) benchmarks/gpu_check.py $(if $(OUT),--output $(OUT)/gpu_check) $(if $(QUICK),--quick)

# Wheels the lent GPU machine lacks, into .whl/ (carry it in the device call, see
# benchmarks/gpu_check.py): those of the shared device-prep script, plus tqdm and portalocker, which
# fvcore, iopath and mabn_experiments import and which that machine's Python is not known to have.
.PHONY: device-wheels
device-wheels: setup
	bash ../shared/tools/device-prep.sh
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
		tqdm portalocker
