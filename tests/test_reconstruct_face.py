"""reconstruct_face: the 3DMM maths on constructed bases, Deep3DFaceRecon's alignment against a port of its
reference code (numpy lstsq, PIL), the reference ResNet-50, the basis checks, the face mesh's frame and pose,
the mesh files read back by independent readers (our own GLB/PLY parsers always; trimesh and pygltflib
where installed), the rasterizer, and the pipeline through the real server (gRPC and HTTP).
"""

from __future__ import annotations

import io
import json
import math
import struct
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imgpipe.build import bfm
from imgpipe.build.networks import build_reference, count_flops
from imgpipe.build.networks.face_regressor import load_deep3d_checkpoint
from imgpipe.clients.reconstruct import main as reconstruct_main
from imgpipe.clients.reconstruct import reconstruct_face
from imgpipe.clients.triton import InferenceError, TritonClient
from imgpipe.ensembles import face3d, face3d_io, face3d_render, face_mesh, mesh_swap, mtcnn
from imgpipe.ensembles.reconstruct_face import choose
from imgpipe.errors import InvalidInputError
from imgpipe.manifest import ManifestError, parse_manifest
from imgpipe.pipelines.reconstruct_face import Settings, contract_for
from imgpipe.samples import encode, sample_array
from tests.conftest import manifest_data

ASTRONAUT_BOX = (182, 61, 86, 111)  # x, y, w, h: MTCNN's (DESIGN §4)
ASTRONAUT_LANDMARKS = np.array([[204.5, 100.8], [246.8, 102.9], [224.5, 128.8], [201.2, 139.1], [244.8, 141.7]])
MESH_VERTICES, MESH_TRIANGLES = 468, 898
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


# --- independent readers ---------------------------------------------------------------------------------

_COMPONENTS = {5126: "<f4", 5125: "<u4", 5123: "<u2", 5121: "u1"}
_WIDTH = {"SCALAR": 1, "VEC2": 2, "VEC3": 3, "VEC4": 4}


def parse_glb(data: bytes) -> tuple[dict, bytes]:
    """GLB 2.0 by the specification: 12-byte header, a JSON chunk, a BIN chunk."""
    magic, version, length = struct.unpack_from("<III", data, 0)
    assert (magic, version, length) == (0x46546C67, 2, len(data))
    json_length, json_type = struct.unpack_from("<II", data, 12)
    assert json_type == 0x4E4F534A and json_length % 4 == 0
    document = json.loads(data[20 : 20 + json_length])
    offset = 20 + json_length
    bin_length, bin_type = struct.unpack_from("<II", data, offset)
    assert bin_type == 0x004E4942 and offset + 8 + bin_length == len(data)
    return document, data[offset + 8 : offset + 8 + bin_length]


def glb_accessor(document: dict, binary: bytes, index: int) -> np.ndarray:
    accessor = document["accessors"][index]
    view = document["bufferViews"][accessor["bufferView"]]
    width = _WIDTH[accessor["type"]]
    values = np.frombuffer(
        binary, _COMPONENTS[accessor["componentType"]], accessor["count"] * width,
        view.get("byteOffset", 0) + accessor.get("byteOffset", 0),
    )  # fmt: skip
    assert values.nbytes <= view["byteLength"]
    return values.reshape(accessor["count"], width)


def glb_texture(document: dict, binary: bytes) -> Image.Image:
    image = document["images"][document["textures"][0]["source"]]
    view = document["bufferViews"][image["bufferView"]]
    assert image["mimeType"] == "image/png"
    return Image.open(io.BytesIO(binary[view["byteOffset"] : view["byteOffset"] + view["byteLength"]]))


