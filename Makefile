# The two commands of the README:
#   make bench   set up, then run the default benchmark on the shipped zoo
#   make test    set up, then run the tests
# Variables: TORCH_SPEC (see scripts/setup.sh), BENCH_ARGS (extra `harness run` arguments).
PY := .venv/bin/python
BENCH_METHODS ?= autoregressive,hf-generate,speculative,prompt-lookup,hf-assisted,hf-prompt-lookup
BENCH_ARGS ?=

.PHONY: setup bench test
setup:
	bash scripts/setup.sh

bench: setup
	.venv/bin/harness run --methods $(BENCH_METHODS) --task humaneval --limit 20 --max-new-tokens 128 $(BENCH_ARGS)

test: setup
	$(PY) -m pytest
