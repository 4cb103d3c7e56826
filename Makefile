# corral: `make demo` and `make test` build their own virtual environment from nothing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
LLAMA_CPP_PYTHON := 0.3.36
# llama.cpp's own converter (from the pinned llama-cpp-python sdist): the reference the tests compare with.
REF    := $(VENV)/reference
REF_CONVERTER := $(REF)/llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp/convert_hf_to_gguf.py

.PHONY: venv test demo bench lint clean trained

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# llama-cpp-python with llama.cpp's RPC backend (`corral worker`, --rpc) plus the caller's CMAKE_ARGS (e.g.
# CMAKE_ARGS="-DGGML_CUDA=on"). pip's wheel cache ignores CMAKE_ARGS, so the wheel is built once (~10 min on
# 2 cores) into a wheelhouse keyed by the version and the flags, and installed from there.
LLAMA_CMAKE_ARGS := $(strip -DGGML_RPC=on $(CMAKE_ARGS))
WHEEL_KEY  := $(shell $(PYTHON) -c 'import hashlib, sys; print(hashlib.sha256(sys.argv[1].encode()).hexdigest()[:12])' '$(LLAMA_CMAKE_ARGS)')
WHEELHOUSE := $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/corral/wheels/$(LLAMA_CPP_PYTHON)-$(WHEEL_KEY)

$(WHEELHOUSE)/.built: | $(BIN)/python
	rm -rf '$(WHEELHOUSE).tmp' && mkdir -p '$(WHEELHOUSE).tmp'
	CMAKE_ARGS='$(LLAMA_CMAKE_ARGS)' $(BIN)/python -m pip wheel --no-deps --no-cache-dir \
		--no-binary llama-cpp-python llama-cpp-python==$(LLAMA_CPP_PYTHON) -w '$(WHEELHOUSE).tmp'
	rm -rf '$(WHEELHOUSE)' && mv '$(WHEELHOUSE).tmp' '$(WHEELHOUSE)'
	touch '$@'

# Runtime install: what `corral demo` needs; the wheel above first, so `pip install -e .` finds it installed.
$(VENV)/.installed: pyproject.toml $(WHEELHOUSE)/.built | $(BIN)/python
	$(BIN)/python -m pip install --no-deps --force-reinstall '$(WHEELHOUSE)'/llama_cpp_python-$(LLAMA_CPP_PYTHON)-*.whl
	$(BIN)/python -m pip install '$(WHEELHOUSE)'/llama_cpp_python-$(LLAMA_CPP_PYTHON)-*.whl
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

# The trained miniature models the quality tests use (trained the first time, then cached; see README).
trained: venv
	$(BIN)/python -m tests.helpers.trained

demo: $(VENV)/.installed
	$(BIN)/corral demo

bench: venv
	CORRAL_REF_CONVERTER=$(abspath $(REF_CONVERTER)) $(BIN)/python -m bench.run_all

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