def parse_ply(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Binary little-endian PLY with float xyz/normals, uchar colours and uchar-int face lists."""
    end = data.index(b"end_header\n") + len(b"end_header\n")
    header = data[:end].decode("ascii").splitlines()
    assert header[:2] == ["ply", "format binary_little_endian 1.0"]
    vertices = int(next(h for h in header if h.startswith("element vertex")).split()[-1])
    faces = int(next(h for h in header if h.startswith("element face")).split()[-1])
    names = [h.split()[-1] for h in header if h.startswith("property") and "list" not in h]
    dtypes = [
        ("<f4" if h.split()[1] == "float" else "u1") for h in header if h.startswith("property") and "list" not in h
    ]
    vertex = np.frombuffer(data, np.dtype(list(zip(names, dtypes, strict=True))), vertices, end)
    face = np.frombuffer(data, np.dtype([("n", "u1"), ("i", "<i4", (3,))]), faces, end + vertex.nbytes)
    assert (face["n"] == 3).all() and end + vertex.nbytes + face.nbytes == len(data)
    return vertex, face["i"]


def obj_members(data: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def check_obj(data: bytes) -> tuple[int, int]:
    """The OBJ's material library and the material's texture resolve inside the archive; returns the
    counts of vertices and faces."""
    files = obj_members(data)
    obj = files["face.obj"].decode()
    (library,) = [line.split(None, 1)[1] for line in obj.splitlines() if line.startswith("mtllib")]
    mtl = files[library].decode()
    (texture,) = [line.split(None, 1)[1] for line in mtl.splitlines() if line.startswith("map_Kd")]
    assert Image.open(io.BytesIO(files[texture])).size[0] > 0
    lines = obj.splitlines()
    return sum(line.startswith("v ") for line in lines), sum(line.startswith("f ") for line in lines)


# --- the 3DMM -----------------------------------------------------------------------------------------------


def constructed_basis(
    vertices: np.ndarray, triangles: np.ndarray, rng: np.random.Generator | None = None
) -> face3d.Basis:
    """A basis on ``vertices`` with zero bases (or seeded random ones), mean texture 100..."""
    n = len(vertices)
    rng = rng or np.random.default_rng(0)
    t = torch.from_numpy
    return face3d.Basis(
        mean_shape=t(vertices.astype(np.float32)),
        id_base=t(rng.normal(0, 0.1, (3 * n, 80)).astype(np.float32)),
        exp_base=t(rng.normal(0, 0.1, (3 * n, 64)).astype(np.float32)),
        mean_tex=t(np.full((n, 3), 100.0, dtype=np.float32)),
        tex_base=t(rng.normal(0, 5, (3 * n, 80)).astype(np.float32)),
        triangles=t(triangles.astype(np.int64)),
        keypoints=t(np.zeros(68, dtype=np.int64)),
    )


SQUARE = np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
SQUARE_TRIANGLES = np.array([[0, 1, 3], [0, 3, 2]])  # counter-clockwise seen from +z


def test_coefficients_split_as_deep3dfacerecon() -> None:
    c = torch.arange(2 * 257, dtype=torch.float32).reshape(2, 257)
    parts = face3d.split_coefficients(c)
    assert [p.shape[1] for p in parts] == [80, 64, 80, 3, 27, 3]
    assert parts.id[0, 0] == 0 and parts.exp[0, 0] == 80 and parts.tex[0, 0] == 144
    assert parts.angle[0, 0] == 224 and parts.gamma[0, 0] == 227 and parts.trans[1, 2] == 257 + 256
    with pytest.raises(ValueError, match="257"):
        face3d.split_coefficients(torch.zeros(1, 256))


def test_known_coefficients_give_known_vertices() -> None:
    basis = constructed_basis(SQUARE, SQUARE_TRIANGLES)
    id_base, exp_base = torch.zeros(12, 80), torch.zeros(12, 64)
    id_base[2, 0] = 1.0  # id 0 lifts vertex 0 along z
    id_base[9, 5] = 0.5  # id 5 moves vertex 3 along x
    exp_base[4, 2] = 2.0  # exp 2 moves vertex 1 along y
    basis = face3d.Basis(basis.mean_shape, id_base, exp_base, basis.mean_tex, basis.tex_base, basis.triangles,
                         basis.keypoints)  # fmt: skip
    c = torch.zeros(1, 257)
    c[0, 0], c[0, 5], c[0, 80 + 2] = 0.3, -1.0, 0.25
    c[0, 224:227] = torch.tensor([0.0, math.pi / 2, 0.0])  # yaw 90°: (x, y, z) → (z, y, −x)
    c[0, 254:257] = torch.tensor([1.0, 2.0, 3.0])
    out = face3d.assemble(basis, c)
    shape = np.array([[0, 0, 0.3], [1, 0.5, 0], [0, 1, 0], [0.5, 1, 0]])
    expected = np.stack([shape[:, 2], shape[:, 1], -shape[:, 0]], 1) + np.array([1.0, 2.0, 3.0])
    np.testing.assert_allclose(out.vertices[0].numpy(), expected, atol=1e-6)
    # The perspective camera at distance 10, focal 1015, centre 112 (y up).
    z = 10.0 - expected[:, 2:3]
    np.testing.assert_allclose(out.projected[0].numpy(), 1015.0 * expected[:, :2] / z + 112.0, rtol=1e-6)


def test_assembly_matches_an_independent_numpy_model() -> None:
    """Random coefficients on a random basis against numpy (einsum) and scipy's extrinsic x-y-z rotation."""
    try:
        from scipy.spatial.transform import Rotation
    except (ImportError, AttributeError) as exc:  # AttributeError: a scipy built for numpy 2 under numpy 1.26
        pytest.skip(f"scipy is not usable here: {exc}")

    rng = np.random.default_rng(7)
    vertices = np.concatenate([SQUARE, SQUARE + np.array([0.0, 0.0, 0.5])])
    tris = np.concatenate([SQUARE_TRIANGLES, SQUARE_TRIANGLES + 4])
    basis = constructed_basis(vertices, tris, rng)
    c = rng.normal(0, 0.3, (3, 257)).astype(np.float32)
    out = face3d.assemble(basis, torch.from_numpy(c))
    b = {k: getattr(basis, k).numpy().astype(np.float64) for k in ("mean_shape", "id_base", "exp_base")}
    for f in range(3):
        shape = (b["mean_shape"].reshape(-1) + b["id_base"] @ c[f, :80] + b["exp_base"] @ c[f, 80:144]).reshape(-1, 3)
        rotation = Rotation.from_euler("xyz", c[f, 224:227]).as_matrix()  # extrinsic: Rz·Ry·Rx
        np.testing.assert_allclose(out.vertices[f].numpy(), shape @ rotation.T + c[f, 254:257], atol=2e-5)


def test_sh_lighting_is_deep3dfacerecons_formula() -> None:
    """A flat square (normals +z) turned by 90° about y (normals +x): band 0 with the 0.8 offset, band 3
    (−a1·c1·n_x) on red only: red = albedo·(0.8·a0·c0 − g·a1·c1), with a0·c0 = √π/2 and a1·c1 = √π."""
    basis = constructed_basis(SQUARE, SQUARE_TRIANGLES)
    c = torch.zeros(1, 257)
    c[0, 144] = 2.0  # tex 0
    c[0, 225] = math.pi / 2
    g = 0.1
    c[0, 227 + 3] = g
    out = face3d.assemble(basis, c)
    np.testing.assert_allclose(out.normals[0].numpy(), np.tile([1.0, 0.0, 0.0], (4, 1)), atol=1e-6)
    albedo = (100.0 + basis.tex_base[:, 0].reshape(-1, 3) * 2.0) / 255.0
    np.testing.assert_allclose(out.albedo[0].numpy(), albedo.numpy(), rtol=1e-5)
    light = np.array([0.8 * math.sqrt(math.pi) / 2 - g * math.sqrt(math.pi), 0.8 * math.sqrt(math.pi) / 2,
                      0.8 * math.sqrt(math.pi) / 2])  # fmt: skip
    np.testing.assert_allclose(out.colour[0].numpy(), albedo.numpy() * light, rtol=1e-5)


def test_rotation_and_euler_angles_invert_each_other() -> None:
    angles = torch.tensor([[0.1, -0.4, 0.3], [-0.5, 0.7, -1.2], [0.0, 0.0, 0.0]], dtype=torch.float64)
    rotation = face3d.rotation_matrix(angles)
    torch.testing.assert_close(face3d.euler_angles(rotation), angles)
    torch.testing.assert_close(rotation @ rotation.transpose(1, 2), torch.eye(3, dtype=torch.float64).expand(3, 3, 3))


# --- Deep3DFaceRecon's alignment ------------------------------------------------------------------------------


def reference_pos(xp: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, float]:
    """Deep3DFaceRecon's util/preprocess.py ``POS`` (the 2N×8 system through numpy.linalg.lstsq)."""
    npts = xp.shape[1]
    a = np.zeros([2 * npts, 8])
    a[0 : 2 * npts - 1 : 2, 0:3] = x.T
    a[0 : 2 * npts - 1 : 2, 3] = 1
    a[1 : 2 * npts : 2, 4:7] = x.T
    a[1 : 2 * npts : 2, 7] = 1
    b = np.reshape(xp.T, [2 * npts, 1])
    k, _, _, _ = np.linalg.lstsq(a, b, rcond=None)
    s = (np.linalg.norm(k[0:3]) + np.linalg.norm(k[4:7])) / 2
    return np.stack([k[3], k[7]], axis=0), s


def reference_align(image: np.ndarray, landmarks: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Deep3DFaceRecon's ``align_img`` on 5 landmarks (image rows flipped as its test.py does), PIL."""
    picture = Image.fromarray(image)
    w0, h0 = picture.size
    lm = landmarks.astype(np.float64).copy()
    lm[:, -1] = h0 - 1 - lm[:, -1]
    t, s = reference_pos(lm.T, face3d.LM3D_STD.T)
    s = 102.0 / s
    w, h = (w0 * s).astype(np.int32), (h0 * s).astype(np.int32)
    left = (w / 2 - 112 + ((t[0] - w0 / 2) * s).item()).astype(np.int32)
    up = (h / 2 - 112 + ((h0 / 2 - t[1]) * s).item()).astype(np.int32)
    crop = picture.resize((int(w), int(h)), resample=Image.BICUBIC).crop((left, up, left + 224, up + 224))
    return np.asarray(crop), (int(w), int(h), int(left), int(up))


def test_pos_fit_equals_the_least_squares_reference() -> None:
    rng = np.random.default_rng(11)
    landmarks = ASTRONAUT_LANDMARKS[None] + rng.normal(0, 4, (6, 5, 2)) + rng.normal(0, 80, (6, 1, 2))
    t, s = face3d.pos_fit(torch.from_numpy(landmarks))
    for face, tf, sf in zip(landmarks, t, s, strict=True):
        rt, rs = reference_pos(face.T, face3d.LM3D_STD.T)
        np.testing.assert_allclose(tf.numpy(), rt[:, 0], rtol=1e-10, atol=1e-9)
        assert float(sf) == pytest.approx(rs, rel=1e-12)


@pytest.mark.parametrize("scale", [1.0, 0.35, 2.5])
def test_align_crops_equal_deep3dfacerecons_align_img(scale: float) -> None:
    """The geometry (resized size, crop corner) exactly; the pixels to one level (PIL's fixed-point
    coefficients): at the astronaut's size (upscaling ×1.5), with the photo reduced (its face upscaled
    ×4.4) and enlarged (the resize reduces: PIL's stretched kernel)."""
    base = sample_array("astronaut")
    side = round(512 * scale)
    image = np.array(Image.fromarray(base).resize((side, side), Image.LANCZOS))
    landmarks = ASTRONAUT_LANDMARKS * (side / 512)
    crops, (alignment,) = face3d.align_crops(torch.from_numpy(image), torch.from_numpy(landmarks[None]))
    reference, geometry = reference_align(image, landmarks)
    assert (alignment.w, alignment.h, alignment.left, alignment.up) == geometry
    ours = (crops[0] * 255).round().permute(1, 2, 0).numpy()
    diff = np.abs(ours - reference.astype(np.float64))
    print(f"scale {scale}: align_img vs PIL, levels: {(diff > 0).mean():.2%} differ, max {diff.max():.0f}")
    assert crops.shape == (1, 3, 224, 224) and (diff > 0).mean() < 0.005 and diff.max() <= 1


def test_crop_coordinates_map_back_to_the_image() -> None:
    (alignment,) = face3d.alignments(torch.from_numpy(ASTRONAUT_LANDMARKS[None]), 512, 512)
    points = torch.from_numpy(ASTRONAUT_LANDMARKS)
    crop = alignment.image_to_crop(points)
    crop_up = torch.stack([crop[:, 0], 223 - crop[:, 1]], -1)
    torch.testing.assert_close(alignment.crop_to_image(crop_up), points)
    # The standard landmarks land near the crop's landmarks (the alignment's purpose): eyes ~63 px apart.
    assert 55 < float((crop[1] - crop[0]).norm()) < 72


# --- the reference regressor -----------------------------------------------------------------------------------


def test_the_reference_regressor_is_resnet50_with_deep3dfacerecons_heads(tmp_path: Path) -> None:
    full = build_reference("face_regressor", 64, 0)
    x = torch.rand(1, 3, 224, 224)
    flops = count_flops(full, x)
    print(f"face_regressor width 64: {flops / 1e9:.2f} GFLOP (2 per multiply-add) at 224x224")
    assert 8.0e9 < flops < 8.4e9  # ResNet-50: 4.1 G multiply-adds
    names = set(full.state_dict())
    assert {"backbone.conv1.weight", "backbone.layer4.2.bn3.running_var", "backbone.layer1.0.downsample.0.weight",
            "final_layers.0.weight", "final_layers.6.bias"} <= names  # fmt: skip
    backbone = sum(p.numel() for n, p in full.named_parameters() if n.startswith("backbone"))
    assert backbone == 23_508_032  # torchvision's resnet50 without its fc layer
    small = build_reference("face_regressor", 8, 0)
    with torch.inference_mode():
        out = small(torch.rand(2, 3, 224, 224))
    assert out.shape == (2, 257) and float(out.abs().max()) < 0.2  # untrained: near the mean face
    torch.save({"net_recon": small.state_dict()}, tmp_path / "epoch_20.pth")
    loaded = load_deep3d_checkpoint(build_reference("face_regressor", 8, 1), tmp_path / "epoch_20.pth")
    with torch.inference_mode():
        x2 = torch.rand(1, 3, 224, 224)
        torch.testing.assert_close(loaded(x2), small(x2))


# --- the basis ---------------------------------------------------------------------------------------------------


def test_the_synthetic_basis_has_bfms_layout_and_its_landmarks_sit_on_the_standard_ones() -> None:
    arrays = bfm.synthetic_basis()
    checked = bfm.check_basis(arrays)
    n = len(checked["mean_shape"])
    assert arrays["idBase"].shape == (3 * n, 80) and arrays["exBase"].shape == (3 * n, 64)
    assert arrays["texBase"].shape == (3 * n, 80) and arrays["meanshape"].shape == (1, 3 * n)
    assert arrays["tri"].min() == 1 and checked["triangles"].min() == 0 and checked["keypoints"].shape == (68,)
    mesh_swap.check_surface(checked["triangles"])  # a consistently oriented surface
    normals = face3d.vertex_normals(
        torch.from_numpy(checked["mean_shape"])[None], torch.from_numpy(checked["triangles"]).long()
    )
    assert float(normals[0, :, 2].mean()) > 0.5  # counter-clockwise from the front: normals face the camera
    shape = arrays["meanshape"].reshape(-1, 3)
    lm = shape[arrays["keypoints"].reshape(-1) - 1]
    index = np.array([31, 37, 40, 43, 46, 49, 55]) - 1  # Deep3DFaceRecon's extract_5p
    five = np.stack([lm[index[0]], lm[index[[1, 2]]].mean(0), lm[index[[3, 4]]].mean(0), lm[index[5]], lm[index[6]]])
    assert np.abs(five[[1, 2, 0, 3, 4]] - face3d.LM3D_STD).max() < 0.04  # decimetres
    basis = face3d.Basis.load(bfm.basis_asset(None))
    assert basis.synthetic and "SYNTHETIC" in basis.description and basis.vertices == n


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda a: a.update(idBase=a["idBase"][:, :79]), r"idBase has shape \[\d+, 79\], expected \[3N, 80\]"),
        (lambda a: a.update(exBase=a["exBase"][:-3]), r"exBase has shape .*expected \[3N, 64\]"),
        (lambda a: a.update(meantex=a["meantex"][:, :-1]), r"meantex has shape .*expected \[\d+\]"),
        (lambda a: a.update(tri=a["tri"] - 1), "tri indices run 0..*1-based"),
        (lambda a: a.update(keypoints=a["keypoints"][:, :5]), r"keypoints has shape \[1, 5\], expected \[68\]"),
        (lambda a: a.pop("texBase"), "missing texBase"),
        (lambda a: a.update(meanshape=a["meanshape"][:, :-1]), r"meanshape has \d+ values, expected \[3N\]"),
    ],
)
def test_a_basis_with_the_wrong_layout_is_refused_naming_the_array(change, message: str) -> None:  # type: ignore[no-untyped-def]
    arrays = bfm.synthetic_basis()
    change(arrays)
    with pytest.raises(ManifestError, match=message):
        bfm.check_basis(arrays, "basis")


