"""BlazeFace (MediaPipe face detection, short range) as a detect_faces detector.

References, each independent of :mod:`imgpipe.ensembles.face_decoders`:

* MediaPipe's graph options, read from the mediapipe wheel: the FaceDetectionShortRange and
  FaceDetection subgraphs are compiled into ``mediapipe/python/_framework_bindings*.so`` as serialized
  ``CalculatorGraphConfig`` protos, parsed here with the wheel's own ``_pb2`` modules;
* a NumPy port, written here, of the C++ of SsdAnchorsCalculator (``GenerateAnchors``),
  TensorsToDetectionsCalculator (``DecodeBoxes``, ``ConvertToDetections``), NonMaxSuppressionCalculator
  (``WeightedNonMaxSuppression``) and of ImageToTensorCalculator's OpenCV converter (OpenCV itself);
* the raw network outputs from the TFLite file through the LiteRT interpreter (``ai-edge-litert``);
* MediaPipe's own Python solution (``mediapipe.solutions.face_detection``) end to end, when it runs;
* MTCNN's landmarks (conftest's ``run``: the real MTCNN nets through ONNX Runtime).

Measured here (MediaPipe 0.10.21, x86 CPU): ours and MediaPipe's solution agree exactly (0.0 px, same
scores) on all ten photos; the letterbox equals OpenCV's warp on every pixel but 1 level in 0.02 % of
chelsea's; against the NumPy port ≤ 1e-7 (normalised coordinates). Against MTCNN on the astronaut:
box IoU 0.71, eyes 5.1 / 6.3 px, nose 4.4 px (BlazeFace's eye points sit ~5 px below the pupils MTCNN
marks; its eye distance there is 44 px).
"""

from __future__ import annotations

import asyncio
import importlib.util
import math
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imgpipe.ensembles import face_decoders as fd
from imgpipe.ensembles import mtcnn
from imgpipe.ensembles.face_geometry import TEMPLATES
from imgpipe.errors import InvalidInputError
from imgpipe.manifest import ManifestError, parse_manifest
from imgpipe.samples import encode, sample_array

litert = pytest.importorskip("ai_edge_litert.interpreter", reason="ai-edge-litert (the TFLite interpreter)")

TFLITE = "package:mediapipe/modules/face_detection/face_detection_short_range.tflite"
ASTRONAUT_BOX = (182, 61, 86, 111)  # x, y, w, h: MTCNN's (DESIGN §4)
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")),
]
Network = Callable[[torch.Tensor], tuple[np.ndarray, np.ndarray]]


def package_file(package_path: str) -> Path:
    package, _, inner = package_path.removeprefix("package:").partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"the {package} wheel (mediapipe==0.10.21, --no-deps) is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / inner
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    return path


def iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """IoU of two x, y, w, h boxes."""
    w = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    return w * h / (a[2] * a[3] + b[2] * b[3] - w * h)


def _rgb(array: np.ndarray) -> np.ndarray:
    return np.array(np.repeat(array[..., None], 3, axis=2) if array.ndim == 2 else array)  # writable, contiguous


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    """Real photos, and crops of them that put the padding on each side and the faces off-centre."""
    astronaut = sample_array("astronaut")
    face = astronaut[0:300, 100:350]
    images = {
        "astronaut": astronaut,
        "wide": astronaut[20:320],  # 300×512: padded above and below
        "tall": astronaut[:, 100:351],  # 512×251: padded left and right, half-pixel sample positions
        "odd": astronaut[7:340, 41:447],  # 333×406: fractional sample positions
        "mirrored": astronaut[:, ::-1],
        "two": np.concatenate([face, face[:, ::-1]], axis=1),  # two faces, 300×500
        "small": np.asarray(Image.fromarray(astronaut).resize((203, 203), Image.BOX)),
        "camera": sample_array("camera"),
        "coffee": sample_array("coffee"),
        "chelsea": sample_array("chelsea"),
    }
    return {name: _rgb(image) for name, image in images.items()}


