# The two commands of the README. Both install what they need first.
#   make demo  - on the bundled TiO2 subset: a small MAP model, then a K = 8 partially Bayesian SG-MCMC posterior
#                on top of it, recalibrated on the validation split, evaluated on the test split, and a short
#                uncertainty-aware MD run (a few minutes on 2 CPU cores)
#   make test  - the whole test suite, on TEST_WORKERS cores (pytest-xdist): each test file on one worker, so that
#                the runs a file's tests share are trained once, handed out in collection order (the long
#                integration files first, so that the many short unit files even out the end)
#   make install - torch (see TORCH below), then `pip install -e '.[test]'`
PYTHON ?= python3
TEST_WORKERS ?= 2
DEMO_OUT ?= demo_out
# The torch that `make install` installs when none is installed yet (an installed torch, CPU or CUDA, is kept;
# `pip uninstall torch` first to switch):
#   TORCH=cpu  (default) the CPU build: first a wheel the machine holds (`pip install --no-index`: pip's
#              find-links, e.g. a local wheel folder), else PyTorch's CPU index, TORCH_CPU_INDEX. A plain
#              `pip install torch` (or `pip install nequip`) would take PyPI's build, which on Linux x86-64 is the
#              multi-GB CUDA one.
#   TORCH=cuda PyPI's default build (CUDA on Linux x86-64), for a machine with an NVIDIA GPU.
TORCH ?= cpu
TORCH_VERSION ?= 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

ifeq ($(TORCH),cpu)
TORCH_INSTALL = $(PYTHON) -m pip install --quiet --no-index torch==$(TORCH_VERSION) 2>/dev/null || $(PYTHON) -m pip install --quiet --index-url $(TORCH_CPU_INDEX) torch==$(TORCH_VERSION)
else ifeq ($(TORCH),cuda)
TORCH_INSTALL = $(PYTHON) -m pip install --quiet torch==$(TORCH_VERSION)
else
$(error TORCH=$(TORCH): use TORCH=cpu (the CPU build, the default) or TORCH=cuda (PyPI's CUDA build))
endif

.PHONY: install demo test

install:
	$(PYTHON) -c "import torch" 2>/dev/null || { $(TORCH_INSTALL); }
	$(PYTHON) -m pip install --quiet -e '.[test]'

DEMO_DATA = data/tio2_aenet_subset_1000.extxyz
DEMO_MAP = $(abspath $(DEMO_OUT))

demo: install
	$(PYTHON) -m mlip_uq.cli train configs/demo_tio2.yaml --out $(DEMO_OUT) --overwrite
	$(PYTHON) -m mlip_uq.cli train configs/demo_tio2_sgmcmc.yaml --out $(DEMO_OUT)/sgmcmc --overwrite \
		sgmcmc.init=$(DEMO_MAP)/posterior.h5 sgmcmc.prior.center=$(DEMO_MAP)/posterior.h5 data.store=$(DEMO_MAP)/data.h5
	$(PYTHON) -m mlip_uq.cli calibrate $(DEMO_OUT)/sgmcmc/posterior.h5 $(DEMO_DATA) --split $(DEMO_OUT)/splits.json \
		--out $(DEMO_OUT)/sgmcmc/calibration.json
	$(PYTHON) -m mlip_uq.cli evaluate $(DEMO_OUT)/sgmcmc/posterior.h5 $(DEMO_DATA) --split $(DEMO_OUT)/splits.json \
		--out $(DEMO_OUT)/sgmcmc/metrics_calibrated.json --plots $(DEMO_OUT)/sgmcmc/calibrated
	$(PYTHON) -m mlip_uq.cli md $(DEMO_OUT)/sgmcmc/posterior.h5 $(DEMO_DATA) --index 0 --steps 200 --temperature 300 \
		--max-force-std 2.0 --out $(DEMO_OUT)/md

test: install
	$(PYTHON) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder tests
