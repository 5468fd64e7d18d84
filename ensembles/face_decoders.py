"""Single-network face detectors for user ONNX files: SCRFD / RetinaFace and YuNet.

Each is "letterbox the image to the network's square input, run it once, decode". Letterboxing and
decoding are torch, on the device of the image / the outputs (CPU or CUDA alike), and are tested on
outputs constructed to give known boxes. The anchor grids are made once per input size, stride and
device and cached.

SCRFD / RetinaFace (insightface export): RGB, (x − 127.5) / 128, NCHW; 9 outputs ordered
``score_8, score_16, score_32, bbox_8, bbox_16, bbox_32, kps_8, kps_16, kps_32``; 2 anchors per cell;
boxes and landmarks are distances from the anchor centre in units of the stride.

YuNet (OpenCV's face_detection_yunet_2023mar): BGR 0..255, NCHW; 12 outputs ordered
``cls_8, cls_16, cls_32, obj_8, obj_16, obj_32, bbox_8, bbox_16, bbox_32, kps_8, kps_16, kps_32``;
one prior per cell; score = √(cls·obj); centre = (cell + offset)·stride, size = exp(·)·stride.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from imgpipe.ensembles.mtcnn import Faces, nms

STRIDES = (8, 16, 32)


@dataclass(frozen=True)
class Letterbox:
    """How an image was fitted into the square network input (scaled, padded right and bottom)."""

    scale: float
    size: int

    def to_image(self, faces: Faces, height: int, width: int) -> Faces:
        """``faces`` in network-input pixels → original-image pixels, boxes clipped to the image."""
        x1, y1, x2, y2 = (faces.boxes / self.scale).unbind(1)
        boxes = torch.stack([x1.clamp(0, width), y1.clamp(0, height), x2.clamp(0, width), y2.clamp(0, height)], 1)
        return Faces(boxes.to(torch.float32), faces.scores, (faces.landmarks / self.scale).to(torch.float32))


def letterbox(image: torch.Tensor, size: int, detector: str) -> tuple[torch.Tensor, Letterbox]:
    """The network input [1,3,size,size] float32 for ``detector`` ("scrfd" or "yunet") of an H×W×3
    uint8 image, on the image's device, and the letterbox."""
    if detector not in ("scrfd", "yunet"):
        raise ValueError(f"unknown detector {detector!r}")
    image = torch.as_tensor(image)
    height, width = image.shape[:2]
    scale = min(size / height, size / width)
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    x = image.permute(2, 0, 1).unsqueeze(0).to(torch.float32)
    x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
    canvas = torch.zeros((1, 3, size, size), dtype=torch.float32, device=image.device)
    canvas[:, :, :new_h, :new_w] = x
    if detector == "scrfd":
        canvas = (canvas - 127.5) / 128.0
    else:
        canvas = canvas.flip(1)  # RGB → BGR, 0..255
    return canvas, Letterbox(scale=scale, size=size)


def _device(device: torch.device | str) -> torch.device:
    """A canonical device (``cuda`` → ``cuda:<current>``), so cache keys match tensors' devices."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def anchor_centers(
    height: int, width: int, stride: int, anchors: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Anchor centres (x, y) in input pixels, row-major over the stride grid, ``anchors`` per cell:
    [rows·cols·anchors, 2] float32 on ``device``. Cached: the same tensor object for the same
    arguments, so callers must not modify it in place."""
    return _anchor_centers(height, width, stride, anchors, _device(device))


@functools.lru_cache(maxsize=64)
def _anchor_centers(height: int, width: int, stride: int, anchors: int, device: torch.device) -> torch.Tensor:
    rows, cols = height // stride, width // stride
    ys, xs = torch.meshgrid(torch.arange(rows, device=device), torch.arange(cols, device=device), indexing="ij")
    centers = torch.stack([xs, ys], dim=-1).reshape(-1, 2).to(torch.float32) * stride
    return centers.repeat_interleave(anchors, dim=0) if anchors > 1 else centers


def _flat(a: torch.Tensor | np.ndarray, columns: int, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(a).to(device=device, dtype=torch.float32).reshape(-1, columns)


def _output_device(outputs: Sequence[torch.Tensor | np.ndarray]) -> torch.device:
    first = outputs[0]
    return first.device if isinstance(first, torch.Tensor) else torch.device("cpu")


def _finish(
    boxes: list[torch.Tensor],
    scores: list[torch.Tensor],
    points: list[torch.Tensor],
    nms_threshold: float,
    device: torch.device,
) -> Faces:
    b, s, p = torch.cat(boxes), torch.cat(scores), torch.cat(points)
    if s.shape[0] == 0:
        return Faces.none(device)
    keep = nms(b, s, nms_threshold)
    keep = keep[torch.argsort(-s[keep], stable=True)]
    return Faces(b[keep], s[keep], p[keep].reshape(-1, 5, 2))


def decode_scrfd(
    outputs: Sequence[torch.Tensor],
    height: int,
    width: int,
    threshold: float = 0.5,
    nms_threshold: float = 0.4,
    anchors: int = 2,
) -> Faces:
    """SCRFD / RetinaFace's 9 outputs → faces in input pixels, on the first output's device."""
    if len(outputs) != 9:
        raise ValueError(
            f"SCRFD/RetinaFace decoding needs 9 outputs (score, bbox, kps × 3 strides), got {len(outputs)}"
        )
    device = _output_device(outputs)
    boxes, scores, points = [], [], []
    for i, stride in enumerate(STRIDES):
        score = _flat(outputs[i], 1, device)[:, 0]
        dist = _flat(outputs[3 + i], 4, device) * stride
        kps = _flat(outputs[6 + i], 10, device) * stride
        keep = torch.nonzero(score >= threshold).squeeze(1)
        c = anchor_centers(height, width, stride, anchors, device)[keep]
        boxes.append(torch.cat([c - dist[keep, :2], c + dist[keep, 2:]], dim=1))
        scores.append(score[keep])
        points.append(c.repeat(1, 5) + kps[keep])
    return _finish(boxes, scores, points, nms_threshold, device)


def decode_yunet(
    outputs: Sequence[torch.Tensor], height: int, width: int, threshold: float = 0.6, nms_threshold: float = 0.3
) -> Faces:
    """YuNet's 12 outputs → faces in input pixels, on the first output's device."""
    if len(outputs) != 12:
        raise ValueError(f"YuNet decoding needs 12 outputs (cls, obj, bbox, kps × 3 strides), got {len(outputs)}")
    device = _output_device(outputs)
    boxes, scores, points = [], [], []
    for i, stride in enumerate(STRIDES):
        cls = _flat(outputs[i], 1, device)[:, 0].clamp(0, 1)
        obj = _flat(outputs[3 + i], 1, device)[:, 0].clamp(0, 1)
        bbox = _flat(outputs[6 + i], 4, device)
        kps = _flat(outputs[9 + i], 10, device)
        score = torch.sqrt(cls * obj)
        keep = torch.nonzero(score >= threshold).squeeze(1)
        cells = anchor_centers(height, width, stride, 1, device)[keep] / stride  # (col, row)
        centre = (cells + bbox[keep, :2]) * stride
        size = torch.exp(bbox[keep, 2:]) * stride
        boxes.append(torch.cat([centre - size / 2, centre + size / 2], dim=1))
        scores.append(score[keep])
        points.append((kps[keep] + cells.repeat(1, 5)) * stride)
    return _finish(boxes, scores, points, nms_threshold, device)


DECODERS = {"scrfd": decode_scrfd, "yunet": decode_yunet}