def test_the_build_refuses_a_bad_basis_file_and_accepts_a_good_one(tmp_path: Path) -> None:
    from imgpipe.build.repository import build_repository

    arrays = bfm.synthetic_basis()
    good = dict(arrays)
    np.savez(tmp_path / "good.npz", **good)
    arrays["idBase"] = arrays["idBase"][:, :40]
    np.savez(tmp_path / "bad.npz", **arrays)
    data = manifest_data()
    data["pipelines"]["reconstruct_face"]["basis"] = "missing.npz"
    with pytest.raises(ManifestError, match=r"missing\.npz does not exist"):
        parse_manifest(data, tmp_path / "manifest.toml")
    data["pipelines"]["reconstruct_face"]["basis"] = "bad.npz"
    manifest = parse_manifest(data, tmp_path / "manifest.toml")
    with pytest.raises(ManifestError, match=r"idBase has shape \[\d+, 40\], expected \[3N, 80\]"):
        build_repository(manifest, tmp_path / "repo", models=["reconstruct_face"])
    data["pipelines"]["reconstruct_face"]["basis"] = "good.npz"
    build_repository(parse_manifest(data, tmp_path / "manifest.toml"), tmp_path / "repo", models=["reconstruct_face"])
    shipped = face3d.Basis.load(str(tmp_path / "repo" / "reconstruct_face" / "1" / "basis.npz"))
    assert not shipped.synthetic and shipped.description == "3DMM basis from good.npz"
    triangles = np.load(tmp_path / "repo" / "reconstruct_face" / "1" / "triangles.npy")
    assert triangles.shape == (MESH_TRIANGLES, 3)


