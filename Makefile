# mimiq_mm — the two commands of the README:
#   make demo   set-up + data-free W4/A4 MimiQ on the shipped demo teacher, COCO metrics
#   make test   set-up + the test suite
# Set-up is idempotent: the first run on a machine builds a shared dependency environment in
# $(MIMIQ_ENV_CACHE) (torch, mmcv 2.1.0 built with its compiled ops ~12 min on 2 cores, its
# wheel cached in $(MIMIQ_WHEEL_CACHE), mmdet, mmseg, ...); every checkout's $(VENV) is a small
# venv on top of it with its own editable mimiq_mm. Later runs and fresh clones take seconds.
PYTHON ?= python3.11
VENV ?= .venv
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
MIMIQ_WHEEL_CACHE ?= $(HOME)/.cache/mimiq_mm/wheels
MIMIQ_ENV_CACHE ?= $(HOME)/.cache/mimiq_mm/envs
PYTEST_ARGS ?= -n auto
export PYTHON VENV TORCH_SPEC MIMIQ_WHEEL_CACHE MIMIQ_ENV_CACHE

PY := $(VENV)/bin/python

.PHONY: setup test demo demo-data bench clean-venv help

help:
	@echo "make setup | test | demo | demo-data | bench | clean-venv"

setup:
	@bash tools/setup_env.sh

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

demo-data: setup
	$(PY) tools/make_demo_data.py --out data/demo

demo: setup
	$(PY) tools/demo.py --work-dir work_dirs/demo

bench: setup
	$(PY) benchmarks/bench_quant.py --small
	$(PY) benchmarks/bench_synthesis.py --small

clean-venv:
	rm -rf $(VENV)
