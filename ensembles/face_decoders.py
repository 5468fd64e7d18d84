"""Single-network face detectors: SCRFD / RetinaFace and YuNet (user ONNX files), and MediaPipe's
BlazeFace short-range network (imported from MediaPipe's TFLite file).

Each is "letterbox the image to the network's square input, run it once, decode". Letterboxing and
decoding are torch, on the device of the image / the outputs (CPU or CUDA alike). SCRFD and YuNet are
tested on outputs constructed to give known boxes, BlazeFace on the real network (tests/test_blazeface.py).
The anchor grids are made once per input size, stride and device and cached.

SCRFD / RetinaFace (insightface export): RGB, (x − 127.5) / 128, NCHW; 9 outputs ordered
``score_8, score_16, score_32, bbox_8, bbox_16, bbox_32, kps_8, kps_16, kps_32``; 2 anchors per cell;
boxes and landmarks are distances from the anchor centre in units of the stride.

YuNet (OpenCV's face_detection_yunet_2023mar): BGR 0..255, NCHW; 12 outputs ordered
``cls_8, cls_16, cls_32, obj_8, obj_16, obj_32, bbox_8, bbox_16, bbox_32, kps_8, kps_16, kps_32``;
one prior per cell; score = √(cls·obj); centre = (cell + offset)·stride, size = exp(·)·stride.

BlazeFace (MediaPipe 0.10.21 ``face_detection_short_range.tflite``): RGB in [-1, 1], NHWC 128×128;
outputs ``regressors`` [896,16] and ``classificators`` [896,1] (logits). Everything here follows the
options of MediaPipe's graph, read from the wheel (see :data:`BLAZEFACE_OPTIONS`), and the C++ of the
calculators they configure; see :func:`letterbox_blazeface`, :func:`ssd_anchors`,
:func:`blazeface_detections` and :func:`weighted_nms`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from imgpipe.ensembles.face_geometry import TEMPLATES
from imgpipe.ensembles.mtcnn import Faces, nms

STRIDES = (8, 16, 32)


@dataclass(frozen=True)
class Letterbox:
    """How an image was fitted into the square network input: scaled by ``scale``, its pixel (0, 0)
    placed at (``offset_x``, ``offset_y``) of the input (SCRFD/YuNet: 0, 0, padded right and bottom;
    BlazeFace: centred, as MediaPipe pads)."""

    scale: float
    size: int
    offset_x: float = 0.0
    offset_y: float = 0.0

    def to_image(self, faces: Faces, height: int, width: int) -> Faces:
        """``faces`` in network-input pixels → original-image pixels, boxes clipped to the image."""
        x1, y1, x2, y2 = faces.boxes.unbind(1)
        px, py = faces.landmarks.unbind(-1)
        x1, x2, px = ((v - self.offset_x) / self.scale for v in (x1, x2, px))  # Python scalars: no new tensors
        y1, y2, py = ((v - self.offset_y) / self.scale for v in (y1, y2, py))
        boxes = torch.stack([x1.clamp(0, width), y1.clamp(0, height), x2.clamp(0, width), y2.clamp(0, height)], 1)
        return Faces(boxes.to(torch.float32), faces.scores, torch.stack([px, py], -1).to(torch.float32))


def letterbox(image: torch.Tensor, size: int, detector: str) -> tuple[torch.Tensor, Letterbox]:
    """The network input [1,3,size,size] float32 for ``detector`` ("scrfd" or "yunet") of an H×W×3
    uint8 image, on the image's device, and the letterbox. BlazeFace's own (NHWC, centred, as
    MediaPipe makes it) is :func:`letterbox_blazeface`."""
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


# -- BlazeFace (MediaPipe face detection, short range) ---------------------------------------------------
#
# BLAZEFACE_OPTIONS holds the options of MediaPipe 0.10.21's graph as the wheel stores them. The wheel's
# face_detection_short_range_cpu.binarypb only names the FaceDetectionShortRange subgraph; that
# subgraph and the FaceDetection subgraph it configures are compiled into
# mediapipe/python/_framework_bindings*.so as serialized CalculatorGraphConfig protos, which parse with
# the wheel's own _pb2 modules (mediapipe.framework.calculator_pb2, the calculators' *_options _pb2 and
# mediapipe.modules.face_detection.face_detection_pb2); tests/test_blazeface.py reads them back. They say:
#   FaceDetectionShortRange → FaceDetectionOptions: tensor_width/height 128, num_layers 4,
#       strides [8, 16, 16, 16], interpolated_scale_aspect_ratio 1, num_boxes 896,
#       x/y/w/h_scale 128, min_score_thresh 0.5
#   FaceDetection → ImageToTensorCalculator {keep_aspect_ratio, output_tensor_float_range -1..1,
#       border_mode BORDER_ZERO}; SsdAnchorsCalculator {min_scale 0.1484375, max_scale 0.75,
#       anchor_offset_x/y 0.5, aspect_ratios [1], fixed_anchor_size}; TensorsToDetectionsCalculator
#       {num_classes 1, num_coords 16, box_coord_offset 0, keypoint_coord_offset 4, num_keypoints 6,
#       num_values_per_keypoint 2, reverse_output_order, sigmoid_score, score_clipping_thresh 100};
#       NonMaxSuppressionCalculator {min_suppression_threshold 0.3, INTERSECTION_OVER_UNION, WEIGHTED};
#       DetectionProjectionCalculator with ImageToTensorCalculator's transform matrix (this version
#       projects through the matrix instead of DetectionLetterboxRemovalCalculator: the same mapping).
# The C++ semantics follow google-ai-edge/mediapipe: calculators/tflite/ssd_anchors_calculator.cc,
# calculators/tensor/tensors_to_detections_calculator.cc, calculators/util/non_max_suppression_calculator.cc,
# calculators/tensor/image_to_tensor_utils.cc (GetRoi, PadRoi, GetValueRangeTransformation) and
# calculators/tensor/image_to_tensor_converter_opencv.cc (warpPerspective, INTER_LINEAR, uint8 result).

BLAZEFACE_OPTIONS = {
    "input_size": 128,
    "num_layers": 4,
    "strides": (8, 16, 16, 16),
    "min_scale": 0.1484375,
    "max_scale": 0.75,
    "anchor_offset": 0.5,
    "aspect_ratios": (1.0,),
    "interpolated_scale_aspect_ratio": 1.0,
    "fixed_anchor_size": True,
    "num_boxes": 896,
    "num_coords": 16,
    "box_coord_offset": 0,
    "keypoint_coord_offset": 4,
    "num_keypoints": 6,
    "coordinate_scale": 128.0,  # x_scale = y_scale = w_scale = h_scale
    "score_clipping_thresh": 100.0,
    "min_score_thresh": 0.5,
    "min_suppression_threshold": 0.3,
}
BLAZEFACE_SIZE = 128
_OPENCV_SUBPIXELS = 32  # OpenCV's INTER_TAB_SIZE: warpPerspective rounds source positions to 1/32 pixel


def _mouth_corner_factor(template: str = "arcface_112_v2") -> float:
    """Half the mouth width over the eye distance in an ArcFace 5-point template (0.41406 for both
    ArcFace templates): how far each mouth corner lies from the mouth centre, along the eye line."""
    points = TEMPLATES[template]
    return float(np.linalg.norm(points[4] - points[3]) / 2 / np.linalg.norm(points[1] - points[0]))


MOUTH_CORNER_FACTOR = _mouth_corner_factor()


def _taps(start: float, step: float, count: int, length: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Bilinear taps along one axis of OpenCV's warp: the source positions ``start + i·step`` rounded
    to 1/32 pixel, their two neighbours (clamped) and weights (0 for a neighbour outside the image:
    BORDER_CONSTANT with 0)."""
    fixed = torch.round((start + step * torch.arange(count, device=device, dtype=torch.float64)) * _OPENCV_SUBPIXELS)
    low = torch.div(fixed, _OPENCV_SUBPIXELS, rounding_mode="floor")
    frac = fixed / _OPENCV_SUBPIXELS - low
    low = low.to(torch.int64)
    high = low + 1
    w_low = (1.0 - frac) * ((low >= 0) & (low < length))
    w_high = frac * ((high >= 0) & (high < length))
    return low.clamp(0, length - 1), high.clamp(0, length - 1), w_low, w_high


