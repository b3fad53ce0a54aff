# The two commands of the README:
#   make bench   set up, then run the default benchmark on the shipped zoo
#   make test    set up, then run the tests
# Also: make leaderboard (regenerates the published results/leaderboard*.md and reports),
# make tables (the Medusa tree table and the SPACE k sweep: results/medusa-trees.md, results/space-k.md).
# Variables: TORCH_SPEC (see scripts/setup.sh), LIMIT (HumanEval problems), ARGS (extra
# `harness run` arguments, e.g. ARGS="model.device=cuda model.dtype=bfloat16").
LIMIT ?= 20
ARGS ?=
# SPACE decodes with k candidates (<= the trained 5); k=1 measured best on 2 CPU cores (make tables);
# where a chunk forward costs less (a GPU), run make tables there and pass the best: make bench SPACE_K=...
SPACE_K ?= 1
OUT ?= results/runs/bench
METHODS := autoregressive,hf-generate,speculative,prompt-lookup,medusa,hf-assisted,hf-prompt-lookup
RUN := .venv/bin/harness run --task humaneval --limit $(LIMIT) --max-new-tokens 128 run.threads=1

.PHONY: setup bench test leaderboard tables
setup:
	bash scripts/setup.sh

# target + draft + Medusa heads, then SPACE on its own fine-tuned model (its own reference)
bench: setup
	$(RUN) --methods $(METHODS) --out $(OUT) $(ARGS)
	$(RUN) --model zoo-space --methods autoregressive,space method.space.k=$(SPACE_K) --out $(OUT)-space $(ARGS)

# the tests also run the cluster launchers (joblib, a local Ray cluster, submitit): their
# extras are installed, and a missing one fails the tests instead of skipping them
test:
	EXTRAS=dev,plots,cluster bash scripts/setup.sh
	HARNESS_REQUIRE_EXTRAS=1 .venv/bin/python -m pytest

leaderboard: setup
	rm -rf results/runs/zoo results/runs/zoo-space
	$(MAKE) bench OUT=results/runs/zoo
	.venv/bin/harness leaderboard results/runs/zoo --out results/leaderboard.md
	.venv/bin/harness leaderboard results/runs/zoo --format html --out results/report.html
	.venv/bin/harness leaderboard results/runs/zoo-space --out results/leaderboard-space.md
	.venv/bin/harness leaderboard results/runs/zoo-space --format html --out results/report-space.html

# one sweep job per Medusa tree and per SPACE k, each with its own autoregressive reference;
# --by run_dir gives one row per job (tree or k), step_cost is t(tree or chunk forward) / t(1-token forward)
tables: setup
	rm -rf results/runs/medusa-trees results/runs/space-k
	$(RUN) -m --methods autoregressive,medusa 'method.medusa.tree=chain,small,large' --out results/runs/medusa-trees $(ARGS)
	.venv/bin/harness leaderboard results/runs/medusa-trees/*/ --by run_dir --allow-mixed --out results/medusa-trees.md
	$(RUN) -m --model zoo-space --methods autoregressive,space 'method.space.k=1,2,3,4,5' --out results/runs/space-k $(ARGS)
	.venv/bin/harness leaderboard results/runs/space-k/*/ --by run_dir --allow-mixed --out results/space-k.md