def test_settings_and_the_regressor_contract_are_checked(tmp_path: Path) -> None:
    data = manifest_data()
    data["networks"]["face_regressor"]["outputs"][0]["shape"] = [256]
    with pytest.raises(ManifestError, match="Deep3DFaceRecon contract"):
        parse_manifest(data, tmp_path / "manifest.toml")
    assert contract_for(Settings(method="3dmm")).parse_parameters({})["method"] == "3dmm"  # the manifest's default
    assert "default 3dmm" in contract_for(Settings(method="3dmm")).config_parameters()["request_parameter.method"]
    data = manifest_data()
    data["pipelines"]["reconstruct_face"].update(method="3dmm", regressor="")
    with pytest.raises(ManifestError, match="regressor: required when method = '3dmm'"):
        parse_manifest(data, tmp_path / "manifest.toml")


# --- the face mesh: triangles, frame, pose ------------------------------------------------------------------------


def test_the_face_mesh_is_closed_at_the_eyes_and_mouth() -> None:
    triangles = face3d.face_mesh_triangles()
    assert triangles.shape == (MESH_TRIANGLES, 3) and len(np.unique(triangles)) == MESH_VERTICES
    (outline,) = mesh_swap.check_surface(triangles)  # one boundary: the face's outline
    assert len(outline) == 36
    assert (triangles[:852] == mesh_swap.mediapipe_triangles()).all()  # MediaPipe's own, then the closures


