# cnnserve: the two commands a new user needs are `make serve` and `make test`.
# Everything they need is set up here, on a fresh machine, by `make setup`.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
MODELS ?= models
FMNIST_SYSTEM_DIR := /usr/share/datasets/fashion-mnist
STAMP := $(VENV)/.installed

.PHONY: setup serve test test-fast models report quick-models lint format protos clean \
	bench bench-quick bench-gpu bench-triton-env

setup: $(STAMP)

# The venv is rebuilt when the project's dependencies change.
$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "make setup: $(PYTHON) not found"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch exactly 2.13.0: a looser spec pulls a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[export,test,score,ray]"
	@$(MAKE) --no-print-directory dataset
	@touch $(STAMP)

# Fashion-MNIST from Debian's package where apt is usable; otherwise the loader downloads it
# from the official URLs (with MD5 checks) on first use.
.PHONY: dataset
dataset:
	@if [ -f $(FMNIST_SYSTEM_DIR)/t10k-labels-idx1-ubyte.gz ]; then \
		echo "Fashion-MNIST: $(FMNIST_SYSTEM_DIR)"; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		(apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
		 (apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null)) && \
		echo "Fashion-MNIST: installed Debian package dataset-fashion-mnist"; \
	else \
		echo "Fashion-MNIST: no Debian package here; it will be downloaded on first use"; \
	fi

# The quick set (logreg, mlp, lenet5, kirsch) is trained and exported on first run only.
quick-models: setup
	$(BIN)/cnnserve-export all --quick --skip-existing --model-repository $(MODELS)

SAMPLES ?= samples
GRPC_PORT ?= 8001
METRICS_PORT ?= 8002

$(SAMPLES)/00000-ankle-boot.png: | setup
	$(BIN)/cnnserve-export samples $(SAMPLES) --count 10 >/dev/null

serve: quick-models $(SAMPLES)/00000-ankle-boot.png
	@echo
	@echo "cnnserve: gRPC on 127.0.0.1:$(GRPC_PORT), Prometheus metrics on http://127.0.0.1:$(METRICS_PORT)/metrics"
	@echo "Once it logs 'serving', try from another terminal:"
	@echo "  $(BIN)/cnnserve classify $(SAMPLES)/00000-ankle-boot.png --model lenet5"
	@echo "  $(BIN)/cnnserve models"
	@echo
	$(BIN)/cnnserve serve --model-repository $(MODELS) --grpc-port $(GRPC_PORT) --metrics-port $(METRICS_PORT)

# The whole family and its int8 variants (served only where faster and accurate), then the
# model table docs/MODELS.md. Resumes where it stopped: finished models are skipped, the one in
# training restarts from its last epoch checkpoint.
models: setup
	$(BIN)/cnnserve-export all --skip-existing --quantize auto --model-repository $(MODELS)
	$(BIN)/cnnserve-export report --model-repository $(MODELS)

# Measure the repository's models again and rewrite docs/MODELS.md (no training).
report: setup
	$(BIN)/cnnserve-export report --model-repository $(MODELS)

# Serving benchmarks: cnnserve beside raw ONNX Runtime, Triton (via PyTriton) and a naive
# server, then docs/BENCHMARKS.md from the JSON (bench/serving). Run it on a quiet machine: about
# half an hour, more the first time, when it exports the whole family for the memory figure.
# Triton lives in its own environment: PyTriton ships a tritonserver binary and pins numpy < 2,
# neither of which belongs in the project's. If it cannot be made, the suite skips Triton and
# says why in the report.
TRITON_VENV := bench/.venv-triton
TRITON_STAMP := $(TRITON_VENV)/.installed
TRITON_PACKAGES := nvidia-pytriton==0.7.0 onnxruntime==1.32.0 numpy==1.26.4

bench-triton-env: $(TRITON_STAMP)

$(TRITON_STAMP): | setup
	test -x $(TRITON_VENV)/bin/python || \
		"$$($(BIN)/python -c 'import sys; print(sys._base_executable)')" -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/pip install --quiet --upgrade pip
	$(TRITON_VENV)/bin/pip install --quiet $(TRITON_PACKAGES)
	@touch $@

bench: setup
	@$(MAKE) --no-print-directory bench-triton-env || \
		echo "bench: no Triton environment; the suite will skip Triton and say why"
	$(BIN)/python -m bench.serving

# A smoke run (seconds per point, one repeat); it writes under bench/results/quick/, never docs/.
bench-quick: setup
	@$(MAKE) --no-print-directory bench-triton-env || \
		echo "bench-quick: no Triton environment; the suite will skip Triton and say why"
	$(BIN)/python -m bench.serving --quick --out bench/results/quick/serving.json \
		--docs bench/results/quick/BENCHMARKS.md --gpu-data bench/results/quick/serving-cuda.json

# The same suite on a GPU, with ONNX Runtime's CUDA execution provider (needs onnxruntime-gpu:
# the `gpu` extra); it stops with exit status 2 before measuring anything if sessions would not
# run on CUDA. Triton (CPU-only here) is skipped, and the models come from bench/models as the
# CPU run left them. It writes only bench/results/serving-cuda.json, keeping the run already
# there as serving-cuda-<its commit>.json; `make bench-report` (or the next `make bench`)
# renders docs/BENCHMARKS.md from both runs' JSON, the GPU figures in a section of their own
# after the CPU ones, with a table of every GPU run kept. Where the tree was copied without its
# own git history, `CNNSERVE_REVISION=<commit>` names the commit the run measured. About 4
# minutes on 16 cores (see bench/serving).
GPU_BENCH_ARGS ?= --systems raw,native,oip,naive,floor --repeats 1 --seconds 1 --no-family
bench-gpu: setup
	$(BIN)/python -m bench.serving --device cuda $(GPU_BENCH_ARGS)

# docs/BENCHMARKS.md again from bench/results/serving.json and, if present, serving-cuda.json.
.PHONY: bench-report
bench-report: setup
	$(BIN)/python -m bench.serving.report

test: setup
	$(BIN)/python -m pytest -ra

test-fast: setup
	$(BIN)/python -m pytest -ra -m "not slow"

lint: setup
	$(BIN)/ruff check export service tests bench deploy
	$(BIN)/ruff format --check export service tests bench deploy

format: setup
	$(BIN)/ruff format export service tests bench deploy
	$(BIN)/ruff check --fix export service tests bench deploy

# Regenerate the committed gRPC code after editing protos/ (tests/unit/test_protos.py checks it).
protos: setup
	$(BIN)/python -m grpc_tools.protoc -Iservice/proto=protos --python_out=. \
		--grpc_python_out=. --pyi_out=. protos/*.proto

clean:
	rm -rf $(VENV) .pytest_cache $(SAMPLES)
