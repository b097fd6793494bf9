# respec: `make demo` shows the engine at work, `make test` runs the test suite.
PY := .venv/bin/python
STAMP := .venv/.installed

.PHONY: demo test venv bench results lint

venv: $(STAMP)

# torch is installed first, and only when the venv lacks it, so a CUDA build put there by hand is kept.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -c "import torch" 2>/dev/null || .venv/bin/pip install torch==2.13.0
	.venv/bin/pip install -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -n auto --maxprocesses=4 --dist loadfile tests

# Builds (or reuses from $$RESPEC_CACHE, default ~/.cache/respec) the small policy and its EAGLE-3 drafter, then
# compares speculative and plain decoding; prints the table and where the JSON and PNG went.
demo: $(STAMP)
	.venv/bin/respec demo --json runs/demo/spec.json

# The benchmarks of docs/results.md (decode steps compiled where the start-up profile measured it faster): each
# writes its JSON (and a PNG) into docs/results/, then the page is
# regenerated from them. `respec experiment` (an hour and more) and benchmarks/trl_peer.py (needs TRL) are run
# on their own; their commands are on the page.
bench: $(STAMP)
	.venv/bin/respec bench engine --model "$$($(PY) -c 'from respec.world.defaults import resolve_models; print(resolve_models()[0])')" \
		--threads 1 --verify-repeats 9 --compile auto --json docs/results/engine_policy.json
	.venv/bin/respec bench spec --compile auto --json docs/results/spec.json
	.venv/bin/respec bench rollout --repeats 5 --compile auto --json docs/results/rollout.json
	$(MAKE) results

# docs/results.md's tables, regenerated from the JSON in docs/results/.
results: $(STAMP)
	.venv/bin/respec report --results docs/results --out docs/results.md --readme README.md

lint: $(STAMP)
	.venv/bin/ruff check respec tests