@pytest.fixture(scope="module")
def network() -> Network:
    """The TFLite file through the LiteRT interpreter: [N,128,128,3] → regressors [N,896,16], logits [N,896,1]."""
    interpreter = litert.Interpreter(model_path=str(package_file(TFLITE)))
    interpreter.allocate_tensors()
    (inp,) = interpreter.get_input_details()
    outputs = {d["name"]: d["index"] for d in interpreter.get_output_details()}

    def call(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        results = []
        for image in x.cpu().numpy():
            interpreter.set_tensor(inp["index"], image[None])
            interpreter.invoke()
            results.append([interpreter.get_tensor(outputs[n]).copy() for n in ("regressors", "classificators")])
        return np.concatenate([r[0] for r in results]), np.concatenate([r[1] for r in results])

    return call


def detect(image: np.ndarray, network: Network, threshold: float = 0.5) -> tuple[mtcnn.Faces, mtcnn.Faces]:
    """Our whole path on the interpreter's outputs: (5-point faces, faces with the 6 raw keypoints),
    both in image pixels."""
    x, box = fd.letterbox_blazeface(torch.from_numpy(image))
    (detections,) = fd.blazeface_detections(*network(x), min_score=threshold)
    height, width = image.shape[:2]
    raw = mtcnn.Faces(detections.boxes * 128, detections.scores, detections.keypoints * 128)
    five = fd.blazeface_faces(detections, 128, 128)
    return box.to_image(five, height, width), box.to_image(raw, height, width)


# -- MediaPipe's options ---------------------------------------------------------------------------------


def embedded_graph(data: bytes, graph_type: str):  # type: ignore[no-untyped-def]
    """The serialized CalculatorGraphConfig of ``graph_type`` inside a MediaPipe binary: found by its
    ``type`` field (field 20), parsed from the preceding message start that round-trips exactly."""
    from google.protobuf.message import DecodeError
    from mediapipe.framework import calculator_pb2

    marker = b"\xa2\x01" + bytes([len(graph_type)]) + graph_type.encode()
    for hit in re.finditer(re.escape(marker), data):
        tail = hit.end()
        ends = [tail + k for k in range(400) if data[tail + k] == 0]
        for start in range(hit.start() - 1, max(0, hit.start() - 8000), -1):
            if data[start] != 0x0A or data[start - 1] != 0:
                continue
            for end in ends:
                graph = calculator_pb2.CalculatorGraphConfig()
                try:
                    graph.ParseFromString(data[start:end])
                except DecodeError:
                    continue
                if graph.type == graph_type and graph.SerializeToString() == data[start:end]:
                    return graph
    raise AssertionError(f"no {graph_type} graph found")


def test_the_options_are_the_ones_mediapipes_graph_sets() -> None:
    calculator_pb2 = pytest.importorskip(
        "mediapipe.framework.calculator_pb2", reason="protobuf and the mediapipe wheel"
    )
    from mediapipe.calculators.tensor import image_to_tensor_calculator_pb2 as image_to_tensor
    from mediapipe.calculators.tensor import tensors_to_detections_calculator_pb2 as to_detections
    from mediapipe.calculators.tflite import ssd_anchors_calculator_pb2 as ssd
    from mediapipe.calculators.util import non_max_suppression_calculator_pb2 as nms
    from mediapipe.modules.face_detection import face_detection_pb2

    folder = package_file("package:mediapipe/python/__init__.py").parent
    (binary,) = folder.glob("_framework_bindings*.so")
    data = binary.read_bytes()
    short_range = embedded_graph(data, "FaceDetectionShortRange")
    (node,) = short_range.node
    assert node.calculator == "FaceDetection"
    options = face_detection_pb2.FaceDetectionOptions()
    options.ParseFromString(node.node_options[0].value)
    o = fd.BLAZEFACE_OPTIONS
    assert options.model_path == "mediapipe/modules/face_detection/face_detection_short_range.tflite"
    assert options.tensor_width == options.tensor_height == o["input_size"] == fd.BLAZEFACE_SIZE
    assert options.num_layers == o["num_layers"] and tuple(options.strides) == o["strides"]
    assert options.interpolated_scale_aspect_ratio == o["interpolated_scale_aspect_ratio"]
    assert options.num_boxes == o["num_boxes"]
    assert options.x_scale == options.y_scale == options.w_scale == options.h_scale == o["coordinate_scale"]
    assert options.min_score_thresh == o["min_score_thresh"]

    graph = embedded_graph(data, "FaceDetection")
    nodes = {n.calculator: n for n in graph.node}
    i2t = nodes["ImageToTensorCalculator"].options.Extensions[image_to_tensor.ImageToTensorCalculatorOptions.ext]
    assert i2t.keep_aspect_ratio and i2t.border_mode == i2t.BORDER_ZERO
    assert (i2t.output_tensor_float_range.min, i2t.output_tensor_float_range.max) == (-1.0, 1.0)
    # The ROI: the CPU graph the wheel ships feeds FaceDetectionShortRange only the image, so GetRoi
    # takes the whole image.
    assert "NORM_RECT:roi" in nodes["ImageToTensorCalculator"].input_stream
    cpu_graph = calculator_pb2.CalculatorGraphConfig()
    cpu_graph.ParseFromString(
        package_file("package:mediapipe/modules/face_detection/face_detection_short_range_cpu.binarypb").read_bytes()
    )
    assert [(n.calculator, list(n.input_stream)) for n in cpu_graph.node] == [
        ("FaceDetectionShortRange", ["IMAGE:image"])
    ]
    anchors = nodes["SsdAnchorsCalculator"].options.Extensions[ssd.SsdAnchorsCalculatorOptions.ext]
    assert (anchors.min_scale, anchors.max_scale) == (o["min_scale"], o["max_scale"])
    assert anchors.anchor_offset_x == anchors.anchor_offset_y == o["anchor_offset"]
    assert tuple(anchors.aspect_ratios) == o["aspect_ratios"] and anchors.fixed_anchor_size
    assert not anchors.reduce_boxes_in_lowest_layer and not anchors.multiscale_anchor_generation
    assert not anchors.feature_map_width and not anchors.feature_map_height
    assert {"num_layers:num_layers", "strides:strides", "input_size_width:tensor_width"} <= set(
        nodes["SsdAnchorsCalculator"].option_value
    )
    decode = nodes["TensorsToDetectionsCalculator"].options.Extensions[
        to_detections.TensorsToDetectionsCalculatorOptions.ext
    ]
    assert (decode.num_classes, decode.num_coords, decode.num_keypoints) == (1, o["num_coords"], o["num_keypoints"])
    assert (decode.box_coord_offset, decode.keypoint_coord_offset) == (
        o["box_coord_offset"],
        o["keypoint_coord_offset"],
    )
    assert decode.num_values_per_keypoint == 2 and decode.reverse_output_order and not decode.HasField("box_format")
    assert decode.sigmoid_score and decode.score_clipping_thresh == o["score_clipping_thresh"]
    assert not decode.apply_exponential_on_box_size and not decode.flip_vertically
    assert {"min_score_thresh:min_score_thresh", "x_scale:x_scale", "num_boxes:num_boxes"} <= set(
        nodes["TensorsToDetectionsCalculator"].option_value
    )
    suppression = nodes["NonMaxSuppressionCalculator"].options.Extensions[nms.NonMaxSuppressionCalculatorOptions.ext]
    assert suppression.min_suppression_threshold == np.float32(o["min_suppression_threshold"])
    assert suppression.overlap_type == suppression.INTERSECTION_OVER_UNION
    assert suppression.algorithm == suppression.WEIGHTED
    assert suppression.max_num_detections == -1 and suppression.min_score_threshold <= 0  # no other limits
    assert "DetectionProjectionCalculator" in nodes  # back to the image through the letterbox's matrix


# -- anchors ---------------------------------------------------------------------------------------------


def reference_anchors() -> np.ndarray:
    """SsdAnchorsCalculator::GenerateAnchors, statement by statement, with the graph's options."""
    num_layers, strides = 4, [8, 16, 16, 16]
    min_scale, max_scale, offset, size = 0.1484375, 0.75, 0.5, 128
    aspect_ratio_options, interpolated, fixed_anchor_size = [1.0], 1.0, True

    def calculate_scale(stride_index: int, num_strides: int) -> float:
        if num_strides == 1:
            return (min_scale + max_scale) * 0.5
        return min_scale + (max_scale - min_scale) * 1.0 * stride_index / (num_strides - 1.0)

    anchors = []
    layer_id = 0
    while layer_id < num_layers:
        anchor_height, anchor_width, aspect_ratios, scales = [], [], [], []
        last_same_stride_layer = layer_id
        while last_same_stride_layer < len(strides) and strides[last_same_stride_layer] == strides[layer_id]:
            scale = calculate_scale(last_same_stride_layer, len(strides))
            for aspect_ratio in aspect_ratio_options:
                aspect_ratios.append(aspect_ratio)
                scales.append(scale)
            if interpolated > 0.0:
                scale_next = (
                    1.0
                    if last_same_stride_layer == len(strides) - 1
                    else calculate_scale(last_same_stride_layer + 1, len(strides))
                )
                scales.append(math.sqrt(scale * scale_next))
                aspect_ratios.append(interpolated)
            last_same_stride_layer += 1
        for i, ratio in enumerate(aspect_ratios):
            anchor_height.append(scales[i] / math.sqrt(ratio))
            anchor_width.append(scales[i] * math.sqrt(ratio))
        feature_map_height = math.ceil(1.0 * size / strides[layer_id])
        feature_map_width = math.ceil(1.0 * size / strides[layer_id])
        for y in range(feature_map_height):
            for x in range(feature_map_width):
                for anchor_id in range(len(anchor_height)):
                    x_center = np.float32(np.float32(x + offset) * np.float32(1.0) / np.float32(feature_map_width))
                    y_center = np.float32(np.float32(y + offset) * np.float32(1.0) / np.float32(feature_map_height))
                    if fixed_anchor_size:
                        anchors.append((x_center, y_center, 1.0, 1.0))
                    else:
                        anchors.append((x_center, y_center, anchor_width[anchor_id], anchor_height[anchor_id]))
        layer_id = last_same_stride_layer
    return np.array(anchors, dtype=np.float32)


def test_anchors_equal_mediapipes() -> None:
    anchors = fd.blazeface_anchors()
    assert anchors.shape == (896, 4) and anchors.dtype == torch.float32
    np.testing.assert_array_equal(anchors.numpy(), reference_anchors())
    first, second = anchors[:512], anchors[512:]  # stride 8: 16×16 cells × 2; stride 16: 8×8 cells × 6
    assert first[:2].tolist() == [[1 / 32, 1 / 32, 1.0, 1.0]] * 2 and first[2].tolist() == [3 / 32, 1 / 32, 1.0, 1.0]
    assert first[-1].tolist() == [31 / 32, 31 / 32, 1.0, 1.0] and first[32].tolist() == [1 / 32, 3 / 32, 1.0, 1.0]
    assert second[:6].tolist() == [[1 / 16, 1 / 16, 1.0, 1.0]] * 6 and second[6].tolist() == [3 / 16, 1 / 16, 1.0, 1.0]
    assert anchors[-1].tolist() == [15 / 16, 15 / 16, 1.0, 1.0]
    assert torch.equal(first[::2], first[1::2]) and all(torch.equal(second[::6], second[k::6]) for k in range(6))
    # the general port: without fixed sizes, the sizes MediaPipe computes (scale, then √(scale·next))
    sized = fd.ssd_anchors(128, (8, 16, 16, 16), 0.1484375, 0.75, fixed_anchor_size=False)
    scales = [0.1484375 + (0.75 - 0.1484375) * i / 3 for i in range(4)] + [1.0]
    expected = [scales[0], math.sqrt(scales[0] * scales[1])]
    assert sized[:2, 2].tolist() == pytest.approx(expected, rel=1e-6)
    expected = [s for i in (1, 2, 3) for s in (scales[i], math.sqrt(scales[i] * scales[i + 1]))]
    assert sized[512:518, 3].tolist() == pytest.approx(expected, rel=1e-6)


# -- the letterbox -----------------------------------------------------------------------------------------


def opencv_letterbox(image: np.ndarray) -> np.ndarray:
    """ImageToTensorCalculator's OpenCV converter (image_to_tensor_converter_opencv.cc) after GetRoi and
    PadRoi: the whole image widened to a centred square, warpPerspective from its boxPoints onto the
    tensor's corners (INTER_LINEAR, BORDER_CONSTANT 0, uint8), then convertTo with scale 2/255, offset −1."""
    import cv2

    height, width = image.shape[:2]
    side = float(max(height, width))
    corners = cv2.boxPoints(((0.5 * width, 0.5 * height), (side, side), 0.0)).astype(np.float32)
    target = np.array([[0, 128], [0, 0], [128, 0], [128, 128]], dtype=np.float32)
    matrix = cv2.getPerspectiveTransform(corners, target)
    warped = cv2.warpPerspective(image, matrix, (128, 128), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    return warped.astype(np.float32) * np.float32(2.0 / 255.0) + np.float32(-1.0)


def test_letterbox_is_mediapipes(photos: dict[str, np.ndarray]) -> None:
    import cv2

    pinned = tuple(int(v) for v in cv2.__version__.split(".")[:2]) < (4, 11)  # the project's opencv pin
    for name, image in photos.items():
        x, box = fd.letterbox_blazeface(torch.from_numpy(image))
        assert x.shape == (1, 128, 128, 3) and x.dtype == torch.float32
        if not pinned:  # OpenCV 5.0's warpPerspective samples otherwise (up to 3 levels apart on "odd")
            continue
        difference = np.abs(x[0].numpy() - opencv_letterbox(image))
        # Like MediaPipe's own OpenCV, the pinned one rounds half-way values up (12 % of "tall"'s values
        # are half-way), as letterbox_blazeface does; its fixed-point weights round a few others the
        # other way: one level at most.
        assert difference.max() <= 2 / 255 + 1e-6, name
        assert (difference > 1e-6).mean() <= 1e-3, name
    wide, box = fd.letterbox_blazeface(torch.from_numpy(photos["wide"]))  # 300×512: rows −106 + 4i
    assert box == fd.Letterbox(scale=0.25, size=128, offset_x=0.0, offset_y=26.5)
    assert (wide[0, :27] == -1).all() and (wide[0, 102:] == -1).all()  # the padding, split evenly
    assert (wide[0, 27:102] > -1).flatten(1).any(1).all()  # every other row has image pixels
    _, tall = fd.letterbox_blazeface(torch.from_numpy(photos["tall"]))
    assert tall.offset_x == pytest.approx(130.5 / 4) and tall.offset_y == 0.0
    faces = mtcnn.Faces(torch.tensor([[26.5, 26.5, 90.5, 58.5]]), torch.ones(1), torch.full((1, 5, 2), 26.5))
    mapped = box.to_image(faces, 300, 512)
    assert mapped.boxes[0].tolist() == [106.0, 0.0, 362.0, 128.0]  # (x − offset) / scale
    assert mapped.landmarks[0, 0].tolist() == [106.0, 0.0]
    with pytest.raises(ValueError, match="H×W×3"):
        fd.letterbox_blazeface(torch.zeros((8, 8), dtype=torch.uint8))


# -- decoding and weighted NMS against a NumPy port of the C++ -----------------------------------------------


def reference_detections(
    regressors: np.ndarray, logits: np.ndarray, min_score: float = 0.5, threshold: float = 0.3
) -> list[tuple[float, np.ndarray, np.ndarray]]:
    """TensorsToDetectionsCalculator (CPU) then NonMaxSuppressionCalculator (WEIGHTED, IoU), as the C++
    does them, in float32: (score, box xmin/ymin/xmax/ymax, keypoints [6, 2]) per detection."""
    f32 = np.float32
    anchors = reference_anchors()
    detections = []
    for i in range(896):
        raw = regressors[i].astype(f32)
        ax, ay, aw, ah = (f32(v) for v in anchors[i])
        x_center = raw[0] / f32(128) * aw + ax  # reverse_output_order: x, y, w, h
        y_center = raw[1] / f32(128) * ah + ay
        w = raw[2] / f32(128) * aw
        h = raw[3] / f32(128) * ah
        ymin, xmin, ymax, xmax = (
            y_center - h / f32(2),
            x_center - w / f32(2),
            y_center + h / f32(2),
            x_center + w / f32(2),
        )
        score = f32(logits[i, 0])
        score = f32(-100) if score < -100 else score
        score = f32(100) if score > 100 else score
        with np.errstate(over="ignore"):
            score = f32(1) / (f32(1) + np.exp(-score))
        if score < min_score:
            continue
        width, height = xmax - xmin, ymax - ymin
        if width < 0 or height < 0 or math.isnan(width) or math.isnan(height):
            continue
        points = np.array(
            [[raw[4 + 2 * k] / f32(128) * aw + ax, raw[5 + 2 * k] / f32(128) * ah + ay] for k in range(6)], f32
        )
        detections.append((score, (xmin, ymin, width, height), points))

    def overlap(a: tuple, b: tuple) -> float:  # Rectangle_f(xmin, ymin, width, height), IoU
        a_max, b_max = (a[0] + a[2], a[1] + a[3]), (b[0] + b[2], b[1] + b[3])
        if a_max[0] < b[0] or b_max[0] < a[0] or a_max[1] < b[1] or b_max[1] < a[1]:
            return 0.0
        inter = (min(a_max[0], b_max[0]) - max(a[0], b[0])) * (min(a_max[1], b_max[1]) - max(a[1], b[1]))
        normalization = a[2] * a[3] + b[2] * b[3] - inter
        return inter / normalization if normalization > 0 else 0.0

    remained = sorted(range(len(detections)), key=lambda j: -detections[j][0])  # stable: ties in anchor order
    output = []
    while remained:
        size_before = len(remained)
        score, box, points = detections[remained[0]]
        candidates = [j for j in remained if overlap(detections[j][1], box) > threshold]
        rest = [j for j in remained if not overlap(detections[j][1], box) > threshold]
        weighted_box, weighted_points = (box[0], box[1], box[0] + box[2], box[1] + box[3]), points
        if candidates:
            sums, point_sums, total = np.zeros(4, f32), np.zeros((6, 2), f32), f32(0)
            for j in candidates:
                s, (x, y, w, h) = detections[j][0], detections[j][1]
                total += s
                sums += np.array([x * s, y * s, (x + w) * s, (y + h) * s], f32)
                point_sums += detections[j][2] * s
            xmin, ymin = sums[0] / total, sums[1] / total
            weighted_box = (xmin, ymin, xmin + (sums[2] / total - xmin), ymin + (sums[3] / total - ymin))
            weighted_points = point_sums / total
        output.append((float(score), np.array(weighted_box, f32), weighted_points))
        if size_before == len(rest):
            break
        remained = rest
    return output


def _assert_like_reference(ours: fd.BlazeFaceDetections, reference: list, atol: float = 1e-6) -> None:
    assert len(ours) == len(reference)
    for k, (score, box, points) in enumerate(reference):
        assert float(ours.scores[k]) == pytest.approx(score, abs=1e-6)
        np.testing.assert_allclose(ours.boxes[k].cpu().numpy(), box, rtol=0, atol=atol)
        np.testing.assert_allclose(ours.keypoints[k].cpu().numpy(), points, rtol=0, atol=atol)


@pytest.mark.parametrize("threshold", [0.5, 0.02])
def test_decoding_and_weighted_nms_equal_the_numpy_port(
    photos: dict[str, np.ndarray], network: Network, threshold: float
) -> None:
    """At MediaPipe's 0.5 (9 faces in all), and at 0.02: 290–530 candidates a photo, 318 clusters in all."""
    clusters = 0
    for name, image in photos.items():
        regressors, logits = network(fd.letterbox_blazeface(torch.from_numpy(image))[0])
        (ours,) = fd.blazeface_detections(regressors, logits, min_score=threshold)
        reference = reference_detections(regressors[0], logits[0], threshold)
        _assert_like_reference(ours, reference)
        assert (ours.scores[:-1] >= ours.scores[1:]).all(), name
        clusters += len(ours)
    assert clusters == (9 if threshold == 0.5 else 318)


def test_weighted_nms_merges_overlapping_boxes_by_score_and_stops_at_a_zero_area_one() -> None:
    regressors = np.zeros((896, 16), np.float32)
    logits = np.full((896, 1), -10.0, np.float32)
    regressors[0, :4] = [0, 0, 32, 32]  # anchors 0 and 1 share the centre (1/32, 1/32)
    regressors[1, :4] = [4, 0, 32, 32]  # shifted by 4/128: IoU 28/36 with anchor 0's box
    regressors[1, 4:] = 8.0  # its keypoints 8/128 right of and below the centre
    regressors[300, :4] = [0, 0, 16, 16]  # far away, alone
    logits[[0, 1, 300], 0] = [2.0, 1.0, 0.5]
    (merged,) = fd.blazeface_detections(regressors, logits)
    s0, s1 = 1 / (1 + math.exp(-2.0)), 1 / (1 + math.exp(-1.0))
    assert merged.scores.tolist() == pytest.approx([s0, 1 / (1 + math.exp(-0.5))], abs=1e-7)  # the best's score
    shift = 4 / 128 * s1 / (s0 + s1)
    box = [1 / 32 - 0.125 + shift, 1 / 32 - 0.125, 1 / 32 + 0.125 + shift, 1 / 32 + 0.125]
    np.testing.assert_allclose(merged.boxes[0].numpy(), box, atol=1e-7)
    np.testing.assert_allclose(
        merged.keypoints[0].numpy(), np.full((6, 2), 1 / 32 + 8 / 128 * s1 / (s0 + s1)), atol=1e-7
    )
    _assert_like_reference(merged, reference_detections(regressors, logits))
    # A zero-area best box overlaps nothing, not even itself: MediaPipe emits it alone and stops.
    regressors[5, :4] = [0, 0, 0, 0]
    logits[5, 0] = 3.0
    (stopped,) = fd.blazeface_detections(regressors, logits)
    assert len(stopped) == 1 and stopped.scores[0] == pytest.approx(1 / (1 + math.exp(-3.0)))
    _assert_like_reference(stopped, reference_detections(regressors, logits))
    regressors[7, 2] = -1.0  # a negative width is dropped before NMS
    logits[7, 0] = 5.0
    (dropped,) = fd.blazeface_detections(regressors, logits)
    assert len(dropped) == 1 and dropped.scores[0] == pytest.approx(1 / (1 + math.exp(-3.0)))
    assert len(fd.blazeface_detections(regressors, np.full((896, 1), -200.0, np.float32))[0]) == 0  # clipped, none


def test_batched_decoding_equals_one_image_at_a_time(photos: dict[str, np.ndarray], network: Network) -> None:
    batch = torch.cat([fd.letterbox_blazeface(torch.from_numpy(image))[0] for image in photos.values()])
    regressors, logits = (torch.from_numpy(o) for o in network(batch))
    batched = fd.decode_blazeface_batch(regressors, logits, threshold=0.2)
    assert len(batched) == len(photos)
    for k, faces in enumerate(batched):
        single = fd.decode_blazeface([regressors[k : k + 1], logits[k : k + 1]], 128, 128, threshold=0.2)
        assert len(faces) == len(single) and torch.equal(faces.scores, single.scores)
        torch.testing.assert_close(faces.boxes, single.boxes, rtol=0, atol=1e-5)
        torch.testing.assert_close(faces.landmarks, single.landmarks, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="2 outputs"):
        fd.decode_blazeface([regressors], 128, 128)
    with pytest.raises(ValueError, match="one image"):
        fd.decode_blazeface([regressors, logits], 128, 128)


# -- against MediaPipe's own solution and against MTCNN ----------------------------------------------------


@pytest.fixture(scope="module")
def mediapipe_solution() -> Iterator[object]:
    try:
        from mediapipe.python.solutions import face_detection
    except Exception as exc:  # any import failure of the --no-deps wheel: no reference
        pytest.skip(f"mediapipe.solutions.face_detection does not import: {exc}")
    try:
        detector = face_detection.FaceDetection(model_selection=0, min_detection_confidence=0.5)
    except Exception as exc:
        pytest.skip(f"MediaPipe's face detection graph does not start: {exc}")
    with detector:
        yield detector


def test_the_whole_path_equals_mediapipes_solution(
    photos: dict[str, np.ndarray], network: Network, mediapipe_solution
) -> None:  # type: ignore[no-untyped-def]
    found = 0
    for name, image in photos.items():
        height, width = image.shape[:2]
        _five, ours = detect(image, network)
        theirs = mediapipe_solution.process(image).detections or []
        assert len(ours) == len(theirs), name
        for k, detection in enumerate(theirs):
            box = detection.location_data.relative_bounding_box
            expected = [
                box.xmin * width,
                box.ymin * height,
                (box.xmin + box.width) * width,
                (box.ymin + box.height) * height,
            ]
            points = [[p.x * width, p.y * height] for p in detection.location_data.relative_keypoints]
            assert float(ours.scores[k]) == pytest.approx(detection.score[0], abs=1e-4), name
            np.testing.assert_allclose(ours.boxes[k].numpy(), expected, rtol=0, atol=0.05, err_msg=name)
            np.testing.assert_allclose(ours.landmarks[k].numpy(), points, rtol=0, atol=0.05, err_msg=name)
            found += 1
    assert (
        found == 9
    )  # one face in the six other astronaut photos and the cameraman, two in "two"; none in coffee, chelsea


def test_faces_agree_with_mtcnn_and_the_five_points_follow_the_template(
    photos: dict[str, np.ndarray], network: Network, run: mtcnn.SyncRun
) -> None:
    for name in ("astronaut", "wide", "mirrored", "two"):
        image = photos[name]
        faces, raw = detect(image, network)
        reference = mtcnn.detect_sync(image, mtcnn.MtcnnParams(), run)
        assert len(faces) == len(reference) == (2 if name == "two" else 1), name
        for k in range(len(faces)):
            x1, y1, x2, y2 = faces.boxes[k].tolist()
            overlaps = [
                iou((x1, y1, x2 - x1, y2 - y1), (a, b, c - a, d - b)) for a, b, c, d in reference.boxes.tolist()
            ]
            match = int(np.argmax(overlaps))
            assert overlaps[match] >= 0.6, name  # BlazeFace's boxes are square, MTCNN's taller: 0.67–0.77
            points = faces.landmarks[k]
            eye_distance = float((points[1] - points[0]).norm())
            error = (points - reference.landmarks[match]).norm(dim=-1)
            assert (error[:3] <= 0.35 * eye_distance).all(), (name, error)  # eyes, nose: 1.2–12.2 px (0.03–0.29)
            assert points[0, 0] < points[1, 0] and points[3, 0] < points[4, 0], name  # "left" = on the image's left
            # the mouth corners: on either side of MediaPipe's mouth centre, along the eye line
            torch.testing.assert_close((points[3] + points[4]) / 2, raw.landmarks[k, 3], rtol=0, atol=1e-4)
            across = points[4] - points[3]
            torch.testing.assert_close(across, (points[1] - points[0]) * 2 * fd.MOUTH_CORNER_FACTOR, rtol=0, atol=1e-4)
    faces, raw = detect(photos["astronaut"], network)
    x1, y1, x2, y2 = faces.boxes[0].tolist()
    assert iou((x1, y1, x2 - x1, y2 - y1), ASTRONAUT_BOX) >= 0.65 and faces.scores[0] > 0.9
    mtcnn_points = mtcnn.detect_sync(photos["astronaut"], mtcnn.MtcnnParams(), run).landmarks[0]
    assert ((faces.landmarks[0, :3] - mtcnn_points[:3]).norm(dim=-1) <= 7.0).all()  # 5.1, 6.3, 4.4 px
    # MediaPipe's keypoint 0 (the person's right eye) is on the image's left here, and in the mirror
    assert raw.landmarks[0, 0, 0] < raw.landmarks[0, 1, 0]
    template = TEMPLATES["arcface_112_v2"]
    factor = np.linalg.norm(template[4] - template[3]) / 2 / np.linalg.norm(template[1] - template[0])
    assert fd.MOUTH_CORNER_FACTOR == pytest.approx(factor) == pytest.approx(0.41406, abs=1e-5)


# -- devices -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_blazeface_runs_on_the_device_and_agrees_with_the_cpu(
    device: str, photos: dict[str, np.ndarray], network: Network
) -> None:
    anchors = fd.blazeface_anchors(device)
    assert anchors.device.type == device and fd.blazeface_anchors(torch.device(device)) is anchors
    assert torch.equal(anchors.cpu(), fd.blazeface_anchors())
    image = torch.from_numpy(photos["two"])
    x, box = fd.letterbox_blazeface(image.to(device))
    cpu_x, cpu_box = fd.letterbox_blazeface(image)
    assert x.device.type == device and box == cpu_box and torch.equal(x.cpu(), cpu_x)
    regressors, logits = (torch.from_numpy(o) for o in network(cpu_x))
    for threshold in (0.5, 0.05):
        cpu = fd.decode_blazeface([regressors, logits], 128, 128, threshold=threshold)
        ours = fd.decode_blazeface([regressors.to(device), logits.to(device)], 128, 128, threshold=threshold)
        assert len(ours) == len(cpu) >= 2
        for name in ("boxes", "scores", "landmarks"):
            value = getattr(ours, name)
            assert value.device.type == device and value.dtype == torch.float32
            torch.testing.assert_close(value.cpu(), getattr(cpu, name), rtol=0, atol=1e-5)
        mapped = box.to_image(ours, *image.shape[:2])
        assert mapped.boxes.device.type == device
    empty = fd.decode_blazeface([regressors.to(device), torch.full_like(logits, -9).to(device)], 128, 128)
    assert len(empty) == 0 and empty.boxes.device.type == device and empty.landmarks.shape == (0, 5, 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_cpu_tensor_is_made_while_blazeface_runs_on_cuda(photos: dict[str, np.ndarray], network: Network) -> None:
    """Only the NMS's host step makes CPU tensors: the copies of the candidate counts and the overlap
    matrix to the host (``_to_copy``) and NumPy's view of the latter (``detach``, under a dispatch mode)."""
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
    image = torch.from_numpy(photos["two"]).to(device)
    regressors, logits = (torch.from_numpy(o).to(device) for o in network(fd.letterbox_blazeface(image)[0]))
    fd.blazeface_anchors(device)  # the cache is warmed first: making it copies constants
    watch = CpuResults()
    with watch:
        x, box = fd.letterbox_blazeface(image)
        faces = box.to_image(fd.decode_blazeface([regressors, logits], 128, 128), *image.shape[:2])
    assert len(faces) == 2 and x.device.type == "cuda"
    assert watch.ops <= {"aten._to_copy.default", "aten.detach.default"}, watch.ops


# -- the manifest and the served pipeline ---------------------------------------------------------------------


def test_settings_imply_and_check_blazeface_input_size(tmp_path: Path) -> None:
    from imgpipe.pipelines.detect_faces import CONTRACT, Settings
    from tests.conftest import manifest_data

    def parsed(**table: object):  # type: ignore[no-untyped-def]
        data = manifest_data()
        data["pipelines"]["detect_faces"].update(table)
        return parse_manifest(data, tmp_path / "manifest.toml").pipelines["detect_faces"]

    assert parsed(detector="blazeface", network="blazeface").input_size == 128  # implied
    assert parsed(detector="blazeface", network="blazeface", input_size=128).input_size == 128
    assert Settings(detector="scrfd", network="x").input_size == 640 == Settings().input_size  # unchanged
    assert type(Settings(detector="blazeface", network="x").input_size) is int
    with pytest.raises(ManifestError, match=r"detect_faces\.input_size: BlazeFace's input is 128"):
        parsed(detector="blazeface", network="blazeface", input_size=640)
    with pytest.raises(ManifestError, match="'pnet' is not a BlazeFace short-range network"):
        parsed(detector="blazeface", network="pnet")
    with pytest.raises(ManifestError, match=r"network: '' is not a network"):
        parsed(detector="blazeface")
    assert CONTRACT.parse_parameters({})["score_threshold"] is None  # the decoder's 0.5
    assert CONTRACT.parse_parameters({"score_threshold": "0.8"})["score_threshold"] == 0.8
    with pytest.raises(InvalidInputError, match="'score_threshold' must be within"):
        CONTRACT.parse_parameters({"score_threshold": 1.5})


def test_the_bls_step_detects_with_blazeface(photos: dict[str, np.ndarray], network: Network) -> None:
    """FaceFinder.detect with a BlazeFace detector (the network through the interpreter), as the server runs it."""
    from imgpipe.ensembles.detect_faces import FaceFinder
    from imgpipe.pipelines.detect_faces import Settings

    finder = FaceFinder.__new__(FaceFinder)
    finder.detector = Settings(detector="blazeface", network="blazeface")
    calls: list[tuple[str, tuple[int, ...]]] = []

    async def call(role: str, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        calls.append((role, tuple(x.shape)))
        return tuple(torch.from_numpy(o) for o in network(x))

    finder.run = call  # type: ignore[method-assign]
    image = torch.from_numpy(photos["two"])
    faces = asyncio.run(finder.detect(image, mtcnn.MtcnnParams()))
    assert calls == [("detector", (1, 128, 128, 3))] and len(faces) == 2
    expected, _raw = detect(photos["two"], network)
    torch.testing.assert_close(faces.landmarks, expected.landmarks)
    strict = asyncio.run(finder.detect(image, mtcnn.MtcnnParams(score_threshold=0.955)))
    assert len(strict) == 1 and strict.scores[0] >= 0.955  # the request's score_threshold replaces 0.5


@pytest.fixture(scope="module")
def blazeface_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """One server for this module: detect_faces (and swap_face) with the BlazeFace detector; swap_face by
    the inswapper method (the reference recognizer and swapper), which the default manifest's server
    (face mesh method) does not cover."""
    from imgpipe.build.repository import build_repository
    from imgpipe.server import Ports, TritonServer, free_ports
    from tests.conftest import manifest_data

    package_file(TFLITE)
    folder = tmp_path_factory.mktemp("blazeface")
    data = manifest_data()
    data["pipelines"]["detect_faces"].update(detector="blazeface", network="blazeface", input_size=128)
    data["pipelines"]["swap_face"]["method"] = "inswapper"
    manifest = parse_manifest(data, folder / "manifest.toml")
    repo = folder / "model_repository"
    models = ["blazeface", "face_mesh", "detect_faces", "recognizer", "swapper", "swap_face"]
    build_repository(manifest, repo, models=models)
    with TritonServer(repo, Ports(*free_ports(3)), log_path=folder / "tritonserver.log") as running:
        yield running


@pytest.fixture(scope="module", params=["grpc", "http"])
def blazeface_client(request: pytest.FixtureRequest, blazeface_server) -> Iterator[object]:  # type: ignore[no-untyped-def]
    from imgpipe.clients.triton import TritonClient

    url = blazeface_server.grpc_url if request.param == "grpc" else blazeface_server.http_url
    with TritonClient(url, request.param) as connected:
        yield connected


@pytest.mark.server
def test_served_blazeface_finds_the_astronaut(
    blazeface_client, photos: dict[str, np.ndarray], network: Network
) -> None:  # type: ignore[no-untyped-def]
    from imgpipe.clients.faces import detect_faces
    from imgpipe.clients.triton import InferenceError
    from imgpipe.pipelines.detect_faces import CONTRACT

    astronaut = encode(photos["astronaut"], "PNG")
    (face,) = detect_faces(blazeface_client, astronaut)
    assert iou(face.box, ASTRONAUT_BOX) >= 0.65 and face.score == pytest.approx(0.9217, abs=2e-3)
    local, _raw = detect(photos["astronaut"], network)  # the served network is the imported TFLite file
    np.testing.assert_allclose(np.array(face.landmarks), local.landmarks[0].numpy(), rtol=0, atol=0.5)
    assert face.landmarks[0][0] < face.landmarks[1][0]
    assert detect_faces(blazeface_client, encode(photos["coffee"], "PNG")) == []
    outputs = [o.name for o in CONTRACT.outputs if not o.optional]
    strict = blazeface_client.infer(
        CONTRACT.model, {"IMAGE": np.array([astronaut], dtype=object)}, outputs, parameters={"score_threshold": 0.95}
    )
    assert strict["BOXES"].shape == (0, 4) and strict["LANDMARKS"].shape == (0, 5, 2)
    with pytest.raises(InferenceError, match="'score_threshold' must be within") as info:
        blazeface_client.infer(
            CONTRACT.model, {"IMAGE": np.array([astronaut], dtype=object)}, outputs, parameters={"score_threshold": 1.5}
        )
    assert info.value.is_invalid_argument
    (two_a, two_b) = detect_faces(blazeface_client, encode(photos["two"], "PNG"))
    assert two_a.box[0] > two_b.box[0]  # best first: the mirrored face scores higher (0.962 vs 0.940)
    # The face mesh on BlazeFace's faces: its eyes and nose near BlazeFace's own (mouth corners are estimated).
    (meshed,) = detect_faces(blazeface_client, astronaut, mesh=True)
    points = np.array(meshed.mesh)
    assert points.shape == (468, 3)
    eyes_nose = np.stack([points[[33, 133], :2].mean(0), points[[362, 263], :2].mean(0), points[1, :2]])
    assert np.abs(eyes_nose - np.array(face.landmarks[:3])).max() < 10


@pytest.mark.server
def test_served_swap_face_uses_blazeface(blazeface_server, photos: dict[str, np.ndarray]) -> None:  # type: ignore[no-untyped-def]
    import tritonclient.http as httpclient

    from imgpipe.clients.faces import swap_face
    from imgpipe.clients.triton import TritonClient

    stats = httpclient.InferenceServerClient(blazeface_server.http_url)

    def counts() -> tuple[int, int]:
        (entry,) = stats.get_inference_statistics("swapper")["model_stats"]
        return int(entry["inference_count"]), int(entry["execution_count"])

    before = counts()
    with TritonClient(blazeface_server.grpc_url, "grpc") as client:
        result = swap_face(client, encode(photos["astronaut"], "PNG"), encode(photos["two"], "PNG"))
    after = counts()
    stats.close()
    assert result.swapped == 2
    assert after[0] - before[0] == 2 and after[1] - before[1] == 1  # both faces in one swapper execution
