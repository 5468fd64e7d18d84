"""Face geometry against independent implementations, detector decoders on constructed outputs, and
swap_face through the real server."""

from __future__ import annotations

import io
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from PIL import Image, ImageDraw, ImageFilter
from skimage.transform import SimilarityTransform

from imgpipe.build.export import onnx_for
from imgpipe.build.networks import build_reference, count_flops
from imgpipe.clients.faces import detect_faces, swap_face
from imgpipe.clients.triton import InferenceError, TritonClient
from imgpipe.ensembles import face_decoders
from imgpipe.ensembles import face_geometry as geo
from imgpipe.ensembles.swap_face import choose, identity_latent
from imgpipe.errors import InvalidInputError
from imgpipe.manifest import Manifest
from imgpipe.pipelines.swap_face import CONTRACT
from imgpipe.samples import encode, sample_array

ASTRONAUT_LANDMARKS = np.array([[204.5, 100.8], [246.8, 102.9], [224.5, 128.8], [201.2, 139.1], [244.8, 141.7]])


def _astronaut() -> torch.Tensor:
    return torch.from_numpy(sample_array("astronaut")).permute(2, 0, 1).float()


@pytest.mark.parametrize("template,size", [("arcface_112_v2", 112), ("arcface_128", 128), ("ffhq_512", 512)])
def test_similarity_fit_matches_skimage(template: str, size: int) -> None:
    rng = np.random.default_rng(3)
    points = ASTRONAUT_LANDMARKS + rng.normal(0, 2, ASTRONAUT_LANDMARKS.shape)
    ours = geo.align_matrix(torch.from_numpy(points), template, size)
    assert ours.dtype == torch.float64 and ours.shape == (2, 3)
    reference = SimilarityTransform.from_estimate(points, geo.TEMPLATES[template] * size)
    np.testing.assert_allclose(ours.numpy(), reference.params[:2], atol=1e-9)
    assert abs(ours[0, 0] - ours[1, 1]) < 1e-12 and abs(ours[0, 1] + ours[1, 0]) < 1e-12  # 4 degrees of freedom
    np.testing.assert_allclose(geo.invert(ours).numpy(), np.linalg.inv(reference.params)[:2], atol=1e-9)


def test_similarity_fit_is_batched_over_faces() -> None:
    rng = np.random.default_rng(4)
    points = torch.from_numpy(ASTRONAUT_LANDMARKS + rng.normal(0, 3, (3, 5, 2)))
    batched = geo.align_matrix(points, "arcface_128", 128)
    assert batched.shape == (3, 2, 3)
    for face, matrix in zip(points, batched, strict=True):
        torch.testing.assert_close(matrix, geo.align_matrix(face, "arcface_128", 128), rtol=0, atol=1e-12)
    torch.testing.assert_close(geo.invert(batched)[1], geo.invert(batched[1]), rtol=0, atol=0)


