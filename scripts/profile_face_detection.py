"""Where one MTCNN detection's time goes, in-process (no Triton): the bench's face photo through
imgpipe's cascade with the networks of a built repository's ``python`` target on this machine's device.

    python scripts/profile_face_detection.py REPOSITORY [--rounds 30]

Prints the mean time per detection with the networks in PyTorch, the same with each network call
replaced by its recorded outputs (the cascade's own work: pyramid, crops, NMS), and torch's profiler
table (top operators by self CPU time, and how many CUDA kernels one detection launches). A diagnostic
for issue 8's face pipelines; nothing imports it.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from imgpipe.bench import inputs
from imgpipe.ensembles import mtcnn
from imgpipe.ensembles.runners import TorchRunner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("repository", type=Path)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    runners = {n: TorchRunner.load(args.repository / n / "1", device, {}) for n in ("pnet", "rnet", "onet")}
    image = torch.as_tensor(inputs().face_rgb).to(device)
    params = mtcnn.MtcnnParams()
    recorded: dict[str, list[tuple[torch.Tensor, ...]]] = {}

    def network(role: str, batch: torch.Tensor) -> tuple[torch.Tensor, ...]:
        runner = runners[role]
        (out,) = runner.run([{runner.input_names[0]: batch}])
        outputs = tuple(out[n] for n in runner.output_names)
        recorded.setdefault(role, []).append(outputs)
        return outputs

    def replay() -> mtcnn.SyncRun:
        queues = {k: list(v) for k, v in recorded.items()}
        return lambda role, batch: queues[role].pop(0)

    def timed(run: mtcnn.SyncRun | None, label: str) -> None:
        start = time.perf_counter()
        for _ in range(args.rounds):
            faces = mtcnn.detect_sync(image, params, run or replay())
            if device.type == "cuda":
                torch.cuda.synchronize()
        per = (time.perf_counter() - start) / args.rounds
        print(f"{label}: {per * 1e3:.1f} ms per detection ({len(faces)} faces)")

    mtcnn.detect_sync(image, params, network)  # warm-up (cuDNN's choices, kernels)
    recorded.clear()
    mtcnn.detect_sync(image, params, network)
    calls = {k: len(v) for k, v in recorded.items()}
    print(f"device {device}; network calls per detection: {calls}")
    timed(network, "cascade with the networks")
    saved = {k: list(v) for k, v in recorded.items()}
    recorded.clear()
    recorded.update({k: v[: calls[k]] for k, v in saved.items()})
    timed(None, "cascade alone (network outputs replayed)")

    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        mtcnn.detect_sync(image, params, replay())
        if device.type == "cuda":
            torch.cuda.synchronize()
    events = prof.key_averages()
    print(events.table(sort_by="self_cpu_time_total", row_limit=25))
    launches = sum(e.count for e in events if e.key.startswith(("cudaLaunchKernel", "cuLaunchKernel")))
    syncs = sum(e.count for e in events if "Synchronize" in e.key or e.key == "cudaMemcpyAsync")
    print(f"one detection without the networks: {launches} kernel launches, {syncs} copies/synchronisations")


if __name__ == "__main__":
    main()
