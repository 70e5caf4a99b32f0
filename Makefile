# Two entry points do all set-up on a fresh machine (only Python needed):
#   make demo   - create .venv, install torch (CPU) then redrec, synthesise data, import, evaluate, print metrics
#   make test   - same install, then run the default test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.redrec-installed
TORCH  ?= torch==2.13.0
DEMO_OUT ?= demo_out

.PHONY: install demo test lint bench-import bench-train bench-retrieval clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/redrec demo --out $(DEMO_OUT)

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

bench-import: $(STAMP)
	$(BIN)/python benchmarks/bench_import.py

bench-train: $(STAMP)
	$(BIN)/python benchmarks/bench_train.py

bench-retrieval: $(STAMP)
	$(BIN)/python benchmarks/bench_retrieval.py

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
