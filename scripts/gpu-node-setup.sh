#!/usr/bin/env bash
# Set up a GPU node that has CUDA PyTorch but no package registry to build, serve and benchmark imgpipe
# with the local Triton server. Run from the imgpipe source tree; the payload comes from
# scripts/pack-gpu-payload.sh. Safe to run again (it re-installs imgpipe from the tree).
#   scripts/gpu-node-setup.sh PAYLOAD_DIR PREFIX
# Afterwards: PREFIX/venv/bin/python -m imgpipe.cli ...   (the venv's bin/ must come first on PATH when
# the server starts: the Python-backend stub finds its packages through that python3; imgpipe's
# launcher puts it there). Run it, and the tests (copy tests/ elsewhere), outside the source tree: the
# tree's imgpipe/ folder would shadow the installed package.
# The venv sees, in this order: the payload's packages (numpy 1.26.4 first: Triton's Python backend
# mis-sizes numpy-2 outputs), the server's files, imgpipe, and the node's own torch environment.
set -euo pipefail
payload=${1:?usage: $0 PAYLOAD_DIR PREFIX}
prefix=${2:?usage: $0 PAYLOAD_DIR PREFIX}
mkdir -p "$prefix"
prefix=$(cd "$prefix" && pwd)
if [ ! -x "$prefix/server/pytriton/tritonserver/bin/tritonserver" ]; then
    mkdir -p "$prefix/server" && tar xzf "$payload/tritonserver.tgz" -C "$prefix/server"
fi
if [ ! -d "$prefix/site/numpy" ]; then
    mkdir -p "$prefix/site" && tar xzf "$payload/site.tgz" -C "$prefix/site"
fi
torch_site=$(python3 -c "import pathlib, torch; print(pathlib.Path(torch.__file__).resolve().parent.parent)")
base=$(python3 -c "import sys; print(sys._base_executable)")
[ -x "$prefix/venv/bin/python" ] || "$base" -m venv --without-pip "$prefix/venv"
venv_site=$("$prefix/venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
printf '%s\n' "$prefix/site" > "$venv_site/00-payload.pth"
printf '%s\n' "$prefix/server" > "$venv_site/01-tritonserver.pth"
printf '%s\n' "$prefix/app" > "$venv_site/02-imgpipe.pth"
printf '%s\n' "$torch_site" > "$venv_site/03-torch.pth"
rm -rf "$prefix/app" "$prefix/build-tmp"
python3 -m pip install -q --no-deps --no-build-isolation --no-index --target "$prefix/app" . >/dev/null
cd "$prefix"  # not from the source tree: its imgpipe/ folder would shadow the installed package
"$prefix/venv/bin/python" - <<'PY'
import numpy, torch, tritonclient.grpc, imgpipe
from imgpipe.server import TritonDistribution
print(f"numpy {numpy.__version__}, torch {torch.__version__} (CUDA {torch.cuda.is_available()},"
      f" {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}),"
      f" imgpipe from {imgpipe.__file__}, tritonserver at {TritonDistribution.find().binary}")
PY
