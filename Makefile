# mimiq_mm — the two commands of the README:
#   make demo   set-up + data-free W4/A4 MimiQ on the shipped demo teacher, COCO metrics
#   make test   set-up + the test suite
# Set-up is idempotent: the first run builds mmcv 2.1.0 with its compiled ops (~12 min on
# 2 cores) and caches the wheel in $(MIMIQ_WHEEL_CACHE); later runs take seconds.
PYTHON ?= python3.11
VENV ?= .venv
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
MIMIQ_WHEEL_CACHE ?= $(HOME)/.cache/mimiq_mm/wheels
PYTEST_ARGS ?= -n auto
export PYTHON VENV TORCH_SPEC MIMIQ_WHEEL_CACHE

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