def constructed_mesh(angles: tuple[float, float, float], scale: float = 300.0) -> torch.Tensor:
    """[1,468,3] image-pixel points whose five landmarks are the standard 3D landmarks turned by
    ``angles`` (pitch, yaw, roll radians), in image pixels (y down, z smaller = nearer)."""
    rotation = face3d.rotation_matrix(torch.tensor([angles], dtype=torch.float64))[0]
    five = torch.from_numpy(np.array(face3d.LM3D_STD)) @ rotation.T * scale  # y up, z towards the camera
    image = five * torch.tensor([1.0, -1.0, -1.0], dtype=torch.float64) + torch.tensor([250.0, 200.0, 0.0])
    rng = np.random.default_rng(0)
    points = torch.from_numpy(rng.normal(0, 40, (MESH_VERTICES, 3))) + torch.tensor([250.0, 200.0, 0.0])
    for k, index in enumerate([face_mesh.LEFT_EYE, face_mesh.RIGHT_EYE, face_mesh.NOSE_TIP, face_mesh.MOUTH[0],
                               face_mesh.MOUTH[1]]):  # fmt: skip
        for i in index if isinstance(index, tuple) else (index,):
            points[i] = image[k]
    return points[None].to(torch.float32)


@pytest.mark.parametrize("angles", [(0.0, 0.0, 0.0), (0.2, -0.5, 0.1), (-0.3, 0.6, -0.25)])
def test_mesh_frame_and_head_pose_recover_constructed_angles(angles: tuple[float, float, float]) -> None:
    frame = face3d.mesh_frame(constructed_mesh(angles))
    five = face3d.mesh_five_points(frame.vertices)[0]
    eyes = float((five[1] - five[0]).norm())
    assert eyes == pytest.approx(face3d.INTER_OCULAR_M, rel=1e-5)  # metres between the eye centres
    assert float(frame.vertices[0].mean(0).abs().max()) < 1e-6  # centred
    if angles == (0.0, 0.0, 0.0):
        assert five[2, 2] > five[0, 2] and five[0, 1] > five[3, 1]  # nose in front of the eyes; eyes above mouth
    recovered = face3d.head_pose(frame.vertices)[0]
    np.testing.assert_allclose(recovered.numpy(), angles, atol=1e-5)


