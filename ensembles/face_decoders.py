"""Single-network face detectors for user ONNX files: SCRFD / RetinaFace and YuNet.

Each is "letterbox the image to the network's square input, run it once, decode". Decoding is pure
numpy, so it is tested on outputs constructed to give known boxes.

SCRFD / RetinaFace (insightface export): RGB, (x − 127.5) / 128, NCHW; 9 outputs ordered
``score_8, score_16, score_32, bbox_8, bbox_16, bbox_32, kps_8, kps_16, kps_32``; 2 anchors per cell;
boxes and landmarks are distances from the anchor centre in units of the stride.

YuNet (OpenCV's face_detection_yunet_2023mar): BGR 0..255, NCHW; 12 outputs ordered
``cls_8, cls_16, cls_32, obj_8, obj_16, obj_32, bbox_8, bbox_16, bbox_32, kps_8, kps_16, kps_32``;
one prior per cell; score = √(cls·obj); centre = (cell + offset)·stride, size = exp(·)·stride.
"""

from __future__ import annotations

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
        boxes = faces.boxes / self.scale
        boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, width)
        boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, height)
        return Faces(boxes.astype(np.float32), faces.scores, (faces.landmarks / self.scale).astype(np.float32))


def letterbox(rgb: np.ndarray, size: int, detector: str) -> tuple[np.ndarray, Letterbox]:
    """The network input [1,3,size,size] for ``detector`` ("scrfd" or "yunet") and the letterbox."""
    height, width = rgb.shape[:2]
    scale = min(size / height, size / width)
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).unsqueeze(0).to(torch.float32)
    x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
    canvas = torch.zeros((1, 3, size, size), dtype=torch.float32)
    canvas[:, :, :new_h, :new_w] = x
    if detector == "scrfd":
        canvas = (canvas - 127.5) / 128.0
    elif detector == "yunet":
        canvas = canvas.flip(1)  # RGB → BGR, 0..255
    else:
        raise ValueError(f"unknown detector {detector!r}")
    return canvas.numpy(), Letterbox(scale=scale, size=size)


def anchor_centers(height: int, width: int, stride: int, anchors: int) -> np.ndarray:
    """Anchor centres (x, y) in input pixels, row-major over the stride grid, ``anchors`` per cell."""
    rows, cols = height // stride, width // stride
    ys, xs = np.mgrid[:rows, :cols]
    centers = np.stack([xs, ys], axis=-1).reshape(-1, 2).astype(np.float32) * stride
    return np.repeat(centers, anchors, axis=0) if anchors > 1 else centers


def _squeeze(a: np.ndarray, columns: int) -> np.ndarray:
    return np.asarray(a, dtype=np.float32).reshape(-1, columns)


def _finish(boxes: list[np.ndarray], scores: list[np.ndarray], points: list[np.ndarray], nms_threshold: float) -> Faces:
    if not boxes or sum(len(s) for s in scores) == 0:
        return Faces.none()
    b, s, p = np.vstack(boxes), np.concatenate(scores), np.vstack(points)
    keep = nms(b, s, nms_threshold)
    keep = keep[np.argsort(-s[keep], kind="stable")]
    return Faces(b[keep].astype(np.float32), s[keep].astype(np.float32), p[keep].reshape(-1, 5, 2).astype(np.float32))


def decode_scrfd(
    outputs: list[np.ndarray],
    height: int,
    width: int,
    threshold: float = 0.5,
    nms_threshold: float = 0.4,
    anchors: int = 2,
) -> Faces:
    """SCRFD / RetinaFace's 9 outputs → faces in input pixels."""
    if len(outputs) != 9:
        raise ValueError(
            f"SCRFD/RetinaFace decoding needs 9 outputs (score, bbox, kps × 3 strides), got {len(outputs)}"
        )
    boxes, scores, points = [], [], []
    for i, stride in enumerate(STRIDES):
        score = _squeeze(outputs[i], 1)[:, 0]
        dist = _squeeze(outputs[3 + i], 4) * stride
        kps = _squeeze(outputs[6 + i], 10) * stride
        centers = anchor_centers(height, width, stride, anchors)
        keep = score >= threshold
        c = centers[keep]
        boxes.append(np.hstack([c - dist[keep, :2], c + dist[keep, 2:]]))
        scores.append(score[keep])
        points.append(np.tile(c, 5) + kps[keep])
    return _finish(boxes, scores, points, nms_threshold)


def decode_yunet(
    outputs: list[np.ndarray], height: int, width: int, threshold: float = 0.6, nms_threshold: float = 0.3
) -> Faces:
    """YuNet's 12 outputs → faces in input pixels."""
    if len(outputs) != 12:
        raise ValueError(f"YuNet decoding needs 12 outputs (cls, obj, bbox, kps × 3 strides), got {len(outputs)}")
    boxes, scores, points = [], [], []
    for i, stride in enumerate(STRIDES):
        cls = _squeeze(outputs[i], 1)[:, 0].clip(0, 1)
        obj = _squeeze(outputs[3 + i], 1)[:, 0].clip(0, 1)
        bbox = _squeeze(outputs[6 + i], 4)
        kps = _squeeze(outputs[9 + i], 10)
        score = np.sqrt(cls * obj)
        keep = score >= threshold
        cells = anchor_centers(height, width, stride, 1)[keep] / stride  # (col, row)
        centre = (cells + bbox[keep, :2]) * stride
        size = np.exp(bbox[keep, 2:]) * stride
        boxes.append(np.hstack([centre - size / 2, centre + size / 2]))
        scores.append(score[keep])
        points.append((kps[keep] + np.tile(cells, 5)) * stride)
    return _finish(boxes, scores, points, nms_threshold)


DECODERS = {"scrfd": decode_scrfd, "yunet": decode_yunet}
