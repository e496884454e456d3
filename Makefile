# Two commands do all set-up: `make run` and `make test`. Both first bring .venv up to date (seconds when nothing changed).
VENV ?= .venv
BIN := $(VENV)/bin
export RANKLOOP_VENV := $(VENV)

.PHONY: venv run test test-fast lint bench clean

venv:
	@bash deploy/bootstrap.sh

run: venv
	$(BIN)/rankloop up

test: venv
	@[ -n "$${RANKLOOP_CHROMIUM:-}" ] || bash deploy/apt_install.sh chromium chromium "the browser tests"
	@bash deploy/apt_install.sh nginx nginx "the test of replicas behind a balancer"
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -ra

test-fast: venv
	$(BIN)/python -m pytest -ra -m "not slow"

lint: venv
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/mypy && $(BIN)/lint-imports

bench: venv
	$(BIN)/python bench/chat_throughput.py
	$(BIN)/python bench/feedback_ingest.py
	$(BIN)/python bench/rm_speed.py
	$(BIN)/python bench/swap_latency.py

clean:
	rm -rf $(VENV) var