def test_face_selection() -> None:
    faces = mtcnn.Faces(
        torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 30.0, 30.0]]), torch.tensor([0.9, 0.8]), torch.zeros(2, 5, 2)
    )
    assert choose(faces, "all") == [0, 1] and choose(faces, "largest") == [1] and choose(faces, 1) == [1]
    with pytest.raises(InvalidInputError, match="only 2 face"):
        choose(faces, 2)
    with pytest.raises(InvalidInputError, match="no face found"):
        choose(mtcnn.Faces.none(), "all")


# --- files ---------------------------------------------------------------------------------------------------------


def small_mesh() -> face3d_io.FaceMesh:
    """The synthetic basis's mean face with a gradient texture."""
    checked = bfm.check_basis(bfm.synthetic_basis())
    vertices = checked["mean_shape"] * 0.1
    triangles = checked["triangles"].astype(np.int64)
    normals = face3d.vertex_normals(torch.from_numpy(vertices)[None], torch.from_numpy(triangles))[0].numpy()
    uv = (vertices[:, :2] - vertices[:, :2].min(0)) / np.ptp(vertices[:, :2], 0)
    texture = np.zeros((40, 60, 3), dtype=np.uint8)
    texture[..., 0] = np.linspace(0, 255, 60, dtype=np.uint8)
    texture[..., 1] = np.linspace(0, 255, 40, dtype=np.uint8)[:, None]
    colours = (uv[:, [0, 1, 0]] * 255).astype(np.uint8)
    return face3d_io.FaceMesh(vertices, triangles, normals, uv.astype(np.float32), texture, colours, "test mesh")


def test_glb_reads_back_with_our_parser_and_the_libraries_that_are_installed() -> None:
    mesh = small_mesh()
    data = face3d_io.to_glb(mesh)
    document, binary = parse_glb(data)
    primitive = document["meshes"][0]["primitives"][0]
    positions = glb_accessor(document, binary, primitive["attributes"]["POSITION"])
    indices = glb_accessor(document, binary, primitive["indices"]).reshape(-1, 3)
    texcoords = glb_accessor(document, binary, primitive["attributes"]["TEXCOORD_0"])
    np.testing.assert_array_equal(positions, mesh.vertices)
    np.testing.assert_array_equal(indices, mesh.triangles)
    np.testing.assert_allclose(texcoords, np.stack([mesh.uv[:, 0], 1 - mesh.uv[:, 1]], 1), atol=1e-7)  # glTF: v down
    accessor = document["accessors"][primitive["attributes"]["POSITION"]]
    np.testing.assert_allclose(accessor["min"], mesh.vertices.min(0), rtol=1e-6)
    assert np.array_equal(np.asarray(glb_texture(document, binary)), mesh.texture)
    import pygltflib  # independent readers (the dev extra)
    import trimesh

    loaded = trimesh.load(io.BytesIO(data), file_type="glb", force="mesh", process=False)
    assert loaded.vertices.shape == mesh.vertices.shape and loaded.faces.shape == mesh.triangles.shape
    np.testing.assert_allclose(loaded.vertices, mesh.vertices, atol=1e-6)
    np.testing.assert_allclose(loaded.visual.uv, mesh.uv, atol=1e-6)  # trimesh flips glTF's v back
    gltf = pygltflib.GLTF2.load_from_bytes(data)
    assert gltf.accessors[gltf.meshes[0].primitives[0].attributes.POSITION].count == len(mesh.vertices)


def test_obj_zip_resolves_its_material_and_texture_and_ply_reads_back(tmp_path: Path) -> None:
    mesh = small_mesh()
    data = face3d_io.to_obj_zip(mesh)
    assert check_obj(data) == (len(mesh.vertices), len(mesh.triangles))
    vertex, faces = parse_ply(face3d_io.to_ply(mesh))
    np.testing.assert_array_equal(np.stack([vertex["x"], vertex["y"], vertex["z"]], 1), mesh.vertices)
    np.testing.assert_array_equal(np.stack([vertex["red"], vertex["green"], vertex["blue"]], 1), mesh.colours)
    np.testing.assert_array_equal(faces, mesh.triangles)
    import trimesh

    folder = tmp_path / "obj"
    folder.mkdir()
    for name, content in obj_members(data).items():
        (folder / name).write_bytes(content)
    loaded = trimesh.load(folder / "face.obj", process=False, force="mesh")
    assert len(loaded.faces) == len(mesh.triangles)
    assert loaded.visual.material.image.size == (60, 40)  # the texture found through the MTL
    ply = trimesh.load(io.BytesIO(face3d_io.to_ply(mesh)), file_type="ply", process=False)
    np.testing.assert_array_equal(ply.visual.vertex_colors[:, :3], mesh.colours)


