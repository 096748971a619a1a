# dynconv: set-up, demo and tests. Everything lives in .venv; nothing is installed system-wide.
#   make demo   create .venv (first time only), train the embedded default and evaluate its checkpoint
#   make test   create .venv (first time only) and run the test suite

PYTHON      ?= python3
VENV        := .venv
PY          := $(VENV)/bin/python
PIP         := $(PY) -m pip
CONSTRAINTS := requirements/constraints.txt
STAMP       := $(VENV)/.installed
# torch/torchvision first and on their own: these exact versions lie on this machine's
# disk, and pinning them before anything else stops pip from resolving a multi-GB download.
TORCH_PKGS  := torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.PHONY: venv demo test clean distclean

venv: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml $(CONSTRAINTS) | $(PY)
	$(PIP) install -c $(CONSTRAINTS) $(TORCH_PKGS)
	$(PIP) install -c $(CONSTRAINTS) -e '.[train,test,onnx]'
	touch $@

# The tests also check the mmdet plugin's registry and configs: mmdet's registry and config layer
# without compiled ops (see requirements/mmdet-lite.txt for why --no-deps). Real mmdet training
# needs its own environment: requirements/mmdet.txt.
MMDET_LITE  := requirements/mmdet-lite.txt
MMDET_STAMP := $(VENV)/.installed-mmdet-lite

$(MMDET_STAMP): $(MMDET_LITE) $(STAMP)
	$(PIP) install --no-deps -r $(MMDET_LITE)
	touch $@

DEMO_RUN    := runs/default/mobilenetv2_100-odconv_1x-demo-synthetic-s0

# The embedded default (configs/train.yaml): ODConv 1x MobileNetV2 on generated shapes, about 5 minutes
# on 2 CPU cores; run again, it resumes (or finds the run finished). Then eval.py on the best checkpoint.
demo: venv
	$(PY) train.py
	$(PY) eval.py checkpoint=$(DEMO_RUN)/best.pt output=$(DEMO_RUN)/eval.json

# OMP_NUM_THREADS=1: two xdist workers on two cores, one thread each.
test: venv $(MMDET_STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 tests $(PYTEST_ARGS)

clean:
	rm -rf build dist *.egg-info .pytest_cache
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
