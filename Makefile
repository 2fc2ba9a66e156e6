# make demo: set up .venv, generate the demo data, train, evaluate, write retrieval grids.
# make test: set up .venv, run the test suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO_DATA := data/demo
DEMO_RUN := runs/demo
DEMO_TRAIN_ARGS := --backbone resnet18 --no-pretrained --image_size 64 --embedding_dim 128 --epochs 8 \
	--batch_size 32 --lr 1e-3 --grl_threshold_epoch 2 --print_every 50 --workers 1

.PHONY: demo test venv clean

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements.txt
	touch $@

demo: venv
	PYTHON=$(PY) bash download_data.sh demo data
	$(PY) train.py --data_dir $(DEMO_DATA) --checkpoint_dir $(DEMO_RUN) $(DEMO_TRAIN_ARGS)
	$(PY) evaluate.py --model $(DEMO_RUN)/best.pth --data $(DEMO_DATA) --output_dir $(DEMO_RUN)/eval \
		--num_sketches 10 --num_images 6 --compare_untrained --workers 1

test: venv
	$(PY) -m pytest tests -q

clean:
	rm -rf $(DEMO_RUN) $(DEMO_DATA)
