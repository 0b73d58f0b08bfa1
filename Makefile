# Two set-up commands for a newcomer: `make run` (the end-to-end demo) and `make test`.
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test test-fast test-chaos lint contract bench bootstrap clean

bootstrap:
	@bash scripts/bootstrap.sh

run: bootstrap
	$(BIN)/billing-worker demo

test: bootstrap
	$(BIN)/pytest

test-fast: bootstrap
	$(BIN)/pytest -m "not chaos"

test-chaos: bootstrap
	$(BIN)/pytest -m chaos

lint: bootstrap
	$(BIN)/ruff check worker tasks tests bench
	$(BIN)/mypy

contract:
	bash ../shared/contract/lua_contract.sh .

bench: bootstrap
	@$(BIN)/python -c 'import psycopg' 2>/dev/null && test -x $(BIN)/py-spy || $(BIN)/pip install -q -e '.[bench]'
	@if [ -f bench/wal_bench.py ]; then $(BIN)/python bench/wal_bench.py; else echo "bench/wal_bench.py missing: skipped"; fi
	$(BIN)/python bench/e2e_bench.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build dist
