#!/usr/bin/env bash
# The GPU checks of issue 8 on a node set up by scripts/gpu-node-setup.sh, each as one step that fits a
# short lease; results (logs, bench.json, plots, the server logs) go to OUT.
#   scripts/gpu-check.sh PREFIX OUT STEP
# PREFIX: gpu-node-setup.sh's prefix. Run from the imgpipe source tree (the tests are copied from it).
# STEP:
#   build    build the bench's three repositories (fp16, fp32, naive) into PREFIX/bench (~2 min)
#   profile  scripts/profile_face_detection.py on the fp16 repository: one MTCNN detection, in-process
#   fault    the face pipelines' fault under load (docs/benchmarks.md), old hand-over against new: fp16,
#            concurrency 16 for 15 s each, first with IMGPIPE_BLS_HOST_OUTPUTS=0 and Triton's 64 MiB CUDA
#            pool (the configuration that failed), then with the defaults; the server logs' copy failures
#            counted (~4 min; FAULT_RUNS=new runs the defaults alone, ~2 min)
#   bench    the full bench of docs/benchmarks.md (~9 min)
#   tests    the GPU tests (tests/test_gpu_serving.py, tests/test_cuda_runner.py; gRPC) (~4 min)
set -euo pipefail
prefix=${1:?usage: $0 PREFIX OUT STEP}
out=${2:?usage: $0 PREFIX OUT STEP}
step=${3:?usage: $0 PREFIX OUT STEP}
prefix=$(cd "$prefix" && pwd)
mkdir -p "$out"
out=$(cd "$out" && pwd)
tree=$(pwd)
export PATH="$prefix/venv/bin:$PATH" IMGPIPE_CACHE="$prefix/cache" PYTHONUNBUFFERED=1 COLUMNS=200
bench=(python -m imgpipe.cli bench -o "$prefix/bench")
faces=(--variants fp16 --pipelines detect_faces,swap_face,reconstruct_face --concurrency 16 --duration 15
       --warmup 2 --model-seconds 0.2)
copy_failures() {  # the Python backend's complaints about GPU buffers in a server log
    grep -ciE "failed to copy|falling back" "$1" || true
}
cd "$prefix"  # not from the source tree: its imgpipe/ folder would shadow the installed package
case "$step" in
    build)
        "${bench[@]}" --build-only 2>&1 | tail -5 ;;
    profile)
        python "$tree/scripts/profile_face_detection.py" "$prefix/bench/repos/fp16/repo" 2>&1 | tee "$out/profile.txt" ;;
    fault)
        for run in ${FAULT_RUNS:-old new}; do
            if [ "$run" = old ]; then
                IMGPIPE_BLS_HOST_OUTPUTS=0 IMGPIPE_CUDA_MEMORY_POOL_MIB=64 "${bench[@]}" "${faces[@]}" > "$out/fault-$run.log" 2>&1 || true
            else
                "${bench[@]}" "${faces[@]}" > "$out/fault-$run.log" 2>&1 || true
            fi
            gzip -c "$prefix/bench/repos/fp16/triton.log" > "$out/fault-$run-triton.log.gz"
            echo "$run: server log lines about GPU copies: $(copy_failures "$prefix/bench/repos/fp16/triton.log")"
            grep -E "concurrency 16" "$out/fault-$run.log" || tail -5 "$out/fault-$run.log"
        done ;;
    bench)
        "${bench[@]}" --concurrency 1,4,16,64 --duration 3 --warmup 1 --model-seconds 1 \
            --remove-background-format webp > "$out/bench.log" 2>&1
        cp "$prefix/bench/bench.json" "$prefix"/bench/bench_*.png "$out/"
        for variant in fp16 fp32 naive; do
            echo "$variant: server log lines about GPU copies: $(copy_failures "$prefix/bench/repos/$variant/triton.log")"
        done
        tail -40 "$out/bench.log" ;;
    tests)
        rm -rf "$prefix/run" && mkdir -p "$prefix/run" && cp -r "$tree/tests" "$tree/pyproject.toml" "$prefix/run/"
        cd "$prefix/run"
        python -m pytest -q -p no:cacheprovider tests/test_gpu_serving.py tests/test_cuda_runner.py -k "not http" 2>&1 \
            | tee "$out/tests.log" | tail -15 ;;
    *)
        echo "unknown step $step (build, profile, fault, bench, tests)" >&2
        exit 2 ;;
esac
