# The two commands of the README:
#   make bench   set up, then run the default benchmark on the shipped zoo
#   make test    set up, then run the tests
# Also: make leaderboard (regenerates the published results/leaderboard*.md and reports).
# Variables: TORCH_SPEC (see scripts/setup.sh), LIMIT (HumanEval problems), ARGS (extra
# `harness run` arguments, e.g. ARGS="model.device=cuda model.dtype=bfloat16").
LIMIT ?= 20
ARGS ?=
# SPACE decodes with k candidates (<= the trained 5); k=1 measured best on 2 CPU cores, a GPU prefers 5
SPACE_K ?= 1
OUT ?= results/runs/bench
METHODS := autoregressive,hf-generate,speculative,prompt-lookup,medusa,hf-assisted,hf-prompt-lookup
RUN := .venv/bin/harness run --task humaneval --limit $(LIMIT) --max-new-tokens 128 run.threads=1

.PHONY: setup bench test leaderboard
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
