# Two commands on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
# CPU set-up: torch is pinned so pip takes the local CPU build instead of a multi-GB CUDA one.
TORCH_PIN ?= torch==2.13.0

.PHONY: demo test venv clean

$(VENV)/.done: pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q $(TORCH_PIN)
	$(VPY) -m pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.done

demo: $(VENV)/.done
	$(VENV)/bin/vlmq demo --out demo-out

test: $(VENV)/.done
	OMP_NUM_THREADS=1 $(VPY) -m pytest -q

clean:
	rm -rf demo-out .pytest_cache