def test_warp_matches_opencv_warpaffine() -> None:
    import cv2

    image = sample_array("astronaut")
    matrix = geo.align_matrix(torch.from_numpy(ASTRONAUT_LANDMARKS), "arcface_128", 128)
    ours = geo.warp(_astronaut(), matrix, 128).permute(1, 2, 0).numpy()
    theirs = cv2.warpAffine(image, matrix.numpy(), (128, 128), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    assert np.abs(ours - theirs).mean() < 0.5 and np.abs(ours - theirs).max() < 3  # OpenCV rounds to fixed point


@pytest.mark.parametrize(("template", "size", "mean_inside"), [("arcface_128", 128, 4.0), ("ffhq_512", 512, 1.5)])
def test_pasting_back_an_unchanged_crop_leaves_the_image_unchanged(
    template: str, size: int, mean_inside: float
) -> None:
    frame = _astronaut()
    matrix = geo.align_matrix(torch.from_numpy(ASTRONAUT_LANDMARKS), template, size)
    mask = geo.box_mask(size)
    out = geo.paste_back(frame, geo.warp(frame, matrix, size), matrix, mask)
    reach = geo.paste_back(torch.zeros(1, 512, 512), mask[None], matrix, mask)[0]  # where the mask is > 0
    error = (out - frame).abs().amax(0)
    assert error[reach == 0].max() == 0  # outside the mask: exactly unchanged
    # Inside: only resampling loss (the 128 crop shrinks this face, so sharp edges blur; the 512 crop doesn't).
    assert error[reach > 0].mean() < mean_inside
    assert (reach > 0.99).sum() > 3000  # the mask really covers the face


def test_box_mask_is_feathered() -> None:
    mask = geo.box_mask(128, 0.3)
    assert mask.shape == (128, 128) and mask[64, 64] > 0.999 and mask[0, 0] < 0.01
    assert torch.all(mask[64, 1:65] >= mask[64, :64])  # rises monotonically towards the centre
    assert geo.box_mask(128, 0.3) is mask  # made once
    assert torch.all(geo.box_mask(16, 0.0) == 1)


def _cell_index(row: int, col: int, width: int, stride: int, anchors: int, anchor: int = 0) -> int:
    return (row * (width // stride) + col) * anchors + anchor


def scrfd_outputs(size: int) -> list[torch.Tensor]:
    """SCRFD outputs with two faces: score 0.9 centred (32, 24) at stride 8, 0.8 centred (0, 32) at stride 32."""
    outputs = [torch.zeros(((size // s) ** 2 * 2, 1)) for s in face_decoders.STRIDES]
    outputs += [torch.zeros(((size // s) ** 2 * 2, 4)) for s in face_decoders.STRIDES]
    outputs += [torch.zeros(((size // s) ** 2 * 2, 10)) for s in face_decoders.STRIDES]
    i = _cell_index(3, 4, size, 8, 2, anchor=1)  # centre (32, 24) at stride 8
    outputs[0][i] = 0.9
    outputs[3][i] = torch.tensor([1.0, 1, 2, 2])  # distances in strides: left, top, right, bottom
    outputs[6][i] = torch.tensor([[-1.0, -1], [1, -1], [0, 0], [-1, 1], [1, 1]]).reshape(-1)
    j = _cell_index(1, 0, size, 32, 2)  # centre (0, 32) at stride 32
    outputs[2][j] = 0.8
    outputs[5][j] = torch.tensor([0, 0.5, 1, 0.5])
    outputs[1][:] = 0.3  # below the threshold everywhere at stride 16
    return outputs


def yunet_outputs(size: int) -> list[torch.Tensor]:
    """YuNet outputs with one face: score 0.9, box (8, 16, 40, 64), all landmarks at (24, 40)."""
    cells = [(size // s) ** 2 for s in face_decoders.STRIDES]
    outputs = [torch.zeros((c, 1)) for c in cells] + [torch.zeros((c, 1)) for c in cells]
    outputs += [torch.zeros((c, 4)) for c in cells] + [torch.zeros((c, 10)) for c in cells]
    k = 2 * (size // 16) + 1  # row 2, col 1 at stride 16
    outputs[1][k], outputs[4][k] = 0.81, 1.0  # score √(0.81·1) = 0.9
    outputs[7][k] = torch.tensor([0.5, 0.5, math.log(2.0), math.log(3.0)])  # centre (24, 40), 32×48
    outputs[10][k] = torch.tensor([0.5, 0.5]).repeat(5)
    return outputs


def test_scrfd_decoder_recovers_constructed_faces() -> None:
    size = 64
    faces = face_decoders.decode_scrfd(scrfd_outputs(size), size, size, threshold=0.5)
    assert faces.scores.tolist() == pytest.approx([0.9, 0.8])
    assert faces.boxes.dtype == faces.scores.dtype == faces.landmarks.dtype == torch.float32
    np.testing.assert_allclose(faces.boxes[0], [24, 16, 48, 40])
    np.testing.assert_allclose(faces.landmarks[0], [[24, 16], [40, 16], [32, 24], [24, 32], [40, 32]])
    np.testing.assert_allclose(faces.boxes[1], [0, 16, 32, 48])
    assert len(face_decoders.decode_scrfd(scrfd_outputs(size), size, size, threshold=0.95)) == 0


def test_yunet_decoder_recovers_a_constructed_face() -> None:
    size = 64
    faces = face_decoders.decode_yunet(yunet_outputs(size), size, size, threshold=0.6)
    assert faces.scores.tolist() == pytest.approx([0.9])
    np.testing.assert_allclose(faces.boxes[0], [8, 16, 40, 64], atol=1e-5)
    np.testing.assert_allclose(faces.landmarks[0], np.tile([24, 40], (5, 1)), atol=1e-5)


def test_decoders_refuse_the_wrong_number_of_outputs() -> None:
    with pytest.raises(ValueError, match="needs 9 outputs"):
        face_decoders.decode_scrfd([torch.zeros((1, 1))] * 3, 64, 64)
    with pytest.raises(ValueError, match="needs 12 outputs"):
        face_decoders.decode_yunet([torch.zeros((1, 1))] * 9, 64, 64)


def test_a_second_decode_of_the_same_size_reuses_the_anchor_grid() -> None:
    grid = face_decoders.anchor_centers(96, 64, 8, 2)
    assert grid.shape == (12 * 8 * 2, 2) and grid[:4].tolist() == [[0, 0], [0, 0], [8, 0], [8, 0]]
    assert face_decoders.anchor_centers(96, 64, 8, 2, torch.device("cpu")) is grid
    face_decoders.decode_scrfd(scrfd_outputs(64), 64, 64)
    made = face_decoders._anchor_centers.cache_info().misses
    face_decoders.decode_scrfd(scrfd_outputs(64), 64, 64)
    assert face_decoders._anchor_centers.cache_info().misses == made  # nothing new was computed


def test_letterbox_maps_boxes_back_to_the_image() -> None:
    rgb = torch.zeros((300, 600, 3), dtype=torch.uint8)
    x, box = face_decoders.letterbox(rgb, 640, "scrfd")
    assert x.shape == (1, 3, 640, 640) and x.dtype == torch.float32 and box.scale == pytest.approx(640 / 600)
    assert x[0, 0, 400, 10] == pytest.approx(-127.5 / 128)  # padding (zero pixels) below the image
    faces = face_decoders.Faces(torch.tensor([[64.0, 32, 128, 96]]), torch.tensor([0.9]), torch.ones((1, 5, 2)))
    mapped = box.to_image(faces, 300, 600)
    np.testing.assert_allclose(mapped.boxes[0], [60, 30, 120, 90], rtol=1e-5)
    np.testing.assert_allclose(mapped.landmarks[0], np.full((5, 2), 600 / 640), rtol=1e-6)
    rgb[..., 0] = 255
    bgr, _ = face_decoders.letterbox(rgb, 640, "yunet")
    assert bgr[0, 2, 10, 10] == 255 and bgr[0, 0, 10, 10] == 0 and bgr[0, 2, 400, 10] == 0  # red is last in BGR
    with pytest.raises(ValueError, match="unknown detector"):
        face_decoders.letterbox(rgb, 640, "blazeface")


def test_reference_swapper_cost_emap_and_latent(test_manifest: Manifest, tmp_path: Path) -> None:
    swapper = build_reference("swapper", 64, seed=0)
    gflop = count_flops(swapper, torch.zeros(1, 3, 128, 128), torch.zeros(1, 512)) / 1e9
    assert 300 <= gflop <= 400, gflop  # inswapper_128: ≈349 GFLOP per face
    export = onnx_for(test_manifest, test_manifest.network("swapper"), cache_dir=tmp_path)
    last = onnx.load(str(export.onnx_path)).graph.initializer[-1]
    assert last.name == "emap" and tuple(last.dims) == (512, 512)
    emap = numpy_helper.to_array(last)
    embedding = np.random.default_rng(0).standard_normal(512).astype(np.float32)
    latent = identity_latent(torch.from_numpy(embedding), torch.tensor(emap))
    np.testing.assert_allclose(latent[0].numpy(), (embedding @ emap) / np.linalg.norm(embedding), rtol=1e-4, atol=1e-6)


def test_face_selection() -> None:
    boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 50, 50], [0, 0, 20, 20]], dtype=torch.float32)
    faces = face_decoders.Faces(boxes, torch.tensor([0.99, 0.9, 0.8]), torch.zeros((3, 5, 2)))
    assert choose(faces, "all") == [0, 1, 2] and choose(faces, "largest") == [1] and choose(faces, 2) == [2]
    with pytest.raises(InvalidInputError, match="only 3 face"):
        choose(faces, 5)
    assert CONTRACT.parse_parameters({"faces": "Largest"})["faces"] == "largest"
    assert CONTRACT.parse_parameters({"faces": "1"})["faces"] == 1
    with pytest.raises(InvalidInputError, match="'faces' must be all, largest or a face index"):
        CONTRACT.parse_parameters({"faces": "biggest"})


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _aligned_grey(image: np.ndarray, landmarks: tuple) -> np.ndarray:
    """The inner face (the central 64² of the 112² ArcFace-aligned crop) in grey, mean 0, norm 1."""
    chw = torch.from_numpy(image).permute(2, 0, 1).to(torch.float32)
    crop = geo.warp(chw, geo.align_matrix(torch.tensor(landmarks), "arcface_112_v2", 112), 112)
    grey = crop.mean(0)[24:88, 24:88].numpy().astype(np.float64)
    grey -= grey.mean()
    return grey / np.linalg.norm(grey)


@pytest.mark.server
def test_mesh_swap_brings_the_source_face_and_changes_nothing_outside_the_target_mesh(client: TritonClient) -> None:
    """Issue 9's acceptance with the default manifest (method mesh, real weights only): Grace Hopper's face
    onto the astronaut. Towards the source: the swapped face's texture correlates with the source face
    (both aligned by their 5 landmarks) far more than the original target did. Nothing changes outside
    the target's face mesh (its convex hull, from detect_faces' MESH output, grown by 2 pixels)."""
    from scipy.spatial import ConvexHull

    target, source = sample_array("astronaut"), sample_array("hopper")
    target_png, source_png = encode(target, "PNG"), encode(source, "PNG")
    result = swap_face(client, source_png, target_png)
    assert result.swapped == 1
    out = _pixels(result.image)
    assert out.shape == target.shape
    (face,) = detect_faces(client, target_png, mesh=True)
    (source_face,) = detect_faces(client, source_png)
    reference = _aligned_grey(source, source_face.landmarks)
    before = float((_aligned_grey(target, face.landmarks) * reference).sum())
    after = float((_aligned_grey(out, face.landmarks) * reference).sum())
    print(f"correlation with the source face: target {before:.3f}, swapped {after:.3f}")
    assert after > 0.6 and after > before + 0.2  # measured 0.377 -> 0.702
    points = np.array(face.mesh)[:, :2]
    hull = points[ConvexHull(points).vertices]
    inside = Image.new("L", (target.shape[1], target.shape[0]), 0)
    ImageDraw.Draw(inside).polygon([tuple(p) for p in hull], fill=255)
    allowed = np.asarray(inside.filter(ImageFilter.MaxFilter(5))) > 0
    changed = np.abs(out.astype(int) - target).max(axis=2) > 0
    assert changed.sum() > 2000 and not (changed & ~allowed).any()


@pytest.mark.server
def test_swap_without_target_face_returns_the_target_unchanged(client: TritonClient) -> None:
    coffee = sample_array("coffee")
    result = swap_face(client, encode(sample_array("astronaut"), "PNG"), encode(coffee, "PNG"))
    assert result.swapped == 0
    np.testing.assert_array_equal(_pixels(result.image), coffee)


@pytest.mark.server
def test_swap_errors_are_invalid_argument(client: TritonClient) -> None:
    astronaut, coffee = encode(sample_array("astronaut"), "PNG"), encode(sample_array("coffee"), "PNG")
    for kwargs, message in (
        (dict(source=coffee, target=astronaut), "no face found in the source image"),
        (dict(source=astronaut, target=astronaut, faces=4), "the target has only 1 face"),
        (dict(source=astronaut, target=astronaut, fmt="gif"), "'format' must be png or jpeg"),
        (dict(source=b"", target=astronaut), "empty input"),
    ):
        with pytest.raises(InferenceError, match=message) as info:
            swap_face(client, **kwargs)  # type: ignore[arg-type]
        assert info.value.is_invalid_argument
    jpeg = swap_face(client, astronaut, astronaut, faces="largest", fmt="jpeg")
    assert jpeg.image[:2] == b"\xff\xd8" and jpeg.swapped == 1


@pytest.mark.server
def test_all_faces_of_a_request_go_through_the_face_mesh_as_one_batch(client: TritonClient, server) -> None:  # type: ignore[no-untyped-def]
    """Method mesh: the source face and every target face in one execution of the face mesh network (the
    inswapper method's one swapper execution is checked in tests/test_blazeface.py)."""
    import tritonclient.http as httpclient

    face = sample_array("astronaut")[40:200, 150:300]
    group = np.concatenate([face, face, face], axis=1)  # three faces side by side
    stats = httpclient.InferenceServerClient(server.http_url)

    def counts() -> tuple[int, int]:
        (entry,) = stats.get_inference_statistics("face_mesh")["model_stats"]
        return int(entry["inference_count"]), int(entry["execution_count"])

    before = counts()
    result = swap_face(client, encode(sample_array("astronaut"), "PNG"), encode(np.ascontiguousarray(group), "PNG"))
    after = counts()
    stats.close()
    assert result.swapped == 3
    assert after[0] - before[0] == 4 and after[1] - before[1] == 1  # 1 source + 3 target faces, one execution


@pytest.mark.server
def test_swap_command(server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    source, target = tmp_path / "a.png", tmp_path / "b.png"
    source.write_bytes(encode(sample_array("astronaut"), "PNG"))
    target.write_bytes(encode(sample_array("camera"), "PNG"))
    out = tmp_path / "out.jpg"
    command = [sys.executable, "-m", "imgpipe.cli", "swap", str(source), str(target), "-o", str(out)]
    done = subprocess.run([*command, "--url", server.grpc_url], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert Image.open(out).format == "JPEG" and Image.open(out).size == (512, 512)
    faceless = tmp_path / "c.png"
    faceless.write_bytes(encode(sample_array("coffee"), "PNG"))
    command = [sys.executable, "-m", "imgpipe.cli", "swap", str(faceless), str(target), "-o", str(out)]
    failed = subprocess.run([*command, "--url", server.grpc_url], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "COLUMNS": "200"})  # fmt: skip
    assert failed.returncode == 1 and "no face found in the source image" in failed.stderr
