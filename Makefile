# `make test` and `make demo` each build their own virtualenv (.venv) on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test demo lint install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# the CPU wheel of torch is local on our machines; other torch builds pull GBs of CUDA packages
	$(BIN)/pip install -q "torch==2.13.0" || $(BIN)/pip install -q "torch>=2.6"
	# [ray]: the Ray Serve scale-out tests run in CI too (tests/test_ray_serve.py, marker `ray`, about 2 minutes)
	$(BIN)/pip install -q -e ".[test,ray]"
	# vocos is a test oracle only; its declared torchaudio dependency has no CPU build here
	$(BIN)/pip install -q --no-deps "vocos==0.1.0"
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check omnivox tests bench

test: $(STAMP) lint
	$(BIN)/python -m pytest tests

demo: $(STAMP)
	$(BIN)/omnivox info
	$(BIN)/omnivox speak "Hello! Tell me something nice about the sea." -o out/demo.wav --seed 0
	$(BIN)/omnivox bench --workload demo --trials 2 --out out/bench-demo --plot out/bench-demo/plot.png

clean:
	rm -rf $(VENV) out
