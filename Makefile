# make run   - set up, build the example models, serve them on 127.0.0.1:8080 (HTTP) / :8081 (gRPC)
# make test  - set up (Python deps + system packages), lint, type-check, run the whole test suite
# make bench - load tests against the peers (see benchmarks/README.md)
# make fuzz  - the property and fuzz tests of tests/fuzz for much longer (FUZZ_EXAMPLES per test)
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
MODELS_STAMP := examples/models/.built
HOST ?= 127.0.0.1
HTTP_PORT ?= 8080
GRPC_PORT ?= 8081
PYTEST_ARGS ?=

.PHONY: setup system-deps models run test lint typecheck pytest bench bench-serving bench-traffic \
	bench-stream bench-batch bench-fleet bench-fleet-lb bench-trace fuzz clean

$(STAMP): pyproject.toml scripts/venv.sh scripts/constraints.txt
	./scripts/venv.sh dev
	touch $(STAMP)

setup: $(STAMP)

system-deps:
	./scripts/system_deps.sh

$(MODELS_STAMP): $(STAMP) examples/build_models.py examples/python_model/model.py examples/services.yaml
	$(PY) examples/build_models.py
	touch $(MODELS_STAMP)

models: $(MODELS_STAMP)

run: models
	$(VENV)/bin/inferplane serve --repository examples/models --host $(HOST) \
		--http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT)

lint: setup
	$(VENV)/bin/ruff check inferplane tests examples benchmarks
	$(VENV)/bin/ruff format --check inferplane tests examples benchmarks

typecheck: setup
	$(VENV)/bin/mypy inferplane

pytest: setup system-deps
	$(VENV)/bin/pytest $(PYTEST_ARGS)

test: lint typecheck pytest

# make bench [FAST=1] [BENCH_ARGS="--models tabular --with-triton ..."]; see benchmarks/README.md
# Each part also runs alone: make bench-serving | bench-traffic | bench-trace | bench-stream | bench-batch |
# bench-fleet [FLEET_ARGS="--models 300 --seconds 30 --no-mlserver ..."]
BENCH_ARGS ?=
FLEET_ARGS ?=
bench: bench-serving bench-traffic bench-trace bench-stream bench-batch bench-fleet bench-fleet-lb

bench-serving: setup system-deps
	$(PY) benchmarks/run.py $(if $(filter 1,$(FAST)),--fast) $(BENCH_ARGS)

bench-traffic: models system-deps
	$(PY) benchmarks/traffic_overhead.py $(if $(filter 1,$(FAST)),--seconds 6 --rounds 2)
	$(PY) benchmarks/audit_bench.py
	$(PY) benchmarks/edge_overhead.py $(if $(filter 1,$(FAST)),--seconds 6 --rounds 2)

bench-stream: models system-deps
	$(PY) benchmarks/stream_bench.py --repository examples/models \
		$(if $(filter 1,$(FAST)),--events 50000 --seconds 8)

bench-batch: setup
	$(PY) benchmarks/batch_bench.py $(if $(filter 1,$(FAST)),--rows 1000000,--rows 5000000)

bench-fleet: setup
	$(PY) benchmarks/fleet_bench.py $(if $(filter 1,$(FAST)),--fast) $(FLEET_ARGS)

# bench-trace: throughput with tracing off / 10% / 100% sampled, in one run (docs/observability.md)
bench-trace: models system-deps
	$(PY) benchmarks/trace_overhead.py $(if $(filter 1,$(FAST)),--seconds 6 --rounds 2)

# bench-fleet-lb: 3 replicas behind HAProxy vs 1 direct, and a 60 s rolling restart (FAST=1: short)
bench-fleet-lb: setup system-deps
	$(PY) benchmarks/fleet_lb_bench.py $(if $(filter 1,$(FAST)),--seconds 5 --rolling-seconds 15)

# make fuzz [FUZZ_EXAMPLES=20000]: `make test` runs tests/fuzz with the small derandomized `ci`
# profile; this runs it with the `fuzz` one (random, no deadline, no per-test time limit).
# Failures are kept in .hypothesis/ and tried first on the next run.
FUZZ_EXAMPLES ?= 5000
fuzz: setup system-deps
	HYPOTHESIS_PROFILE=fuzz FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(VENV)/bin/pytest tests/fuzz \
		--timeout 0 $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) examples/models examples/artifacts .pytest_cache .mypy_cache .ruff_cache .hypothesis
