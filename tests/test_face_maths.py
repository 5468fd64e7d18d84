"""The face pipelines' pre/post-processing on torch tensors: the same results on every device, the
batched paths equal to the per-face ones, and the reference numpy maths they replaced."""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest
import torch

from imgpipe.ensembles import face_decoders, mtcnn
from imgpipe.ensembles import face_geometry as geo
from imgpipe.samples import sample_array

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")),
]
ASTRONAUT_LANDMARKS = torch.tensor(
    [[204.5, 100.8], [246.8, 102.9], [224.5, 128.8], [201.2, 139.1], [244.8, 141.7]], dtype=torch.float64
)



@pytest.fixture(scope="module")
def astronaut() -> torch.Tensor:
    return torch.from_numpy(sample_array("astronaut").copy())


def _on(device: str, value: torch.Tensor) -> None:
    assert value.device.type == torch.device(device).type, f"{value.device} is not {device}"


def _same(ours: torch.Tensor, cpu: torch.Tensor, atol: float = 1e-5) -> None:
    torch.testing.assert_close(ours.cpu(), cpu, rtol=0, atol=atol)


def _same_faces(ours: mtcnn.Faces, cpu: mtcnn.Faces, device: str, atol: float = 1e-4) -> None:
    for name in ("boxes", "scores", "landmarks"):
        _on(device, getattr(ours, name))
        _same(getattr(ours, name), getattr(cpu, name), atol)


# -- MTCNN ------------------------------------------------------------------------------------------


