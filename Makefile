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

.PHONY: venv demo test clean distclean mmdet-env mmdet-test

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

# timm's model tests (tests/test_models.py) are not in the timm wheel: take them from the sdist of the
# installed timm once, into an ignored folder; tests/test_timm_suite.py imports them (no network at test time).
TIMM_TESTS  := .cache/timm_tests/timm_test_models.py

$(TIMM_TESTS): $(STAMP)
	rm -rf .cache/timm_tests && mkdir -p .cache/timm_tests/sdist
	$(PIP) download --no-deps --no-binary :all: -d .cache/timm_tests/sdist \
		"timm==$$($(PY) -c 'import timm; print(timm.__version__)')"
	tar xzf .cache/timm_tests/sdist/timm-*.tar.gz -C .cache/timm_tests --strip-components=2 --wildcards '*/tests/test_models.py'
	mv .cache/timm_tests/test_models.py $@ && touch $@

DEMO_RUN    := runs/default/mobilenetv2_100-odconv_1x-demo-synthetic-s0

# The embedded default (configs/train.yaml): ODConv 1x MobileNetV2 on generated shapes, about 5 minutes
# on 2 CPU cores; run again, it resumes (or finds the run finished). Then eval.py on the best checkpoint.
demo: venv
	$(PY) train.py
	$(PY) eval.py checkpoint=$(DEMO_RUN)/best.pt output=$(DEMO_RUN)/eval.json

# OMP_NUM_THREADS=1: two xdist workers on two cores, one thread each.
test: venv $(MMDET_STAMP) $(TIMM_TESTS)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 tests --durations=30 $(PYTEST_ARGS)

# The mmdetection environment (requirements/mmdet.txt: torch 2.1.2, mmcv 2.1.0 with compiled ops, mmdet
# 3.3.0), from PyPI alone; builds mmcv's ops when no prebuilt wheel is reachable. It lives in a machine-level
# cache (~/.cache/dynconv/venv-mmdet-*) that .venv-mmdet links to, so only the first clone on a machine
# pays for it (about 20-30 minutes on 2 cores); later calls take seconds. See scripts/mmdet_env.sh.
MMDET_PY    := .venv-mmdet/bin/python

mmdet-env:
	bash scripts/mmdet_env.sh

# The plugin tests on mmdet's own torch, then every config in configs/mmdet/ built, loaded from a dynconv
# checkpoint and trained two steps on synthetic_coco, and one config through Runner.test() (CocoMetric).
mmdet-test: mmdet-env
	$(MMDET_PY) -m pytest -q -p no:cacheprovider tests/test_mmdet_plugin.py tests/test_compat.py
	$(MMDET_PY) scripts/mmdet_stage.py $(MMDET_STAGE_ARGS)

clean:
	rm -rf build dist *.egg-info .pytest_cache
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
