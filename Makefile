# Two entry points do all set-up on a fresh machine (only Python needed):
#   make demo   - create .venv, install torch (CPU) then redrec, synthesise data, import, evaluate, print metrics
#   make test   - same install, then run the default test suite
#   make results - rerun the benches of docs/results.md and regenerate it (about 35 min on a shared 2-core host; finished
#                  runs under $(BENCH_OUT) are read back, so a rerun after a kill continues, and one after a
#                  complete run only rewrites the report)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.redrec-installed
TORCH  ?= torch==2.13.0
DEMO_OUT ?= demo_out
BENCH_OUT ?= bench_out
BENCH_SEEDS ?= 3
BENCH_SET ?= --set num_threads=1

.PHONY: install demo test lint bench-import bench-train bench-retrieval results clean

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

# the benches of docs/results.md: synthetic RED-MMU-shaped data (2,000 users x 8,000 notes), presets
# cross_scenario (12 min measured) and mixing (~21 min), 3 seeds, one torch thread per run, on 2 cores shared
# with other jobs (load average 4-7); a quiet host is faster
results: $(STAMP)
	test -f $(BENCH_OUT)/synth-data/.complete || ($(BIN)/redrec data synth --out $(BENCH_OUT)/synth-data > /dev/null && touch $(BENCH_OUT)/synth-data/.complete)
	$(BIN)/redrec bench run --dataset $(BENCH_OUT)/synth-data --preset cross_scenario --seeds $(BENCH_SEEDS) \
		--config configs/bench/synth.yaml $(BENCH_SET) -o $(BENCH_OUT)/synth-cross_scenario
	$(BIN)/redrec bench run --dataset $(BENCH_OUT)/synth-data --preset mixing --seeds $(BENCH_SEEDS) \
		--config configs/bench/synth.yaml $(BENCH_SET) -o $(BENCH_OUT)/synth-mixing
	$(BIN)/redrec bench report $(BENCH_OUT)/synth-cross_scenario $(BENCH_OUT)/synth-mixing -o docs/results.md

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
