# make demo: set up .venv, generate the demo data, train (anew: --overwrite replaces the last demo run), evaluate every setting (zs, gzs, fg, cross-dataset, each also
# on 64-bit hash codes), write retrieval grids, search the photos with a drawn star.
# make test: set up .venv, run the test suite.
# make lint: set up .venv, check the code's style with ruff.
# make app: set up .venv and the demo data, train the demo's model if runs/demo/best.pth is missing, serve the sketch
# search page (app.py) on http://127.0.0.1:7860 over the demo's photos.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO_DATA := data/demo
# The cross-dataset evaluation's second dataset: the demo's unseen classes and ten of its seen ones, named and drawn
# anew (demo_data.py --cross_dataset); the demo model is evaluated on the classes it did not train on.
CROSS_DATA := data/demo_cross
DEMO_RUN := runs/demo
# The demo trains the from-scratch recipe (train.py's defaults with --no-pretrained: resnet18_w16 at 64 px, one
# shared trunk, class proxies, photo edge maps, test-time flips and shifts) for a fixed amount of training compute,
# DEMO_TFLOPS TFLOP, so that it learns the same on any machine (docs/results.md's demo table);
# `make demo DEMO_SEED=1` runs another seed. It validates every 4th epoch (and the last): each validation embeds
# the held-out images 10 times (test-time flips and shifts), and after all 19 epochs it cost a third of the training.
DEMO_TFLOPS := 4
DEMO_SEED := 0
DEMO_TRAIN_ARGS := --no-pretrained --budget_tflops $(DEMO_TFLOPS) --seed $(DEMO_SEED) --val_every 4 --print_every 10 \
	--workers 1
EXTRA_TRAIN_ARGS :=

.PHONY: demo test lint venv clean app

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements.txt
	touch $@

$(DEMO_DATA)/.demo_data: demo_data.py | venv
	PYTHON=$(PY) bash download_data.sh demo $(dir $(DEMO_DATA))

$(CROSS_DATA)/.demo_data: demo_data.py | venv
	$(PY) demo_data.py --output_dir $(CROSS_DATA) --cross_dataset

# One shell for the whole demo, so that it can say how long it took.
demo: venv $(DEMO_DATA)/.demo_data $(CROSS_DATA)/.demo_data
	@start=$$(date +%s) && \
	$(PY) train.py --data_dir $(DEMO_DATA) --checkpoint_dir $(DEMO_RUN) --overwrite $(DEMO_TRAIN_ARGS) $(EXTRA_TRAIN_ARGS) && \
	trained=$$(date +%s) && \
	$(PY) evaluate.py --model $(DEMO_RUN)/best.pth --data_dir $(DEMO_DATA) --output_dir $(DEMO_RUN)/eval \
		--task zs gzs fg --hash_bits 0 64 --num_sketches 10 --num_images 6 --compare_untrained --workers 1 \
		--save_embeddings $(DEMO_RUN)/eval/embeddings.pt && \
	$(PY) evaluate.py --model $(DEMO_RUN)/best.pth --data_dir $(CROSS_DATA) --output_dir $(DEMO_RUN)/eval_cross \
		--task zs fg --hash_bits 0 64 --num_sketches 0 --workers 1 && \
	$(PY) retrieve.py --model $(DEMO_RUN)/best.pth --gallery $(DEMO_DATA)/photos --query docs/retrieve_query.png \
		--output_dir $(DEMO_RUN)/retrieval --workers 1 && \
	echo "The recipe ablation on this demo (docs/results.md, bench/bench_recipes.py), beside this run's mAP@all above:" && \
	sed -n '/<!-- demo-table -->/,/<!-- end demo-table -->/p' docs/results.md | grep '^|' && \
	echo "make demo: training $$((trained - start)) s, evaluation and retrieval $$(($$(date +%s) - trained)) s (after the set-up)"

# The sketch search page over the demo's photos, with make demo's model; trained first (the demo's recipe and seed)
# when it is missing. The gallery index is kept beside the photos (data/demo/photos_index.pt).
app: venv $(DEMO_DATA)/.demo_data
	@test -f $(DEMO_RUN)/best.pth || $(PY) train.py --data_dir $(DEMO_DATA) --checkpoint_dir $(DEMO_RUN) $(DEMO_TRAIN_ARGS)
	$(PY) app.py --model $(DEMO_RUN)/best.pth --gallery $(DEMO_DATA)/photos --examples $(DEMO_DATA)/sketches

test: venv
	$(PY) -m pytest tests -q --durations=10

# ruff with pyproject.toml's settings: pycodestyle and pyflakes, lines of at most 120 characters.
lint: venv
	$(PY) -m ruff check .

clean:
	rm -rf $(DEMO_RUN) $(DEMO_DATA) $(CROSS_DATA)
