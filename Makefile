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

# A few minutes on 2 CPU cores: plain decoding vs transformers at batch 1/8/32 and the verify cost curve.
demo: $(STAMP)
	.venv/bin/respec bench engine --batch-sizes 1,8,32 --max-new-tokens 32 --repeats 1 --threads 1 --verify-batches 1,4,16 \
		--verify-max-n 6 --verify-repeats 3 --json runs/demo/engine.json
	@echo "results: runs/demo/engine.json and runs/demo/engine.png"

# The full engine benchmark reported in benchmarks/RESULTS.md.
bench: $(STAMP)
	.venv/bin/respec bench engine --threads 1 --verify-repeats 9 --json runs/bench/engine.json

lint: $(STAMP)
	.venv/bin/ruff check respec tests
