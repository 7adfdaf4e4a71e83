# megatron-normistral: the commands README.md shows.
#   make install   create .venv (if absent) and install the package + pinned requirements
#   make test      install if needed, then run the test suite
#   make demo      the whole three-stage pipeline, small, on CPU (report in runs/demo/)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The install is redone when the pins, the build or the C++ sources change.
STAMP  := $(VENV)/.normistral-installed
PYTEST_ARGS ?=

.PHONY: install test clean

install: $(STAMP)

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): $(VENV)/bin/python requirements.txt setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h)
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	$(PY) -c "import megatron_normistral._helpers"
	touch $(STAMP)

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

clean:
	rm -rf build *.egg-info megatron_normistral/_helpers*.so

# The whole three-stage pipeline, small, on CPU; writes runs/demo/report.md.
# DEMO_ARGS=--fresh starts over; finished steps are reused otherwise.
DEMO_ARGS ?=
.PHONY: demo
demo: install
	$(PY) examples/demo/run_demo.py $(DEMO_ARGS)
