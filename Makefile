# The two commands of the README. Both install what they need first.
#   make demo  - train, evaluate and plot a small model on the bundled TiO2 subset (a few minutes on 2 CPU cores)
#   make test  - the whole test suite
PYTHON ?= python3
DEMO_OUT ?= demo_out

.PHONY: install demo test

# torch first: with no torch installed, take the CPU wheel torch==2.13.0 (a plain `pip install nequip` would pull
# a multi-GB CUDA build); an existing torch (e.g. a CUDA build on a GPU machine) is kept.
install:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install --quiet torch==2.13.0
	$(PYTHON) -m pip install --quiet -e '.[test]'

demo: install
	$(PYTHON) -m mlip_uq.cli train configs/demo_tio2.yaml --out $(DEMO_OUT)

test: install
	$(PYTHON) -m pytest -q tests