def test_a_bad_mesh_is_refused_before_writing() -> None:
    mesh = small_mesh()
    with pytest.raises(ValueError, match="uv"):
        face3d_io.FaceMesh(mesh.vertices, mesh.triangles, mesh.normals, mesh.uv[:-1], mesh.texture, mesh.colours)
    with pytest.raises(ValueError, match="unknown mesh format"):
        face3d_io.encode_mesh(mesh, "stl")


# --- the rasterizer ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_rasterizer_keeps_the_nearest_surface_and_interpolates(device: str) -> None:
    # Two squares over the same pixels; the second is nearer over its right half only (it is tilted).
    xy = torch.tensor([[2.0, 2.0], [12.0, 2.0], [2.0, 12.0], [12.0, 12.0]] * 2, device=device)
    depth = torch.tensor([0.0, 0.0, 0.0, 0.0, -1.0, 1.0, -1.0, 1.0], device=device)
    triangles = torch.tensor([[0, 1, 3], [0, 3, 2], [4, 5, 7], [4, 7, 6]], device=device)
    triangle, bary = face3d_render.rasterize(xy, depth, triangles, 16, 16)
    covered = triangle >= 0
    assert int(covered.sum()) == 11 * 11  # pixel centres 2..12 on both axes
    assert bool((triangle[:, 8:13][covered[:, 8:13]] >= 2).all())  # right: the tilted square (nearer)
    assert bool((triangle[:, 2:7][covered[:, 2:7]] < 2).all())  # left: the flat one
    point = (bary[7, 4, :, None] * xy[triangles[triangle[7, 4]]]).sum(0)  # barycentrics give the pixel back
    torch.testing.assert_close(point, torch.tensor([4.0, 7.0], device=device))
    mesh = small_mesh()
    view = face3d_render.render_view(
        torch.from_numpy(mesh.vertices).to(device), torch.from_numpy(mesh.normals).to(device),
        torch.from_numpy(mesh.triangles).to(device), 64, 45.0, colours=torch.from_numpy(mesh.colours).to(device),
    )  # fmt: skip
    background = (view == torch.tensor(face3d_render.BACKGROUND, dtype=torch.uint8, device=device)).all(-1)
    assert view.shape == (64, 64, 3) and 0.3 < float((~background).float().mean()) < 0.9


# --- CUDA ----------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (runs on the GPU machine)")
def test_the_maths_run_on_cuda_and_agree_with_the_cpu() -> None:
    packed = bfm.basis_asset(None)
    cpu, cuda = face3d.Basis.load(packed, "cpu"), face3d.Basis.load(packed, "cuda")
    c = torch.from_numpy(np.random.default_rng(3).normal(0, 0.3, (2, 257)).astype(np.float32))
    a, b = face3d.assemble(cpu, c), face3d.assemble(cuda, c.cuda())
    assert b.vertices.is_cuda
    for name in ("vertices", "normals", "colour", "projected"):
        torch.testing.assert_close(getattr(b, name).cpu(), getattr(a, name), atol=1e-3, rtol=1e-4)
    image = torch.from_numpy(sample_array("astronaut"))
    crops_cpu, geometry = face3d.align_crops(image, torch.from_numpy(ASTRONAUT_LANDMARKS[None]))
    crops_cuda, geometry_cuda = face3d.align_crops(image.cuda(), torch.from_numpy(ASTRONAUT_LANDMARKS[None]).cuda())
    assert crops_cuda.is_cuda
    assert [(g.w, g.h, g.left, g.up) for g in geometry] == [(g.w, g.h, g.left, g.up) for g in geometry_cuda]
    assert geometry[0].s == pytest.approx(geometry_cuda[0].s, rel=1e-12)
    assert float((crops_cuda.cpu() - crops_cpu).abs().max()) <= 1.5 / 255
    points = constructed_mesh((0.2, -0.5, 0.1))
    torch.testing.assert_close(
        face3d.head_pose(face3d.mesh_frame(points.cuda()).vertices).cpu(),
        face3d.head_pose(face3d.mesh_frame(points).vertices),
    )
    xy = (a.projected[0] * 0.5).cuda()
    texture = face3d.photo_texture(image.cuda(), xy, 64)
    assert texture.image.is_cuda and max(texture.image.shape[:2]) <= 64
    assert face3d.sample_colours(image.cuda(), xy).is_cuda


# --- the pipeline on the real server ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def photos() -> dict[str, bytes]:
    astronaut = sample_array("astronaut")
    face = astronaut[0:300, 100:350]
    return {
        "astronaut": encode(astronaut, "JPEG"),
        "face": encode(np.ascontiguousarray(face), "PNG"),
        "two": encode(np.concatenate([face, face[:, ::-1]], axis=1), "PNG"),
        "coffee": encode(sample_array("coffee"), "PNG"),
    }


def iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    w = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    return w * h / (a[2] * a[3] + b[2] * b[3] - w * h)


