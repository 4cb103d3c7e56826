# corral: `make demo` and `make test` build their own virtual environment from nothing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
LLAMA_CPP_PYTHON := 0.3.36
# llama.cpp's own converter (from the pinned llama-cpp-python sdist): the reference the tests compare with.
REF    := $(VENV)/reference
REF_CONVERTER := $(REF)/llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp/convert_hf_to_gguf.py

.PHONY: venv test demo bench lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Runtime install: what `corral demo` needs. llama-cpp-python compiles once (~8 min on 2 cores), then pip reuses the wheel.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -e .
	touch $@

# Test install: torch first (the CPU build) so nothing pulls a CUDA build, then the test extra.
$(VENV)/.installed-test: $(VENV)/.installed pyproject.toml
	$(BIN)/python -m pip install torch==2.13.0
	$(BIN)/python -m pip install -e '.[test]'
	touch $@

$(REF_CONVERTER): | $(BIN)/python
	mkdir -p $(REF)
	$(BIN)/python -m pip download --quiet --no-deps --no-binary :all: llama-cpp-python==$(LLAMA_CPP_PYTHON) -d $(REF)
	tar -xzf $(REF)/llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz -C $(REF) \
		llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp/convert_hf_to_gguf.py \
		llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp/conversion \
		llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp/gguf-py \
		llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp/models/templates
	rm -f $(REF)/llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz
	touch $@

venv: $(VENV)/.installed-test $(REF_CONVERTER)

lint: venv
	$(BIN)/ruff check app convert offload tui tests bench

# pytest's exit 5 (no tests collected) is not a failure of the build.
test: venv lint
	CORRAL_REF_CONVERTER=$(abspath $(REF_CONVERTER)) $(BIN)/python -m pytest; rc=$$?; \
		if [ $$rc -eq 5 ]; then exit 0; else exit $$rc; fi

demo: $(VENV)/.installed
	$(BIN)/corral demo

bench: venv
	CORRAL_REF_CONVERTER=$(abspath $(REF_CONVERTER)) $(BIN)/python -m bench.run_all

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
