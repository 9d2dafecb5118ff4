# prefix-router: `make run` starts the whole path locally, `make test` runs every test.
# Each target creates the virtual environment first if needed (Python >= 3.11 as python3).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: install run test test-unit test-integration fuzz bench protos clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,bench]'
	touch $(STAMP)

# Envoy on 127.0.0.1:10000 (OpenAI base URL http://127.0.0.1:10000/v1), the service, two SGLang
# routers over two fake workers each. Ctrl-C stops everything. ENVOY_CONFIG=envoy/buffered.yaml
# for the buffered body mode.
ENVOY_CONFIG ?= envoy/duplex.yaml
run: install
	$(PY) -m extproc.stack --envoy-config $(ENVOY_CONFIG)

test: install
	$(PY) -m pytest -q -p no:cacheprovider

test-unit: install
	$(PY) -m pytest -q -p no:cacheprovider -m "not integration"

test-integration: install
	$(PY) -m pytest -q -p no:cacheprovider -m integration

# Long fuzz run of the payload parser: 3 properties x FUZZ_EXAMPLES >= 100,000 inputs (the suite runs 3 x 2,000).
FUZZ_EXAMPLES ?= 34000
fuzz: install
	FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q -p no:cacheprovider tests/test_payload_fuzz.py

# Every benchmark; JSON in bench/results/, the routing report in bench/results/REPORT.md.
# The overhead benchmark drives Envoy with wrk (Debian's package).
bench: install
	command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk)
	$(PY) -m bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis

# Regenerate extproc/api from protos/ (tests/test_protos.py fails when they differ).
protos: install
	$(PY) -m grpc_tools.protoc -I protos --python_out=. --pyi_out=. --grpc_python_out=. protos/extproc/api/v1/admin.proto