def letterbox_blazeface(image: torch.Tensor, size: int = BLAZEFACE_SIZE) -> tuple[torch.Tensor, Letterbox]:
    """BlazeFace's input [1,size,size,3] float32 (NHWC, RGB in [-1, 1]) of an H×W×3 uint8 image, on the
    image's device, and the letterbox — as MediaPipe's ImageToTensorCalculator makes it on the CPU.

    The region is the whole image (GetRoi without a ROI), widened by PadRoi to the tensor's aspect
    ratio: a square of side max(H, W) centred on the image, so the padding is split evenly between
    both sides. OpenCV's ``warpPerspective`` maps its corners onto the tensor's corners (output pixel
    j samples the image at x0 + j·side/size, bilinear, positions rounded to 1/32 pixel, zero outside
    the image, halves rounded up as its fixed-point arithmetic does) into a uint8 image, then
    ``convertTo`` scales it by 2/255 − 1: padding is −1. Only the 2×size rows and columns the taps
    read are gathered, never a float copy of the whole image. On the photos of tests/test_blazeface.py
    the result equals OpenCV 4.10's on every value but one level in 0.02 % of one photo's.
    """
    image = torch.as_tensor(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an H×W×3 image, got shape {tuple(image.shape)}")
    height, width = int(image.shape[0]), int(image.shape[1])
    side = float(max(height, width))
    x0, y0 = 0.5 * width - 0.5 * side, 0.5 * height - 0.5 * side
    step = side / size
    device = image.device
    y_low, y_high, wy_low, wy_high = _taps(y0, step, size, height, device)
    x_low, x_high, wx_low, wx_high = _taps(x0, step, size, width, device)
    rows = image.index_select(0, torch.cat([y_low, y_high]))  # [2·size, W, 3] uint8
    taps = rows.index_select(1, torch.cat([x_low, x_high])).to(torch.float64)  # [2·size, 2·size, 3]
    top, bottom = taps[:size], taps[size:]
    wx_low, wx_high = wx_low[None, :, None], wx_high[None, :, None]
    across_top = top[:, :size] * wx_low + top[:, size:] * wx_high
    across_bottom = bottom[:, :size] * wx_low + bottom[:, size:] * wx_high
    pixels = torch.floor(across_top * wy_low[:, None, None] + across_bottom * wy_high[:, None, None] + 0.5)
    tensor = (pixels.to(torch.float32) * (2.0 / 255.0) - 1.0).unsqueeze(0).contiguous()
    scale = size / side
    return tensor, Letterbox(scale=scale, size=size, offset_x=-x0 * scale, offset_y=-y0 * scale)


def ssd_anchors(
    input_size: int,
    strides: Sequence[int],
    min_scale: float,
    max_scale: float,
    anchor_offset: float = 0.5,
    aspect_ratios: Sequence[float] = (1.0,),
    interpolated_scale_aspect_ratio: float = 1.0,
    fixed_anchor_size: bool = True,
) -> np.ndarray:
    """MediaPipe's SsdAnchorsCalculator (``GenerateAnchors``, square input, feature maps from the
    strides, no ``reduce_boxes_in_lowest_layer``): [A, 4] float32 rows (x_center, y_center, w, h),
    normalised to the input. Consecutive layers of equal stride share one grid: per cell their
    anchors come together (layer by layer, each layer's aspect ratios then the interpolated one),
    cells in row-major order."""

    def scale_of(index: int) -> float:
        if len(strides) == 1:
            return (min_scale + max_scale) * 0.5
        return min_scale + (max_scale - min_scale) * index / (len(strides) - 1.0)

    anchors = []
    layer = 0
    while layer < len(strides):
        sizes: list[tuple[float, float]] = []  # (w, h) of each anchor of a cell
        last = layer
        while last < len(strides) and strides[last] == strides[layer]:
            scale = scale_of(last)
            ratios = [(r, scale) for r in aspect_ratios]
            if interpolated_scale_aspect_ratio > 0.0:
                following = 1.0 if last == len(strides) - 1 else scale_of(last + 1)
                ratios.append((interpolated_scale_aspect_ratio, float(np.sqrt(scale * following))))
            sizes += [(s * float(np.sqrt(r)), s / float(np.sqrt(r))) for r, s in ratios]
            last += 1
        cells = int(np.ceil(input_size / strides[layer]))
        grid = (np.arange(cells, dtype=np.float32) + np.float32(anchor_offset)) / np.float32(cells)
        ys, xs = np.meshgrid(grid, grid, indexing="ij")
        wh = np.ones((len(sizes), 2), np.float32) if fixed_anchor_size else np.array(sizes, np.float32)
        centres = np.stack([xs.ravel(), ys.ravel()], axis=1)
        anchors.append(
            np.concatenate([np.repeat(centres, len(sizes), axis=0), np.tile(wh, (cells * cells, 1))], axis=1)
        )
        layer = last
    return np.concatenate(anchors).astype(np.float32)


def blazeface_anchors(device: torch.device | str = "cpu") -> torch.Tensor:
    """BlazeFace short range's 896 anchors [896, 4] (x_center, y_center, w, h) float32 on ``device``:
    16×16 cells × 2 (stride 8), then 8×8 cells × 6 (the three stride-16 layers). Cached per device:
    callers must not modify it in place."""
    return _blazeface_anchors(_device(device))


@functools.lru_cache(maxsize=8)
def _blazeface_anchors(device: torch.device) -> torch.Tensor:
    o = BLAZEFACE_OPTIONS
    anchors = ssd_anchors(
        o["input_size"],
        o["strides"],
        o["min_scale"],
        o["max_scale"],
        o["anchor_offset"],
        o["aspect_ratios"],
        o["interpolated_scale_aspect_ratio"],
        o["fixed_anchor_size"],
    )
    return torch.from_numpy(anchors).to(device)


@dataclass(frozen=True, eq=False)
class BlazeFaceDetections:
    """One image's detections as MediaPipe's FaceDetection subgraph leaves its NMS: coordinates
    normalised to the 128×128 tensor, best score first."""

    boxes: torch.Tensor  # [K, 4] float32 xmin, ymin, xmax, ymax
    scores: torch.Tensor  # [K] float32
    keypoints: torch.Tensor  # [K, 6, 2] float32 (x, y), MediaPipe's names: right eye, left eye (the
    # person's), nose tip, mouth centre, right ear tragion, left ear tragion. On an upright face keypoint 0
    # is the eye on the image's left, in a mirrored photo too (tests/test_blazeface.py).

    def __len__(self) -> int:
        return self.scores.shape[0]


def _batched(a: torch.Tensor | np.ndarray, columns: int, device: torch.device | None = None) -> torch.Tensor:
    """[..., 896, columns] (batch dimension optional) → [N, 896, columns] float32."""
    t = torch.as_tensor(a)
    return t.to(device=device or t.device, dtype=torch.float32).reshape(-1, BLAZEFACE_OPTIONS["num_boxes"], columns)


def blazeface_detections(
    regressors: torch.Tensor | np.ndarray,
    classificators: torch.Tensor | np.ndarray,
    min_score: float = BLAZEFACE_OPTIONS["min_score_thresh"],
    iou_threshold: float = BLAZEFACE_OPTIONS["min_suppression_threshold"],
) -> list[BlazeFaceDetections]:
    """BlazeFace's outputs for N images, [N,896,16] and [N,896,1] (logits), → each image's detections,
    decoded as TensorsToDetectionsCalculator (CPU path) and merged by NonMaxSuppressionCalculator's
    WEIGHTED algorithm (:func:`weighted_nms`), on the outputs' device.

    Decoding (reverse_output_order: x, y, w, h first), with anchor a and scale 128:
    x_center = r0/128·a.w + a.x_center, y_center = r1/128·a.h + a.y_center, w = r2/128·a.w,
    h = r3/128·a.h; keypoint k = (r[4+2k]/128·a.w + a.x_center, r[5+2k]/128·a.h + a.y_center);
    score = sigmoid(clip(logit, −100, 100)). A detection is kept when score ≥ ``min_score`` and its
    box's width and height are ≥ 0 (not NaN). One difference: a NaN score is dropped here (the C++
    keeps it and sorts it with undefined order).
    """
    o = BLAZEFACE_OPTIONS
    reg = _batched(regressors, o["num_coords"])
    logits = _batched(classificators, 1, reg.device)[..., 0]
    anchors = blazeface_anchors(reg.device)
    ax, ay, aw, ah = anchors.unbind(-1)
    scale = o["coordinate_scale"]
    b = o["box_coord_offset"]
    x_center = reg[..., b] / scale * aw + ax
    y_center = reg[..., b + 1] / scale * ah + ay
    w = reg[..., b + 2] / scale * aw
    h = reg[..., b + 3] / scale * ah
    xmin, ymin, xmax, ymax = x_center - w / 2.0, y_center - h / 2.0, x_center + w / 2.0, y_center + h / 2.0
    k = o["keypoint_coord_offset"]
    points = reg[..., k : k + 2 * o["num_keypoints"]].reshape(*reg.shape[:2], o["num_keypoints"], 2)
    kx = points[..., 0] / scale * aw[:, None] + ax[:, None]
    ky = points[..., 1] / scale * ah[:, None] + ay[:, None]
    clip = o["score_clipping_thresh"]
    scores = torch.sigmoid(logits.clamp(-clip, clip))
    keep = (scores >= min_score) & (xmax - xmin >= 0) & (ymax - ymin >= 0)
    boxes = torch.stack([xmin, ymin, xmax, ymax], -1)
    values = torch.cat([boxes, torch.stack([kx, ky], -1).flatten(2)], -1)  # [N, 896, 4 + 12]
    merged = weighted_nms(boxes, scores, values, keep, iou_threshold)
    return [
        BlazeFaceDetections(v[:, :4].contiguous(), s, v[:, 4:].reshape(-1, o["num_keypoints"], 2)) for s, v in merged
    ]


def weighted_nms(
    boxes: torch.Tensor, scores: torch.Tensor, values: torch.Tensor, keep: torch.Tensor, threshold: float
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """MediaPipe's WEIGHTED non-maximum suppression (NonMaxSuppressionCalculator, IoU overlap), batched
    over images: ``boxes`` [N,A,4] (xmin, ymin, xmax, ymax), ``scores`` [N,A], ``values`` [N,A,V] (what
    is averaged: the box corners and keypoints), ``keep`` [N,A] (the candidates). Per image returns
    (scores [C], values [C,V]), best first.

    The C++ loop: sort by score, best first; take the best remaining detection; its cluster is every
    remaining detection (itself included) whose IoU with it is > ``threshold``; emit the best one
    with its own score and the cluster's score-weighted mean of box corners and keypoints; continue
    with the rest, and stop when a pass removes nothing (a zero-area best box: it is emitted alone).
    Here the candidates are sorted and padded on the device, all IoUs computed at once, the overlap
    matrix brought to the host in one copy, the clusters found there with NumPy, and the weighted
    means computed on the device (in float64, then float32). Equal scores keep anchor order (the
    C++ uses ``std::sort``, whose order of equals is unspecified).
    """
    count = scores.shape[0]
    device = scores.device
    ranked = torch.where(keep, scores, torch.full_like(scores, -1.0))
    order = torch.argsort(ranked, dim=1, descending=True, stable=True)
    counts_on_device = keep.sum(1)
    counts = counts_on_device.tolist()  # host synchronisation 1
    width = max(counts, default=0)
    if width == 0:
        empty = (scores.new_zeros((0,)), values.new_zeros((0, values.shape[-1])))
        return [empty for _ in range(count)]
    order = order[:, :width]
    s = scores.gather(1, order)
    b = boxes.gather(1, order[..., None].expand(-1, -1, 4))
    v = values.gather(1, order[..., None].expand(-1, -1, values.shape[-1]))
    live = torch.arange(width, device=device)[None, :] < counts_on_device[:, None]
    x1, y1, x2, y2 = b.unbind(-1)
    area = (x2 - x1) * (y2 - y1)
    iw = (torch.minimum(x2[:, :, None], x2[:, None, :]) - torch.maximum(x1[:, :, None], x1[:, None, :])).clamp_min(0)
    ih = (torch.minimum(y2[:, :, None], y2[:, None, :]) - torch.maximum(y1[:, :, None], y1[:, None, :])).clamp_min(0)
    inter = iw * ih
    union = area[:, :, None] + area[:, None, :] - inter
    iou = torch.where(union > 0, inter / torch.where(union > 0, union, torch.ones_like(union)), torch.zeros_like(union))
    overlaps = ((iou > threshold) & live[:, :, None] & live[:, None, :]).cpu().numpy()  # host synchronisation 2
    cluster = np.full((count, width), -1, dtype=np.int64)  # each candidate's cluster: its best's rank
    heads: list[list[int]] = []
    for n in range(count):
        remaining = np.arange(counts[n])
        tops: list[int] = []
        while remaining.size:
            top = int(remaining[0])
            hit = overlaps[n, top, remaining]
            tops.append(top)
            if not hit.any():  # a zero-area box overlaps nothing, not even itself: emitted alone, then stop
                cluster[n, top] = top
                break
            cluster[n, remaining[hit]] = top
            remaining = remaining[~hit]
        heads.append(tops)
    # A list, not the array: torch.tensor copies it straight to the device (no CPU tensor on the way).
    members = (
        torch.tensor(cluster.tolist(), dtype=torch.int64, device=device)[:, None, :]
        == torch.arange(width, device=device)[None, :, None]
    )  # [image, cluster, member]
    weights = members * s.to(torch.float64)[:, None, :]
    means = (torch.bmm(weights, v.to(torch.float64)) / weights.sum(-1, keepdim=True).clamp_min(1e-300)).to(v.dtype)
    results = []
    for n, tops in enumerate(heads):
        index = torch.tensor(tops, dtype=torch.int64, device=device)
        results.append((s[n].index_select(0, index), means[n].index_select(0, index)))
    return results


def blazeface_five_points(keypoints: torch.Tensor) -> torch.Tensor:
    """MediaPipe's 6 face keypoints [K,6,2] → the 5-point layout [K,5,2] of :class:`Faces`.

    The eyes and the nose are BlazeFace's own. Keypoint 0, MediaPipe's "right eye" (the person's,
    in an unmirrored photo), is on an upright face the eye on the image's left, and stays so in a
    mirrored photo (the network goes by image side: checked on the astronaut and her mirror image),
    so it becomes the "left eye" and keypoint 1 the "right eye", as MTCNN orders them. BlazeFace has
    no mouth corners, only the mouth centre (keypoint 3): the corners are placed on either side of
    it, parallel to the eye line (eye 0 → eye 1), each
    :data:`MOUTH_CORNER_FACTOR` × the eye distance away — the ArcFace template's half mouth width
    over its eye distance (0.41406, ``face_geometry.TEMPLATES``). The ears are not used.
    """
    first_eye, second_eye, nose, mouth = keypoints[:, 0], keypoints[:, 1], keypoints[:, 2], keypoints[:, 3]
    half_mouth = (second_eye - first_eye) * MOUTH_CORNER_FACTOR
    return torch.stack([first_eye, second_eye, nose, mouth - half_mouth, mouth + half_mouth], 1)


def blazeface_faces(detections: BlazeFaceDetections, height: int, width: int) -> Faces:
    """Normalised detections → :class:`Faces` in pixels of the height×width network input."""
    x1, y1, x2, y2 = detections.boxes.unbind(-1)
    boxes = torch.stack([x1 * width, y1 * height, x2 * width, y2 * height], -1)
    kx, ky = detections.keypoints.unbind(-1)
    points = torch.stack([kx * width, ky * height], -1)
    return Faces(boxes, detections.scores, blazeface_five_points(points))


def decode_blazeface_batch(
    regressors: torch.Tensor,
    classificators: torch.Tensor,
    height: int = BLAZEFACE_SIZE,
    width: int = BLAZEFACE_SIZE,
    threshold: float = BLAZEFACE_OPTIONS["min_score_thresh"],
    nms_threshold: float = BLAZEFACE_OPTIONS["min_suppression_threshold"],
) -> list[Faces]:
    """BlazeFace's outputs for N images ([N,896,16], [N,896,1]) → each image's faces in input pixels."""
    return [
        blazeface_faces(d, height, width)
        for d in blazeface_detections(regressors, classificators, threshold, nms_threshold)
    ]


def decode_blazeface(
    outputs: Sequence[torch.Tensor],
    height: int,
    width: int,
    threshold: float = BLAZEFACE_OPTIONS["min_score_thresh"],
    nms_threshold: float = BLAZEFACE_OPTIONS["min_suppression_threshold"],
) -> Faces:
    """BlazeFace's 2 outputs (regressors, classificators) for one image → faces in input pixels, on the
    first output's device."""
    if len(outputs) != 2:
        raise ValueError(f"BlazeFace decoding needs 2 outputs (regressors, classificators), got {len(outputs)}")
    regressors, classificators = (torch.as_tensor(o) for o in outputs)
    if regressors.numel() != BLAZEFACE_OPTIONS["num_boxes"] * BLAZEFACE_OPTIONS["num_coords"]:
        raise ValueError(f"BlazeFace decoding expects one image's [896, 16] regressors, got {tuple(regressors.shape)}")
    (faces,) = decode_blazeface_batch(regressors, classificators, height, width, threshold, nms_threshold)
    return faces


DECODERS = {"scrfd": decode_scrfd, "yunet": decode_yunet, "blazeface": decode_blazeface}
