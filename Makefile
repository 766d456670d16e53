# Every target creates .venv on first use. Torch comes first: the CPU build where there is no
# NVIDIA GPU (a plain `torch` requirement would pull a multi-GB CUDA build), the default CUDA
# build where `nvidia-smi` answers. Override with e.g. `make test TORCH_SPEC=torch==2.5.1`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
ifeq ($(HAS_GPU),1)
TORCH_SPEC ?= torch>=2.4
TORCH_INDEX ?=
else
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
endif
export HF_HUB_OFFLINE := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: serve serve-ray test lint bench bench-unet protos accuracy train-mnist train-classifier model-card clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" $(TORCH_INDEX)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

# Serves the embedded mnist model on 127.0.0.1:50051 (settings: SAMPLER_* variables or SERVE_ARGS flags).
serve: $(VENV)/.installed
	$(PY) -m sampler_service serve $(SERVE_ARGS)

# The same service on Ray Serve: a local Ray head, the applications of deploy/ray/serve.yaml, gRPC
# proxy on 127.0.0.1:9000 (sampler-client --target 127.0.0.1:9000 --ray ...); RAY_ARGS e.g. --replicas 2.
serve-ray: $(VENV)/.installed
	$(PY) -m sampler_service ray --config deploy/ray/serve.yaml $(RAY_ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/hadolint Dockerfile

test: lint
	$(VENV)/bin/pytest

bench: $(VENV)/.installed
	$(VENV)/bin/pytest bench/speed/test_solver_overhead.py --benchmark-only --benchmark-json=bench/results/solver-overhead-raw.json -p no:cacheprovider
	$(PY) -m bench solver-overhead --raw bench/results/solver-overhead-raw.json
	$(MAKE) bench-unet
	$(PY) -m bench serve-load
	$(PY) -m bench batch-invariance

bench-unet: $(VENV)/.installed
	$(VENV)/bin/pytest bench/speed/test_unet_throughput.py bench/speed/test_end_to_end.py --benchmark-only --benchmark-json=bench/results/model-speed-raw.json -p no:cacheprovider
	$(PY) -m bench model-speed --raw bench/results/model-speed-raw.json

# The embedded models: retraining makes a new model (see models/builtin/README.md).
train-mnist: $(VENV)/.installed
	$(PY) -m models.mnist.train_diffusion $(TRAIN_ARGS)

train-classifier: $(VENV)/.installed
	$(PY) -m models.mnist.train_classifier $(TRAIN_ARGS)

model-card: $(VENV)/.installed
	$(PY) -m bench model-card

protos: $(VENV)/.installed
	$(PY) -m tools.protogen

accuracy: $(VENV)/.installed
	$(PY) -m bench accuracy

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache .benchmarks
