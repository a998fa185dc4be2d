# The two set-up commands of the README:
#   make demo   a short multi-task HyperPrompt run, ZeRO-3 over 2 local CPU ranks, bundled tasks
#   make test   the whole test suite (unit, multi-rank ZeRO-3, launchers and SLURM end to end)
# Both create .venv and install what they need on first use.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# A CPU build of torch: an unpinned torch would pull a CUDA build of several GB.
TORCH_CPU ?= torch==2.13.0
DEMO_DIR ?= runs/demo

.PHONY: venv shm-op demo test test-fast bench clean

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_CPU)"
	$(PY) -m pip install -q -e ".[dev]" mpich
	touch $(STAMP)

# DeepSpeed JIT-builds its CPU shared-memory collective op (deepspeed_shm_comm) in torch's
# extension cache when a process group starts, and the cache's build files name the venv. Built
# here once, ranks only load it instead of all waiting on one build's lock file under test
# timeouts; and a build killed midway leaves that lock behind, which would hang every later start,
# so a lock no build holds is removed first (nothing else builds while make runs this). The venv's
# ninja builds it into the venv's own build folder, as in every rank (compat/torch.py: another
# ninja version, or another environment's build files, would rebuild it).
SHM_LOCK = $(HOME)/.cache/torch_extensions/py*/deepspeed_shm_comm/lock
shm-op:
	rm -f $(SHM_LOCK)
	PATH=$(abspath $(VENV))/bin:$$PATH DS_ACCELERATOR=cpu $(PY) -c "from hp_deepspeed.launching.device import prepare_process; prepare_process(); from deepspeed.comm.torch import build_shm_op; build_shm_op()"

demo: $(STAMP) shm-op
	PATH=$(abspath $(VENV))/bin:$$PATH bash launch/demo.sh $(DEMO_DIR)

# Two pytest-xdist workers: the launcher and cluster tests run one after another on one, the other
# multi-rank tests likewise on the other, single-process modules fill in (tests/conftest.py groups
# them, and gives every process one compute thread).
TEST_WORKERS ?= 2
test: $(STAMP) shm-op
	PATH=$(abspath $(VENV))/bin:$$PATH $(PY) -m pytest tests -n $(TEST_WORKERS) --dist loadgroup --durations=30

test-fast: $(STAMP)
	PATH=$(abspath $(VENV))/bin:$$PATH $(PY) -m pytest tests -m "not distributed and not e2e"

bench: $(STAMP)
	PATH=$(abspath $(VENV))/bin:$$PATH $(PY) -m bench.run_all

clean:
	rm -rf $(VENV) runs .pytest_cache
