# Two entry points: `make report` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export MPLBACKEND := Agg

.PHONY: report test finetune sanity bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

report: $(STAMP)
	$(BIN)/vizlearn report --out figures

finetune: $(STAMP)
	$(BIN)/vizlearn finetune --out figures/finetune

sanity: $(STAMP)
	$(BIN)/vizlearn sanity --out figures

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[bench]"
	$(BIN)/python benchmarks/bench_projection.py
	$(BIN)/python benchmarks/bench_occlusion.py --size 64 --stride 32 --chunk 32 --repeats 5
	$(BIN)/python benchmarks/bench_topk_memory.py

clean:
	rm -rf $(VENV) build *.egg-info
