# One command sets up a fresh machine: every target below creates .venv and installs into it when needed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
CONFIG ?= configs/demo.yaml
DATA   ?= data/synth
RUN    ?= runs/demo
OUT    ?= $(RUN)/submission.csv
SYNTH_ARGS ?= --individuals 300 --seed 0
ARGS   ?=
FAISS  ?= cpu  # gpu: faiss-gpu instead of faiss-cpu
GPUS   ?= 1    # >1: make train starts one process per GPU through torchrun (DDP)
ONLY   ?=      # make bench ONLY=scale: some of the benchmarks (scripts/bench.py --only)
REID_TRAIN = $(if $(filter-out 1,$(GPUS)),$(BIN)/torchrun --standalone --nproc_per_node=$(GPUS) -m reid,$(BIN)/reid) train

.PHONY: setup demo synth train predict evaluate test lint bench ablate clean

$(BIN)/reid: pyproject.toml
	@free=$$(df -Pk . | awk 'NR==2 {print int($$4 / 1048576)}'); [ "$$free" -ge 7 ] || \
		echo "warning: $$free GB free on this disk; the .venv takes about 6.3 GB (torch and its CUDA libraries)" >&2
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e ".[$(strip $(FAISS)),dev]"
	touch $@

setup: $(BIN)/reid

$(DATA)/train.csv: | $(BIN)/reid
	$(BIN)/reid synth $(DATA) $(SYNTH_ARGS)

synth: $(DATA)/train.csv

# synthetic data -> train (skipped when the run is already finished) -> predict -> score
demo: $(DATA)/train.csv
	@start=$$(date +%s); \
	if [ -f $(RUN)/best.pt ] && [ -f $(RUN)/report.html ]; then echo "$(RUN) is trained; delete it to train again"; \
	else $(BIN)/reid train --config $(CONFIG) --data $(DATA) --out $(RUN) --force $(ARGS) || exit 1; fi; \
	$(BIN)/reid predict --run $(RUN) --data $(DATA) --out $(OUT) --force || exit 1; \
	$(BIN)/reid evaluate $(OUT) $(DATA)/solution.csv || exit 1; \
	echo "demo: $$(( $$(date +%s) - start )) s for train + predict + evaluate; report: $(RUN)/report.html"

train: | $(BIN)/reid
	$(REID_TRAIN) --config $(CONFIG) --data $(DATA) --out $(RUN) $(ARGS)

predict: | $(BIN)/reid
	$(BIN)/reid predict --run $(RUN) --data $(DATA) --out $(OUT) $(ARGS)

evaluate: | $(BIN)/reid
	$(BIN)/reid evaluate $(OUT) $(DATA)/solution.csv

test: | $(BIN)/reid
	$(BIN)/python -m pytest -q

lint: | $(BIN)/reid
	$(BIN)/ruff check reid scripts tests

bench: | $(BIN)/reid
	$(BIN)/python scripts/bench.py $(if $(ONLY),--only $(ONLY))

ablate: | $(BIN)/reid
	$(BIN)/python scripts/ablate.py

clean:
	rm -rf runs/demo $(DATA)
