# make demo: set up .venv, generate the demo data, train, evaluate, write retrieval grids, search the photos with a drawn star.
# make test: set up .venv, run the test suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO_DATA := data/demo
DEMO_RUN := runs/demo
# The demo trains the from-scratch recipe (train.py's defaults with --no-pretrained: resnet18 at 32 px, one
# shared trunk, class proxies, photo edge maps) for a 1.5-minute budget, as in docs/results.md's demo table.
DEMO_TRAIN_ARGS := --no-pretrained --budget_minutes 1.5 --print_every 10 --workers 1
EXTRA_TRAIN_ARGS :=

.PHONY: demo test venv clean

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements.txt
	touch $@

$(DEMO_DATA)/.demo_data: demo_data.py | venv
	PYTHON=$(PY) bash download_data.sh demo $(dir $(DEMO_DATA))

demo: venv $(DEMO_DATA)/.demo_data
	$(PY) train.py --data_dir $(DEMO_DATA) --checkpoint_dir $(DEMO_RUN) $(DEMO_TRAIN_ARGS) $(EXTRA_TRAIN_ARGS)
	$(PY) evaluate.py --model $(DEMO_RUN)/best.pth --data $(DEMO_DATA) --output_dir $(DEMO_RUN)/eval \
		--num_sketches 10 --num_images 6 --compare_untrained --workers 1 --save_embeddings $(DEMO_RUN)/eval/embeddings.pt
	$(PY) retrieve.py --model $(DEMO_RUN)/best.pth --gallery $(DEMO_DATA)/photos --query docs/retrieve_query.png \
		--output $(DEMO_RUN)/retrieval --workers 1
	@echo "The recipe ablation on this demo (docs/results.md, bench/bench_recipes.py), beside this run's mAP@all above:"
	@sed -n '/<!-- demo-table -->/,/<!-- end demo-table -->/p' docs/results.md | grep '^|'

test: venv
	$(PY) -m pytest tests -q --durations=10

clean:
	rm -rf $(DEMO_RUN) $(DEMO_DATA)
