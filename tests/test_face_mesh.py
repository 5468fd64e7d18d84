"""The face mesh around detected faces (:mod:`imgpipe.ensembles.face_mesh`): MediaPipe's real face
landmark network (imported from TFLite, exported to ONNX, run by ONNX Runtime) on MTCNN's faces.

The mesh is checked against an independent measurement of the same face: MTCNN's five landmarks
(eye centres, nose tip, mouth corners) must match the mesh's corresponding points within a few pixels,
upright and with the photo rotated by 30° (the region of interest turns with the eyes).
"""

from __future__ import annotations

import asyncio

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from imgpipe.build.export import onnx_for
from imgpipe.ensembles import face_mesh, mtcnn
from imgpipe.manifest import Manifest
from imgpipe.samples import sample_array


@pytest.fixture(scope="module")
def mesh_run(default_manifest: Manifest, tmp_path_factory: pytest.TempPathFactory) -> face_mesh.Run:
    net = default_manifest.network("face_mesh")
    path = onnx_for(default_manifest, net, cache_dir=tmp_path_factory.mktemp("cache")).onnx_path
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    async def call(role: str, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        assert role == "mesh" and x.shape[1:] == (192, 192, 3) and x.dtype == torch.float32
        return tuple(torch.from_numpy(o) for o in session.run(None, {net.input().name: x.cpu().numpy()}))

    return call


def rotated_astronaut(angle: float) -> np.ndarray:
    image = Image.fromarray(sample_array("astronaut")).rotate(angle, resample=Image.BILINEAR, center=(225, 120))
    return np.array(image)


@pytest.mark.parametrize(("angle", "tolerance"), [(0, 3.5), (30, 8.0)])
def test_mesh_agrees_with_mtcnn_landmarks(run: mtcnn.SyncRun, mesh_run, angle: float, tolerance: float) -> None:  # type: ignore[no-untyped-def]
    image = rotated_astronaut(angle)
    faces = mtcnn.detect_sync(image, mtcnn.MtcnnParams(), run)
    assert len(faces) == 1
    meshes = asyncio.run(face_mesh.find_meshes(torch.from_numpy(image), faces, mesh_run))
    assert meshes.points.shape == (1, 468, 3) and meshes.points.dtype == torch.float32
    assert float(meshes.presence[0]) > 0.9
    error = (meshes.five_points() - faces.landmarks).norm(dim=-1)[0]
    print(f"angle {angle}: mesh vs MTCNN landmarks, px: {[round(e, 2) for e in error.tolist()]}")
    assert float(error.max()) < tolerance
    # All points inside the face's box grown by a quarter; z spread like a face (not flat, not huge).
    x1, y1, x2, y2 = faces.boxes[0].tolist()
    grow = 0.25 * max(x2 - x1, y2 - y1)
    xy = meshes.points[0, :, :2]
    inside_x = (xy[:, 0] > x1 - grow) & (xy[:, 0] < x2 + grow)
    assert bool((inside_x & (xy[:, 1] > y1 - grow) & (xy[:, 1] < y2 + grow)).all())
    depth = float(meshes.points[0, :, 2].max() - meshes.points[0, :, 2].min())
    assert 0.2 * (x2 - x1) < depth < 1.5 * (x2 - x1)


def test_a_region_without_a_face_has_low_presence(mesh_run) -> None:  # type: ignore[no-untyped-def]
    image = torch.from_numpy(sample_array("astronaut"))
    sky = mtcnn.Faces(
        torch.tensor([[20.0, 10.0, 100.0, 90.0]]),
        torch.tensor([0.9]),
        torch.tensor([[[40.0, 40.0], [80.0, 40.0], [60.0, 55.0], [45.0, 70.0], [75.0, 70.0]]]),
    )
    meshes = asyncio.run(face_mesh.find_meshes(image, sky, mesh_run))
    assert float(meshes.presence[0]) < 0.5


def test_roi_crop_and_projection_round_trip() -> None:
    """Points placed in the crop at known image positions come back to those positions."""
    faces = mtcnn.Faces(
        torch.tensor([[100.0, 50.0, 180.0, 150.0]]),
        torch.tensor([1.0]),
        torch.tensor([[[120.0, 80.0], [160.0, 100.0], [140.0, 110.0], [125.0, 130.0], [155.0, 135.0]]]),
    )
    matrices = face_mesh.roi_matrices(faces)
    assert matrices.shape == (1, 2, 3)
    # The eye line is level in the crop, the box centre at the crop's centre, the scale 192 / (1.5·100).
    eyes = faces.landmarks[0, :2].to(torch.float64) @ matrices[0, :, :2].T + matrices[0, :, 2]
    assert abs(float(eyes[0, 1] - eyes[1, 1])) < 1e-9
    centre = torch.tensor([140.0, 100.0], dtype=torch.float64) @ matrices[0, :, :2].T + matrices[0, :, 2]
    torch.testing.assert_close(centre, torch.tensor([95.5, 95.5], dtype=torch.float64))  # pixel indices
    assert float(matrices[0, :, :2].det().sqrt()) == pytest.approx(192 / 150)
    image_points = torch.tensor([[130.0, 90.0, 0.0], [150.0, 120.0, 7.5]], dtype=torch.float64)
    in_crop = image_points[:, :2] @ matrices[0, :, :2].T + matrices[0, :, 2]
    raw = torch.zeros((1, 468, 3))
    raw[0, :2, :2] = in_crop.to(torch.float32) + 0.5  # the network answers in continuous crop coordinates
    raw[0, :2, 2] = image_points[:, 2].to(torch.float32) * 192 / 150
    meshes = face_mesh.project(raw.reshape(1, 1, 1, 1404), torch.tensor([[[[3.0]]]]), matrices)
    torch.testing.assert_close(meshes.points[0, :2], image_points.to(torch.float32), atol=1e-4, rtol=0)
    assert float(meshes.presence[0]) == pytest.approx(float(torch.sigmoid(torch.tensor(3.0))))


def test_crops_are_nhwc_in_the_unit_range() -> None:
    image = torch.from_numpy(sample_array("astronaut"))
    points = [[205.0, 105.0], [245.0, 105.0], [225.0, 125.0], [208.0, 145.0], [242.0, 145.0]]
    faces = mtcnn.Faces(torch.tensor([[182.0, 61.0, 268.0, 172.0]]), torch.tensor([1.0]), torch.tensor([points]))
    x = face_mesh.crops(image, face_mesh.roi_matrices(faces))
    assert x.shape == (1, 192, 192, 3) and 0 <= float(x.min()) and float(x.max()) <= 1
    # The crop's centre is the box's centre pixel (an identity-scale check of the index convention).
    assert float((x[0, 96, 96] * 255 - image[116, 225].float()).abs().max()) < 25


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (runs on the GPU machine)")
def test_mesh_runs_on_cuda_tensors(run: mtcnn.SyncRun, mesh_run) -> None:  # type: ignore[no-untyped-def]
    image = rotated_astronaut(0)
    faces = mtcnn.detect_sync(image, mtcnn.MtcnnParams(), run)
    cpu = asyncio.run(face_mesh.find_meshes(torch.from_numpy(image), faces, mesh_run))
    cuda = asyncio.run(face_mesh.find_meshes(torch.from_numpy(image).cuda(), faces.to("cuda"), mesh_run))
    assert cuda.points.is_cuda
    torch.testing.assert_close(cuda.points.cpu(), cpu.points, atol=1e-2, rtol=0)
