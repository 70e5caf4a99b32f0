# Two entry points do all set-up on a fresh machine (only Python needed):
#   make demo   - create .venv, install torch (CPU) then redrec, synthesise data, import, evaluate, print metrics
#   make test   - same install, then run the default test suite
#   make results - rerun the benches of docs/results.md and regenerate it (about 3.5 h on a shared 2-core host; finished
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

.PHONY: install demo test test-services lint bench-import bench-train bench-retrieval results clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/redrec demo --out $(DEMO_OUT)

# the Redis history-store tests start their own redis-server (Debian package): installed here when apt-get can
# (root, Debian/Ubuntu); elsewhere those tests are skipped with the reason
test-services:
	@command -v redis-server >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  { apt-get install -y -q redis-server >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q redis-server >/dev/null 2>&1; }; }; } || \
	  echo "note: redis-server is not installed; the Redis history-store tests will be skipped"

test: $(STAMP) test-services
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

bench-import: $(STAMP)
	$(BIN)/python benchmarks/bench_import.py

bench-train: $(STAMP)
	$(BIN)/python benchmarks/bench_train.py

bench-retrieval: $(STAMP)
	$(BIN)/python benchmarks/bench_retrieval.py

# the benches of docs/results.md (durations measured on 2 cores shared with other jobs; a quiet host is faster):
#   synthetic RED-MMU-shaped data (2,000 users x 8,000 notes), 3 seeds: cross_scenario (12 min), mixing (17 min),
#   interests, baselines and seq_len; amazon-food-kitchen cross_scenario (3 seeds); ML-1M baselines (1 seed,
#   4 epochs) and SASRec vs RED-Rec at 15 epochs (~40 min each); kuairand-1k cross_scenario (1 seed, 1 epoch, 1,000 test users: a run-ability check, not a result).
# The real datasets are read from $(DATASETS) (never copied into the project).
DATASETS ?= ../shared/datasets
results: $(STAMP)
	test -f $(BENCH_OUT)/synth-data/.complete || ($(BIN)/redrec data synth --out $(BENCH_OUT)/synth-data > /dev/null && touch $(BENCH_OUT)/synth-data/.complete)
	for p in cross_scenario mixing interests baselines seq_len; do \
	  $(BIN)/redrec bench run --dataset $(BENCH_OUT)/synth-data --preset $$p --seeds $(BENCH_SEEDS) \
	    --config configs/bench/synth.yaml $(BENCH_SET) -o $(BENCH_OUT)/synth-$$p || exit 1; done
	$(BIN)/redrec bench run --dataset $(DATASETS)/amazon-food-kitchen --preset cross_scenario --seeds $(BENCH_SEEDS) \
	  --config configs/bench/food_kitchen.yaml $(BENCH_SET) --set eval_every=0 -o $(BENCH_OUT)/fk-cross_scenario
	test -f stores/ml-1m/meta.json || $(BIN)/redrec data import $(DATASETS)/ml-1m -o stores/ml-1m --no-progress
	$(BIN)/redrec bench run --dataset stores/ml-1m --models popularity,sasrec,hstu,redrec --seeds 1 \
	  --config configs/bench/ml1m.yaml --set epochs=4 $(BENCH_SET) --set eval_every=0 -o $(BENCH_OUT)/ml1m-baselines
	for m in sasrec redrec; do $(BIN)/redrec bench run --dataset stores/ml-1m --models $$m --seeds 1 \
	  --config configs/bench/ml1m.yaml --set epochs=15 $(BENCH_SET) --set eval_every=0 -o $(BENCH_OUT)/ml1m-e15-$$m || exit 1; done
	$(BIN)/redrec bench run --dataset $(DATASETS)/kuairand-1k --preset cross_scenario --seeds 1 \
	  --config configs/bench/kuairand.yaml --set epochs=1 $(BENCH_SET) --set eval_every=0 --set protocol.max_users=1000 \
	  -o $(BENCH_OUT)/kuairand-cross_scenario
	$(BIN)/redrec bench report $(addprefix $(BENCH_OUT)/,synth-cross_scenario synth-mixing synth-interests \
	  synth-seq_len synth-baselines fk-cross_scenario ml1m-baselines ml1m-e15-sasrec ml1m-e15-redrec \
	  kuairand-cross_scenario) --summary docs/results_summary.md -o docs/results.md

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