@pytest.mark.server
def test_served_astronaut_glb_has_the_nose_in_front_of_the_eyes(server, photos: dict[str, bytes]) -> None:  # type: ignore[no-untyped-def]
    with TritonClient(server.grpc_url, "grpc") as client:
        start = time.perf_counter()
        result = reconstruct_face(client, photos["astronaut"], fmt="glb", preview=True)
        seconds = time.perf_counter() - start  # the first request (the step warmed its kernels up at start)
    (face,) = result.faces
    print(f"astronaut, mesh method, GLB + preview, first request: {seconds * 1000:.0f} ms; GLB {len(face.mesh)} bytes;"
          f" preview {len(result.preview or b'')} bytes; pose (yaw, pitch, roll) {np.round(face.pose, 1)}")  # fmt: skip
    assert iou(face.box, ASTRONAUT_BOX) > 0.7
    document, binary = parse_glb(face.mesh)
    primitive = document["meshes"][0]["primitives"][0]
    vertices = glb_accessor(document, binary, primitive["attributes"]["POSITION"])
    indices = glb_accessor(document, binary, primitive["indices"])
    assert vertices.shape == (MESH_VERTICES, 3) and indices.size == 3 * MESH_TRIANGLES
    five = face3d.mesh_five_points(torch.from_numpy(vertices.copy())[None])[0].numpy()
    eyes, nose = five[:2], five[2]
    assert nose[2] > eyes[:, 2].max() + 0.01  # the camera looks along −z: the nose tip is nearer than the eyes
    assert eyes[:, 1].min() > nose[1] > five[3:, 1].max()  # y up: eyes above the nose above the mouth
    assert np.linalg.norm(eyes[1] - eyes[0]) == pytest.approx(0.063, rel=1e-4)
    assert abs(face.pose[0]) < 15 and abs(face.pose[1]) < 30 and abs(face.pose[2]) < 10
    yaw, pitch, roll, scale, cx, _cy = face.coefficients
    assert (yaw, pitch, roll) == pytest.approx(face.pose, abs=1e-4)
    assert 500 < scale < 900 and ASTRONAUT_BOX[0] < cx < ASTRONAUT_BOX[0] + ASTRONAUT_BOX[2]  # 43 px eyes / 0.063 m
    assert glb_texture(document, binary).size[0] > 50
    import trimesh

    loaded = trimesh.load(io.BytesIO(face.mesh), file_type="glb", force="mesh", process=False)
    assert loaded.vertices.shape == (MESH_VERTICES, 3) and loaded.faces.shape == (MESH_TRIANGLES, 3)
    preview = Image.open(io.BytesIO(result.preview or b""))
    assert preview.size[1] == 256 and preview.size[0] == 256 + 2 * 256  # the 512² input at 256, two views


@pytest.mark.server
def test_served_3dmm_obj_and_ply_and_face_choice(client: TritonClient, photos: dict[str, bytes]) -> None:
    result = reconstruct_face(client, photos["face"], fmt="obj", method="3dmm")
    (face,) = result.faces
    vertices, _faces = check_obj(face.mesh)
    n = len(bfm.check_basis(bfm.synthetic_basis())["mean_shape"])
    assert vertices == n and len(face.coefficients) == 257
    assert max(abs(v) for v in face.coefficients) < 0.2  # the untrained reference regressor: near zero
    two = reconstruct_face(client, photos["two"], fmt="ply")
    assert len(two.faces) == 2
    vertex, triangles = parse_ply(two.faces[0].mesh)
    assert len(vertex) == MESH_VERTICES and len(triangles) == MESH_TRIANGLES
    assert {round(f.pose[2] > 0) for f in two.faces} == {0, 1}  # mirror images: opposite rolls
    right = reconstruct_face(client, photos["two"], fmt="glb", faces=1)
    (chosen,) = right.faces
    assert chosen.box == pytest.approx(two.faces[1].box, abs=0.01)
    largest = reconstruct_face(client, photos["two"], fmt="ply", faces="largest")
    assert len(largest.faces) == 1


@pytest.mark.server
@pytest.mark.parametrize(
    ("photo", "parameters", "message"),
    [
        ("coffee", {}, "no face found"),
        ("face", {"fmt": "stl"}, "must be glb, obj or ply"),
        ("face", {"method": "nerf"}, "must be mesh or 3dmm"),
        ("face", {"faces": 3}, "only 1 face"),
    ],
)
def test_bad_requests_are_invalid_argument_and_the_server_keeps_serving(
    client: TritonClient, photos: dict[str, bytes], photo: str, parameters: dict, message: str
) -> None:
    with pytest.raises(InferenceError) as caught:
        reconstruct_face(client, photos[photo], **parameters)
    assert caught.value.is_invalid_argument and message in caught.value.message
    assert len(reconstruct_face(client, photos["face"], fmt="ply").faces) == 1


@pytest.mark.server
def test_reconstruct_command_writes_the_files(server, photos: dict[str, bytes], tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    images = []
    for name in ("face", "two"):
        path = tmp_path / f"{name}.png"
        path.write_bytes(photos[name])
        images.append(path)
    out = tmp_path / "out"
    code = reconstruct_main(images, out, fmt="obj", preview=True, url=server.grpc_url)
    assert code == 0
    for stem, count in (("face", 1), ("two", 2)):
        summary = json.loads((out / f"{stem}.json").read_text())
        assert len(summary["faces"]) == count and (out / f"{stem}_preview.png").is_file()
        for i in range(count):
            assert sorted(p.name for p in (out / f"{stem}_face{i}").iterdir()) == ["face.mtl", "face.obj", "face.png"]
    assert reconstruct_main(images, out, fmt="stl", url=server.grpc_url) == 1
