# respec: `make demo` shows the engine at work, `make test` runs the test suite.
PY := .venv/bin/python
STAMP := .venv/.installed

.PHONY: demo test venv bench lint

venv: $(STAMP)

# torch is installed first, and only when the venv lacks it, so a CUDA build put there by hand is kept.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -c "import torch" 2>/dev/null || .venv/bin/pip install torch==2.13.0
	.venv/bin/pip install -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

# Builds (or reuses from $$RESPEC_CACHE, default ~/.cache/respec) the small policy and its EAGLE-3 drafter, then
# compares speculative and plain decoding; prints the table and where the JSON and PNG went.
demo: $(STAMP)
	.venv/bin/respec demo --json runs/demo/spec.json

# The full engine benchmark reported in benchmarks/RESULTS.md.
bench: $(STAMP)
	.venv/bin/respec bench engine --threads 1 --verify-repeats 9 --json runs/bench/engine.json
	.venv/bin/respec bench spec --json runs/bench/spec.json
	.venv/bin/respec bench rollout --repeats 5 --json runs/bench/rollout.json

lint: $(STAMP)
	.venv/bin/ruff check respec tests
