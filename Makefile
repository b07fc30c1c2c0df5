# The two commands of the README: `make demo` (the app on the embedded defaults) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The native build picks llama.cpp's AMX buffer type, which segfaults on the first decode on
# these hosts: build for AVX2 explicitly (pip caches the wheel after the first, ~5 min, build).
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON

.PHONY: demo test browser clean

$(VENV)/.runtime: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip install --disable-pip-version-check -q -r requirements.txt
	touch $@

$(VENV)/.test: $(VENV)/.runtime requirements-test.txt
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip install --disable-pip-version-check -q -r requirements-test.txt
	touch $@

demo: $(VENV)/.runtime
	$(PY) -m space

# Debian's chromium for the browser tests (Playwright's own browser download needs the internet).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium >/dev/null; \
	  else echo "browser tests need Debian's chromium: sudo apt-get install chromium" >&2; exit 1; fi; }

test: $(VENV)/.test browser
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV)