def _reference_nms(boxes: np.ndarray, scores: np.ndarray, threshold: float, method: str = "union") -> np.ndarray:
    """The numpy implementation the torch one replaced (itself a copy of the reference's)."""
    if len(boxes) == 0:
        return np.zeros((0,), np.int64)
    x1, y1, x2, y2 = boxes.T
    area = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(scores, kind="stable")
    keep = []
    while order.size:
        i = order[-1]
        keep.append(i)
        rest = order[:-1]
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1)
        inter = w * h
        denom = np.minimum(area[i], area[rest]) if method == "min" else area[i] + area[rest] - inter
        order = rest[inter / denom <= threshold]
    return np.array(keep, dtype=np.int64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("method", ["union", "min"])
def test_nms_matches_the_reference_including_ties(device: str, dtype: torch.dtype, method: str) -> None:
    generator = torch.Generator().manual_seed(5)
    for count in (1, 7, 300, 2500):  # 2500: several blocks of pairs
        corner = torch.randint(0, 400, (count, 2), generator=generator).to(dtype)
        side = torch.randint(5, 60, (count, 2), generator=generator).to(dtype)
        boxes = torch.cat([corner, corner + side], 1)
        scores = torch.randint(0, 20, (count,), generator=generator).to(dtype) / 20  # many equal scores
        expected = _reference_nms(boxes.numpy(), scores.numpy(), 0.4, method)
        kept = mtcnn.nms(boxes.to(device), scores.to(device), 0.4, method)
        _on(device, kept)
        assert kept.dtype == torch.int64 and kept.cpu().tolist() == expected.tolist()


@pytest.mark.parametrize("device", DEVICES)
def test_nms_of_groups_is_each_groups_own_nms(device: str) -> None:
    """stage1 runs every pyramid level's NMS in one call: the same boxes, group by group, as the reference
    keeps them alone, even where boxes of different groups overlap (they never suppress each other)."""
    generator = torch.Generator().manual_seed(11)
    sizes = [3, 0, 250, 1, 40, 2500]  # an empty group, a single box; 2500: several blocks of rows
    corner = torch.randint(0, 200, (sum(sizes), 2), generator=generator).to(torch.float64)
    side = torch.randint(5, 60, (sum(sizes), 2), generator=generator).to(torch.float64)
    boxes = torch.cat([corner, corner + side], 1)
    scores = torch.randint(0, 20, (sum(sizes),), generator=generator).to(torch.float64) / 20
    kept = mtcnn.nms_groups(boxes.to(device), scores.to(device), sizes, 0.5)
    _on(device, kept[0])
    start = 0
    for size, group in zip(sizes, kept, strict=True):
        expected = _reference_nms(boxes[start : start + size].numpy(), scores[start : start + size].numpy(), 0.5)
        assert group.cpu().tolist() == (expected + start).tolist()
        start += size


def _reference_crops(image: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """The per-box loop that the batched crops replaced: cut each zero-padded float64 patch (as the MTCNN
    reference does) and resize it alone with the single-image resize (OpenCV's INTER_AREA)."""
    height, width = image.shape[-2:]
    out = []
    for x1, y1, x2, y2 in boxes[:, :4].to(torch.int64).tolist():
        bw, bh = x2 - x1 + 1, y2 - y1 + 1
        patch = torch.zeros((max(bh, 1), max(bw, 1), 3), dtype=torch.float64)
        sx1, sy1, sx2, sy2 = max(x1 - 1, 0), max(y1 - 1, 0), min(x2, width), min(y2, height)
        if sx2 > sx1 and sy2 > sy1:
            pixels = image[0, :, sy1:sy2, sx1:sx2].permute(1, 2, 0)
            patch[sy1 - y1 + 1 : sy2 - y1 + 1, sx1 - x1 + 1 : sx2 - x1 + 1] = pixels
        out.append(mtcnn.resize_area(patch, size, size))
    return ((torch.stack(out) - 127.5) * 0.0078125).to(torch.float32).permute(0, 2, 1, 3)


@pytest.mark.parametrize("size", [24, 48])
def test_batched_crops_equal_the_per_box_patches(astronaut: torch.Tensor, size: int) -> None:
    image = mtcnn.image_tensor(astronaut)
    height, width = astronaut.shape[:2]
    generator = torch.Generator().manual_seed(size)
    count = 300
    corner = torch.stack(
        [torch.randint(-80, width + 40, (count,), generator=generator), torch.randint(-80, height + 40, (count,))], 1
    )
    side = torch.randint(1, size + 4, (count,), generator=generator)  # small: enlarged; half of them large below
    side[::2] = torch.randint(size, 400, (count // 2,), generator=generator)
    side[:3] = torch.tensor([0, -5, size])  # degenerate boxes, and one exactly the output size
    stretch = torch.randint(-1, 2, (count,), generator=generator)  # after rounding boxes are not always square
    boxes = torch.stack([corner[:, 0], corner[:, 1], corner[:, 0] + side, corner[:, 1] + side + stretch], 1)
    boxes = torch.cat([boxes.to(torch.float64), torch.rand(count, 1, dtype=torch.float64)], 1)
    ours, expected = mtcnn.crops(image, boxes, size), _reference_crops(image, boxes, size)
    assert ours.shape == (count, size, size, 3) and ours.dtype == torch.float32 and ours.is_contiguous()
    side_x, side_y = (boxes[:, 2] - boxes[:, 0] + 1), (boxes[:, 3] - boxes[:, 1] + 1)
    shrunk = (side_x >= size) & (side_y >= size)
    assert shrunk.sum() > 100 and (~shrunk).sum() > 100
    assert torch.equal(ours, expected)  # the same float64 maths, whether batched or one box at a time
    assert mtcnn.crops(image, boxes[:0], size).shape == (0, size, size, 3)


@pytest.mark.parametrize("device", DEVICES)
def test_cascade_stages_run_on_the_device_and_agree_with_the_cpu(
    device: str, run: mtcnn.SyncRun, astronaut: torch.Tensor
) -> None:
    params = mtcnn.MtcnnParams()
    height, width = astronaut.shape[:2]
    scales = mtcnn.pyramid(height, width, params)
    cpu_image, image = mtcnn.image_tensor(astronaut), mtcnn.image_tensor(astronaut.to(device))
    _on(device, image)

    levels, cpu_levels = mtcnn.pnet_inputs(image, scales), mtcnn.pnet_inputs(cpu_image, scales)
    for level, cpu_level in zip(levels, cpu_levels, strict=True):
        _on(device, level)
        _same(level, cpu_level)
    outs = [run("pnet", x) for x in cpu_levels]  # the same network outputs for both devices
    boxes = mtcnn.stage1([(r.to(device), p.to(device)) for r, p in outs], scales, params)
    cpu_boxes = mtcnn.stage1(outs, scales, params)
    _on(device, boxes)
    assert boxes.dtype == torch.float64 and len(cpu_boxes) > 10
    _same(boxes, cpu_boxes, 0)

    patches, cpu_patches = mtcnn.crops(image, boxes, 24), mtcnn.crops(cpu_image, cpu_boxes, 24)
    _on(device, patches)
    _same(patches, cpu_patches)
    reg, prob = run("rnet", cpu_patches)
    boxes, cpu_boxes = (
        mtcnn.stage2(boxes, reg.to(device), prob.to(device), params),
        mtcnn.stage2(cpu_boxes, reg, prob, params),
    )
    _on(device, boxes)
    _same(boxes, cpu_boxes, 0)

    patches, cpu_patches = mtcnn.crops(image, boxes, 48), mtcnn.crops(cpu_image, cpu_boxes, 48)
    _on(device, patches)
    _same(patches, cpu_patches)
    reg, points, prob = run("onet", cpu_patches)
    faces = mtcnn.stage3(boxes, reg.to(device), points.to(device), prob.to(device), params, height, width)
    cpu_faces = mtcnn.stage3(cpu_boxes, reg, points, prob, params, height, width)
    assert len(cpu_faces) == 1
    _same_faces(faces, cpu_faces, device, 0)


@pytest.mark.parametrize("device", DEVICES)
def test_the_whole_cascade_on_the_device_agrees_with_the_cpu(
    device: str, run: mtcnn.SyncRun, astronaut: torch.Tensor
) -> None:
    seen: set[str] = set()

    def recording(role: str, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        seen.add(x.device.type)
        assert x.dtype == torch.float32 and x.is_contiguous()
        return run(role, x)  # outputs come back on the CPU: the cascade moves them

    params = mtcnn.MtcnnParams(thresholds=(0.6, 0.6, 0.6))
    faces = mtcnn.detect_sync(astronaut.to(device), params, recording)
    assert seen == {torch.device(device).type}
    _same_faces(faces, mtcnn.detect_sync(astronaut, params, run), device)
    largest = faces.largest()
    assert faces.select([largest]).to("cpu").scores[0] == faces.scores[largest].item()
    _on(device, mtcnn.Faces.none(device).boxes)


# -- single-network detectors -----------------------------------------------------------------------


def _constructed_outputs(counts: list[int], columns: list[int], seed: int) -> list[torch.Tensor]:
    """Random network outputs: per stride, every output kind; a few cells score high."""
    generator = torch.Generator().manual_seed(seed)
    outputs = []
    for width in columns:
        for n in counts:
            if width == 1:
                outputs.append(torch.rand((1, n, 1), generator=generator) ** 20)  # a few above the thresholds
            else:
                outputs.append(torch.rand((1, n, width), generator=generator) * 2)
    return outputs


@pytest.mark.parametrize("device", DEVICES)
def test_decoders_run_on_the_device_and_agree_with_the_cpu(device: str) -> None:
    size = 160
    cells = [(size // s) ** 2 for s in face_decoders.STRIDES]
    scrfd = _constructed_outputs([2 * c for c in cells], [1, 4, 10], seed=1)
    yunet = _constructed_outputs(cells, [1, 1, 4, 10], seed=2)
    yunet[3:6] = [torch.ones_like(o) for o in yunet[3:6]]  # objectness 1: the score is √cls
    for decode, outputs in ((face_decoders.decode_scrfd, scrfd), (face_decoders.decode_yunet, yunet)):
        cpu = decode(outputs, size, size, threshold=0.5)
        assert 3 <= len(cpu) < 40  # some faces
        _same_faces(decode([o.to(device) for o in outputs], size, size, threshold=0.5), cpu, device, 1e-4)
        empty = decode([o.to(device) * 0 for o in outputs], size, size)
        assert len(empty) == 0
        _on(device, empty.boxes)


@pytest.mark.parametrize("device", DEVICES)
def test_anchor_grids_are_made_once_per_device(device: str) -> None:
    grid = face_decoders.anchor_centers(640, 640, 16, 2, device)
    _on(device, grid)
    assert face_decoders.anchor_centers(640, 640, 16, 2, torch.device(device)) is grid
    assert torch.equal(grid.cpu(), face_decoders.anchor_centers(640, 640, 16, 2))
    assert grid.shape == (40 * 40 * 2, 2) and grid[-1].tolist() == [624, 624]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("detector", ["scrfd", "yunet"])
def test_letterbox_on_the_device_agrees_with_the_cpu(device: str, detector: str, astronaut: torch.Tensor) -> None:
    wide = astronaut[:300]  # 300×512: padded at the bottom
    x, box = face_decoders.letterbox(wide.to(device), 320, detector)
    cpu, cpu_box = face_decoders.letterbox(wide, 320, detector)
    _on(device, x)
    assert x.shape == (1, 3, 320, 320) and x.dtype == torch.float32 and box == cpu_box
    _same(x, cpu, 1e-2)  # the antialiasing kernels' float rounding differs between devices (≈1e-5 relative)
    faces = mtcnn.Faces(
        torch.tensor([[10.0, 20, 300, 310]], device=device), torch.ones(1, device=device), torch.ones(1, 5, 2)
    ).to(device)
    mapped = box.to_image(faces, 300, 512)
    _on(device, mapped.boxes)
    assert mapped.boxes[0].tolist() == pytest.approx([16, 32, 480, 300])  # clipped to the image


# -- alignment, warping, paste-back -------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_templates_are_made_once_per_device(device: str) -> None:
    points = geo.template("arcface_128", 128, device)
    _on(device, points)
    assert points.dtype == torch.float64 and geo.template("arcface_128", 128, torch.device(device)) is points
    np.testing.assert_array_equal(points.cpu().numpy(), geo.TEMPLATES["arcface_128"] * 128)
    assert geo.template("arcface_128", 128, device, torch.float32).dtype == torch.float32
    with pytest.raises(KeyError, match="unknown alignment template"):
        geo.template("arcface_99", 99, device)


@pytest.mark.parametrize("device", DEVICES)
def test_alignment_and_batched_warp_on_the_device_agree_with_the_cpu(device: str, astronaut: torch.Tensor) -> None:
    generator = torch.Generator().manual_seed(7)
    landmarks = ASTRONAUT_LANDMARKS + torch.randn((3, 5, 2), generator=generator, dtype=torch.float64) * 3
    landmarks[2] += torch.tensor([250.0, 370.0], dtype=torch.float64)  # partly off the image: zeros there
    matrices = geo.align_matrix(landmarks.to(device), "arcface_128", 128)
    _on(device, matrices)
    assert matrices.shape == (3, 2, 3) and matrices.dtype == torch.float64
    cpu_matrices = geo.align_matrix(landmarks, "arcface_128", 128)
    _same(matrices, cpu_matrices, 1e-9)
    _same(geo.invert(matrices), geo.invert(cpu_matrices), 1e-9)

    frame = astronaut.permute(2, 0, 1).float()
    crops = geo.warp(frame.to(device), matrices, 128)
    _on(device, crops)
    assert crops.shape == (3, 3, 128, 128)
    for crop, matrix in zip(crops, cpu_matrices, strict=True):
        _same(crop, geo.warp(frame, matrix, 128), 1e-3)  # one face at a time on the CPU
    assert crops[2].eq(0).float().mean() > 0.2


@pytest.mark.parametrize("device", DEVICES)
def test_paste_back_on_the_device_agrees_with_the_cpu(device: str, astronaut: torch.Tensor) -> None:
    frame = astronaut.permute(2, 0, 1).float()
    matrix = geo.align_matrix(ASTRONAUT_LANDMARKS, "arcface_128", 128)
    mask = geo.box_mask(128, device=device)
    _on(device, mask)
    assert geo.box_mask(128, device=device) is mask
    face = torch.full((3, 128, 128), 255.0)
    out = geo.paste_back(frame.to(device), face.to(device), matrix.to(device), mask)
    _on(device, out)
    cpu = geo.paste_back(frame, face, matrix, geo.box_mask(128))
    _same(out, cpu, 1e-3)
    changed = (cpu != frame).any(0)
    assert 3000 < changed.sum() < 30000 and not changed[300:].any()  # around the face only
    # A crop that lands wholly outside the frame leaves it as it was.
    away = matrix.clone()
    away[:, 2] += 5000
    assert torch.equal(geo.paste_back(frame.to(device), face.to(device), away.to(device), mask).cpu(), frame)


def test_similarity_fit_of_exactly_similar_points_is_exact() -> None:
    angle, scale = math.radians(20), 1.7
    rotation = torch.tensor(
        [[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]], dtype=torch.float64
    )
    src = ASTRONAUT_LANDMARKS
    dst = scale * src @ rotation.T + torch.tensor([3.0, -8.0], dtype=torch.float64)
    matrix = geo.similarity_fit(src, dst)
    expected = torch.cat([scale * rotation, torch.tensor([[3.0], [-8.0]], dtype=torch.float64)], 1)
    torch.testing.assert_close(matrix, expected, rtol=0, atol=1e-10)
    same = geo.similarity_fit(src[:1].expand(5, 2), dst)  # degenerate: all source points equal
    assert torch.isfinite(same).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_cpu_tensor_is_made_while_the_maths_run_on_cuda(run: mtcnn.SyncRun, astronaut: torch.Tensor) -> None:
    """Every op's result stays on the GPU, except the host reads that slicing and the greedy NMS pass
    need (``.tolist()``: a copy to the CPU). The caches are warmed first: making them may copy constants."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class CpuResults(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: set[str] = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            out = func(*args, **(kwargs or {}))
            for value in tree_flatten(out)[0]:
                if isinstance(value, torch.Tensor) and value.device.type == "cpu":
                    self.ops.add(str(func))
            return out

    device = torch.device("cuda")
    image = astronaut.to(device)
    frame = image.permute(2, 0, 1).float()
    size = 160
    cells = [(size // s) ** 2 for s in face_decoders.STRIDES]
    scrfd = [o.to(device) for o in _constructed_outputs([2 * c for c in cells], [1, 4, 10], seed=1)]
    geo.template("arcface_128", 128, device)
    face_decoders.decode_scrfd(scrfd, size, size)
    mask = geo.box_mask(128, device=device)

    async def gpu_run(role: str, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with torch.utils._python_dispatch._disable_current_modes():  # the CPU network is not under test
            return tuple(o.to(device) for o in run(role, x))

    watch = CpuResults()
    with watch:
        faces = asyncio.run(mtcnn.detect(image, mtcnn.MtcnnParams(), gpu_run))
        box = face_decoders.letterbox(image, size, "scrfd")[1]
        box.to_image(face_decoders.decode_scrfd(scrfd, size, size), *image.shape[:2])
        matrices = geo.align_matrix(faces.landmarks.expand(3, 5, 2), "arcface_128", 128)
        crops = geo.warp(frame, matrices, 128)
        geo.paste_back(frame, crops[0], matrices[0], mask)
        faces.select([faces.largest()])
    assert len(faces) == 1
    assert watch.ops <= {"aten._to_copy.default"}, watch.ops
