# The virtual environment: the active one when there is one, else ./.venv (created on demand).
VENV ?= $(if $(VIRTUAL_ENV),$(VIRTUAL_ENV),.venv)
BIN := $(VENV)/bin
PYTHON ?= python3

.PHONY: install test demo bench docs

# CPU=1: torch and torchvision from PyTorch's CPU-only wheels (about 1 GB installed instead of 5.7 GB with
# the CUDA libraries); the pins are pyproject.toml's (tests/test_docs.py checks that they agree).
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_PINS := 'torch>=2.1,<=2.14.1' 'torchvision<=0.29.1'

install:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(if $(CPU),$(BIN)/python -m pip install $(TORCH_PINS) --index-url $(TORCH_CPU_INDEX))
	$(BIN)/python -m pip install -e '.[test]'

test:
	$(BIN)/lint-imports
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

docs:  # the command reference, from the command line's own help (tests/test_docs.py checks it is current)
	$(BIN)/python -m typer apecli.cli.commands utils docs --name apecli --title "apecli command reference" --output docs/cli.md

demo:
	HF_HUB_OFFLINE=1 $(BIN)/apecli demo --store caches-demo

bench:
	$(BIN)/python benchmarks/refine_speed.py
	$(BIN)/python benchmarks/grid_speed.py
	$(BIN)/python benchmarks/imagenet_scale.py --images 20000  # the baselines need ~13 GB at 50,000
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/extract_throughput.py --model tiny --images 512
	$(BIN)/python benchmarks/resize_batch.py --device cpu --repeat 3
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/extract_seeds.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/fit_speed.py
	$(BIN)/python benchmarks/fit_imagenet.py  # 3 epochs; --epochs 20 for ImageNet's whole fit
	$(BIN)/python benchmarks/methods_imagenet.py --classes 100 --dim 512 --val 1649 --test 2465 --views 10  # Caltech101 shape; no options: ImageNet shape (about 11 min)
