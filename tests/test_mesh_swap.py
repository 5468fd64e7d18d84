"""The mesh face swap's maths (:mod:`imgpipe.ensembles.mesh_swap`): MediaPipe's triangulation derived
from its edges, the piecewise-affine warp, the Lab colour transfer, the feathered mask and the blend.

Realistic meshes come from MediaPipe's own ``face_landmark.tflite`` run by the LiteRT interpreter on
the astronaut's face (crop 1.5× her face box, 192×192, input in [0, 1]); other meshes are known
transforms of that one. CPU, well under a second or two in all; one test also runs on CUDA."""

from __future__ import annotations

import importlib.util
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from imgpipe.ensembles import face_geometry as geo
from imgpipe.ensembles import mesh_swap as ms
from imgpipe.samples import sample_array

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")),
]
FACE_BOX = (182, 61, 86, 111)  # the astronaut's face, x, y, w, h


def _mediapipe_file(inner: str) -> Path:
    spec = importlib.util.find_spec("mediapipe")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the mediapipe wheel (mediapipe==0.10.21, --no-deps) is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / inner
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    return path


@pytest.fixture(scope="module")
def triangles() -> np.ndarray:
    _mediapipe_file(ms.CONNECTIONS_FILE)
    return ms.mediapipe_triangles()


@pytest.fixture(scope="module")
def astronaut() -> torch.Tensor:
    return torch.from_numpy(sample_array("astronaut").copy()).permute(2, 0, 1).float()


@pytest.fixture(scope="module")
def mesh() -> torch.Tensor:
    """The astronaut's 468 mesh points (x, y) in image pixels, pixel centres at integers: [468,2] float64."""
    litert = pytest.importorskip("ai_edge_litert.interpreter", reason="ai-edge-litert (the TFLite interpreter)")
    path = _mediapipe_file("modules/face_landmark/face_landmark.tflite")
    x, y, w, h = FACE_BOX
    side = 1.5 * max(w, h)
    box = (x + w / 2 - side / 2, y + h / 2 - side / 2, x + w / 2 + side / 2, y + h / 2 + side / 2)
    crop = Image.fromarray(sample_array("astronaut")).resize((192, 192), Image.BILINEAR, box=box)
    interpreter = litert.Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], np.asarray(crop, np.float32)[None] / 255.0)
    interpreter.invoke()
    outputs = {d["name"]: interpreter.get_tensor(d["index"]) for d in interpreter.get_output_details()}
    assert outputs["conv2d_31"].item() > 5, "the network sees a face"
    points = outputs["conv2d_21"].reshape(468, 3)[:, :2].astype(np.float64)
    # MediaPipe's crop pixel i spans [i, i+1]: minus 0.5 for pixel centres at integers.
    return torch.from_numpy(points * (side / 192) + np.array(box[:2]) - 0.5)


def _affine(points: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    return points @ matrix[:, :2].T + matrix[:, 2]


def _rotation(angle_deg: float, scale: float, centre: tuple[float, float], to: tuple[float, float]) -> torch.Tensor:
    """The 2×3 matrix rotating and scaling about ``centre`` and moving it to ``to`` (float64)."""
    a = math.radians(angle_deg)
    c, s = scale * math.cos(a), scale * math.sin(a)
    return torch.tensor(
        [[c, -s, to[0] - c * centre[0] + s * centre[1]], [s, c, to[1] - s * centre[0] - c * centre[1]]],
        dtype=torch.float64,
    )


def _close(got: torch.Tensor, want: torch.Tensor, atol: float) -> None:
    """Within ``atol`` everywhere (torch.testing.assert_close would import torch.distributed: seconds)."""
    error = float((got - want).abs().max())
    assert error <= atol, f"max abs error {error:.3g} > {atol}"


def _outline_region(points: torch.Tensor, triangles: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The pixels inside the mesh's outline (its first boundary loop), drawn by PIL and grown by one
    pixel (PIL's and our edge conventions differ by at most that): [H,W] bool."""
    outline = ms.boundary_loops(triangles)[0]
    image = Image.new("1", (shape[1], shape[0]))
    ImageDraw.Draw(image).polygon([tuple(p) for p in points[outline].tolist()], fill=1, outline=1)
    region = torch.from_numpy(np.array(image)).float()[None, None]
    return (torch.nn.functional.max_pool2d(region, 3, stride=1, padding=1)[0, 0] > 0).numpy()


# -- the triangulation ------------------------------------------------------------------------------


def test_mediapipe_triangulation_is_a_disc_with_three_holes(triangles: np.ndarray) -> None:
    edges = ms.connections("FACEMESH_TESSELATION")
    assert len(set(edges)) == 2556
    assert triangles.shape == (852, 3) and triangles.dtype == np.int32
    assert set(np.unique(triangles).tolist()) == set(range(ms.MESH_POINTS))
    undirected = {(min(a, b), max(a, b)) for a, b in edges}
    half = np.concatenate([triangles[:, [0, 1]], triangles[:, [1, 2]], triangles[:, [2, 0]]]).tolist()
    # Every edge of the tessellation is a triangle's, each directed edge once (a consistent orientation).
    assert {(min(a, b), max(a, b)) for a, b in half} == undirected and len(undirected) == 1322
    assert len({tuple(e) for e in half}) == len(half)
    sides = Counter((min(a, b), max(a, b)) for a, b in half)
    assert Counter(sides.values()) == {1: 88, 2: 1234}  # boundary edges border 1 triangle, interior 2
    loops = ms.check_surface(triangles)
    assert [len(loop) for loop in loops] == [36, 20, 16, 16]
    assert ms.MESH_POINTS - len(undirected) + len(triangles) == 2 - len(loops) == -2  # Euler, genus 0
    # The loops are the face's outline, the inner lips and the two eyes of MediaPipe's own contours.
    contour = {name: {v for e in ms.connections(name) for v in e} for name in
               ("FACEMESH_FACE_OVAL", "FACEMESH_LIPS", "FACEMESH_RIGHT_EYE", "FACEMESH_LEFT_EYE")}  # fmt: skip
    assert set(loops[0].tolist()) == contour["FACEMESH_FACE_OVAL"]
    assert sorted(max(contour, key=lambda n: len(set(loop.tolist()) & contour[n])) for loop in loops[1:]) == [
        "FACEMESH_LEFT_EYE", "FACEMESH_LIPS", "FACEMESH_RIGHT_EYE"]  # fmt: skip


def test_mediapipe_triangulation_drops_the_separating_cliques(triangles: np.ndarray) -> None:
    edges = ms.connections("FACEMESH_TESSELATION")
    neighbours: dict[int, set[int]] = {}
    for a, b in edges:
        neighbours.setdefault(a, set()).add(b)
        neighbours.setdefault(b, set()).add(a)
    cliques = {tuple(sorted((a, b, c))) for a, b in edges for c in neighbours[a] & neighbours[b]}
    faces = {tuple(sorted(t)) for t in triangles.tolist()}
    assert len(cliques) == 854 and faces < cliques
    assert sorted(cliques - faces) == [(49, 64, 129), (279, 294, 358)]  # mirror images across the nose
    # An independent witness: the file writes each triangle as its three directed edges in a row, in
    # the winding the derivation adopted.
    written = [tuple(a for a, _ in edges[i : i + 3]) for i in range(0, len(edges), 3)]
    assert all(edges[i][1] == edges[i + 1][0] for i in range(0, len(edges), 3))
    rotated = {t[t.index(min(t)) :] + t[: t.index(min(t))] for t in written}
    assert rotated == {tuple(t) for t in triangles.tolist()}


def test_mediapipe_winding_on_a_real_face(triangles: np.ndarray, mesh: torch.Tensor) -> None:
    v = mesh.numpy()[triangles]
    ab, ac = v[:, 1] - v[:, 0], v[:, 2] - v[:, 0]
    cross = ab[:, 0] * ac[:, 1] - ab[:, 1] * ac[:, 0]
    assert (cross < 0).mean() > 0.95  # as documented; the rest are small folds (lips, nose wings, cheeks' edges)
    assert np.abs(cross[cross > 0]).sum() < 0.01 * np.abs(cross).sum()


def _grid_edges(n: int, skip: tuple[int, int] | None = None) -> list[tuple[int, int]]:
    """Edges of an n×n grid of points, each square cut by its '\\' diagonal (that of square ``skip`` left out)."""
    edges = []
    for r in range(n):
        for c in range(n):
            i = r * n + c
            if c + 1 < n:
                edges.append((i, i + 1))
            if r + 1 < n:
                edges.append((i, i + n))
            if r + 1 < n and c + 1 < n and (r, c) != skip:
                edges.append((i, i + n + 1))
    return edges


def test_triangles_from_edges_on_synthetic_surfaces() -> None:
    rng = np.random.default_rng(0)
    # A 3×3 grid: 8 triangles, a disc.
    disc = ms.triangles_from_edges(_grid_edges(3))
    assert len(disc) == 8 and [len(loop) for loop in ms.check_surface(disc)] == [8]
    # A vertex (9) inside triangle (0, 4, 3): that triangle becomes a separating 3-cycle, its three parts faces.
    subdivided = ms.triangles_from_edges([*_grid_edges(3), (9, 0), (9, 4), (9, 3)])
    faces = {tuple(sorted(t)) for t in subdivided.tolist()}
    assert len(subdivided) == 10 and (0, 3, 4) not in faces and {(0, 3, 9), (0, 4, 9), (3, 4, 9)} <= faces
    # A 4×4 grid without the middle square's diagonal: a square hole, two boundary loops.
    holed = ms.triangles_from_edges(_grid_edges(4, skip=(1, 1)))
    assert len(holed) == 16 and [len(loop) for loop in ms.check_surface(holed)] == [12, 4]
    # Edges in random directions: still consistently oriented, and the same faces.
    shuffled = [(b, a) if rng.random() < 0.5 else (a, b) for a, b in _grid_edges(4, skip=(1, 1))]
    again = ms.triangles_from_edges(shuffled)
    assert {tuple(sorted(t)) for t in again.tolist()} == {tuple(sorted(t)) for t in holed.tolist()}
    ms.check_surface(again)
    # The global sense follows the directed pairs: reversed pairs give every triangle reversed.
    written = [(int(a), int(b)) for t in holed.tolist() for a, b in ((t[0], t[1]), (t[1], t[2]), (t[2], t[0]))]
    reversed_ = ms.triangles_from_edges([(b, a) for a, b in written])
    assert {(a, c, b) for a, b, c in holed.tolist()} == {
        t[t.index(min(t)) :] + t[: t.index(min(t))] for t in (tuple(r) for r in reversed_.tolist())
    }


def test_triangles_from_edges_refuses_what_is_not_a_surface() -> None:
    with pytest.raises(ValueError, match="not connected"):
        ms.triangles_from_edges([(0, 1), (1, 2), (2, 0), (3, 4), (4, 5), (5, 3)])
    with pytest.raises(ValueError):  # three triangles on one edge (a book of three pages)
        ms.triangles_from_edges([(0, 1), (0, 2), (1, 2), (0, 3), (1, 3), (0, 4), (1, 4)])
    with pytest.raises(ValueError, match="not consistently oriented"):
        ms.check_surface(np.array([[0, 1, 2], [0, 1, 3]]))


# -- the warp ---------------------------------------------------------------------------------------


def test_warp_onto_its_own_mesh_reproduces_the_image(astronaut, mesh, triangles) -> None:  # type: ignore[no-untyped-def]
    warped = ms.warp_mesh(astronaut, mesh, mesh, triangles, 512, 512)
    x0, y0, x1, y1 = ms.mesh_box(mesh, 512, 512)
    assert (warped.x0, warped.y0) == (x0, y0) and warped.image.shape == (3, y1 - y0, x1 - x0)  # only the face's box
    covered = warped.triangle >= 0
    assert 7000 < covered.sum() < 9000  # the face, less its eyes and mouth
    error = (warped.image - astronaut[:, y0:y1, x0:x1]).abs()[:, covered]
    assert error.max() < 0.01, error.max()
    # The holes are not covered: the eyes' and the mouth's centres.
    for loop in ms.boundary_loops(triangles)[1:]:
        cx, cy = mesh[torch.as_tensor(loop, dtype=torch.long)].mean(0).round().long().tolist()
        assert warped.triangle[cy - y0, cx - x0] == -1


@pytest.mark.parametrize("device", DEVICES)
def test_affine_mesh_warps_as_the_affine_map(astronaut, mesh, triangles, device: str) -> None:  # type: ignore[no-untyped-def]
    # Target = source mesh through an affine map with shear: the piecewise map is that one map everywhere.
    matrix = torch.tensor([[1.3, 0.25, -40.0], [-0.2, 1.15, 30.0]], dtype=torch.float64)
    target = _affine(mesh, matrix)
    warped = ms.warp_mesh(astronaut.to(device), mesh.to(device), target.to(device), triangles, 512, 512)
    assert warped.image.device.type == device
    height, width = warped.triangle.shape
    window = torch.cat([torch.eye(2, dtype=torch.float64), -torch.tensor([[warped.x0], [warped.y0]])], 1)
    image_to_window = window @ torch.cat([matrix, torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)])
    reference = geo.warp(astronaut, image_to_window, max(height, width))[:, :height, :width]
    covered = (warped.triangle >= 0).cpu()
    error = (warped.image.cpu() - reference).abs()[:, covered]
    assert covered.sum() > 10000 and error.max() < 0.02, error.max()


def test_piecewise_affine_warp_interpolates_through_each_triangle(mesh, triangles) -> None:  # type: ignore[no-untyped-def]
    """A non-rigid mesh (smooth random displacements) on a linear ramp: bilinear sampling reproduces a
    ramp exactly, so each pixel must hold Σ λ_i ramp(s_i) for its triangle, checked in float64 numpy;
    and every pixel inside some triangle must be covered, every covered one inside its triangle."""
    rng = np.random.default_rng(1)
    source_points = mesh * 1.7 + torch.tensor([-150.0, -60.0], dtype=torch.float64)
    phase = rng.uniform(0, 2 * np.pi, 4)
    p = mesh.numpy()
    dx = 4 * np.sin(p[:, 1] / 13 + phase[0]) + 3 * np.cos(p[:, 0] / 17 + phase[1])
    dy = 4 * np.sin(p[:, 0] / 11 + phase[2]) + 3 * np.cos(p[:, 1] / 19 + phase[3])
    target_points = mesh + torch.from_numpy(np.stack([dx, dy], 1))
    ys, xs = torch.meshgrid(torch.arange(300.0), torch.arange(320.0), indexing="ij")
    ramp = torch.stack([0.3 * xs + 0.1 * ys, 0.2 * ys - 0.05 * xs + 40, 0.1 * xs + 0.1 * ys + 5])
    warped = ms.warp_mesh(ramp, source_points, target_points, triangles, 512, 512, chunk=4096)
    triangle = warped.triangle.numpy()
    wy, wx = np.nonzero(triangle >= 0)
    px, py = wx + warped.x0, wy + warped.y0
    corners = target_points.numpy()[triangles]  # [T,3,2]
    lam = _barycentric(corners[triangle[wy, wx]], px, py)
    assert lam.min() > -1e-6  # every covered pixel is inside its triangle
    src = source_points.numpy()[triangles][triangle[wy, wx]]  # [N,3,2]
    s = np.einsum("ni,nij->nj", lam, src)
    sx, sy = s[:, 0], s[:, 1]
    expected = np.stack([0.3 * sx + 0.1 * sy, 0.2 * sy - 0.05 * sx + 40, 0.1 * sx + 0.1 * sy + 5])
    assert np.abs(warped.image.numpy()[:, wy, wx] - expected).max() < 2e-3
    # Uncovered pixels are in no triangle (brute force over all triangles).
    uy, ux = np.nonzero(triangle < 0)
    inside = np.zeros(len(uy), bool)
    for start in range(0, len(triangles), 128):
        block = corners[start : start + 128]
        blocks = np.broadcast_to(block[None], (len(uy), *block.shape))
        lam = _barycentric(blocks, ux + warped.x0, uy + warped.y0, axis=1)
        inside |= (lam.min(-1) > 1e-6).any(-1)
    assert not inside.any()
    # Chunks make no difference.
    whole = ms.warp_mesh(ramp, source_points, target_points, triangles, 512, 512)
    assert torch.equal(whole.triangle, warped.triangle) and torch.equal(whole.image, warped.image)


def _barycentric(corners: np.ndarray, px: np.ndarray, py: np.ndarray, axis: int = 0) -> np.ndarray:
    """Barycentric coordinates of pixels (px, py) in triangles ``corners`` [..., 3, 2]: [..., 3]."""
    shape = (-1,) + (1,) * axis if axis else (-1,)
    p = np.stack([px.reshape(shape), py.reshape(shape)], -1).astype(np.float64)
    a, b, c = corners[..., 0, :], corners[..., 1, :], corners[..., 2, :]

    def cross(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        return u[..., 0] * v[..., 1] - u[..., 1] * v[..., 0]

    area = cross(b - a, c - a)
    return np.stack([cross(c - b, p - b), cross(a - c, p - c), cross(b - a, p - a)], -1) / area[..., None]


def test_a_fold_shows_the_front_facing_triangle() -> None:
    """Where the mesh folds over itself (a head turning away), the triangle facing like most of the
    mesh is drawn, whichever index it has."""
    points = torch.tensor([[0, 0], [40, 0], [0, 40], [40, 40], [10, 10]], dtype=torch.float64) + 5
    front = [[0, 2, 1], [1, 2, 3]]  # the mesh's majority sense
    back = [4, 1, 2]  # the other sense, over part of both
    source = torch.stack([torch.full((60, 60), 10.0), torch.zeros(60, 60), torch.zeros(60, 60)])
    for triangles in ([*front, back], [back, *front]):
        warped = ms.warp_mesh(source, points, points, torch.tensor(triangles), 60, 60)
        expected_back = triangles.index(back)
        assert not (warped.triangle == expected_back).any()
        assert (warped.triangle >= 0).sum() == 41 * 41


# -- colour, mask, blend -----------------------------------------------------------------------------


def test_match_colour_moves_the_lab_statistics_to_the_reference() -> None:
    generator = torch.Generator().manual_seed(0)
    ys, xs = torch.meshgrid(torch.arange(64.0), torch.arange(80.0), indexing="ij")
    base = torch.stack([xs * 1.2 + 40, ys * 0.8 + 60, 100 + 20 * torch.sin(xs / 7)])
    image = base * torch.tensor([0.6, 1.1, 0.9])[:, None, None] + 10 + 8 * torch.rand(3, 64, 80, generator=generator)
    reference = torch.stack([ys * 0.9 + 110, xs * 0.5 + 80, 70 + 10 * torch.cos(ys / 5)])
    region = torch.zeros(64, 80, dtype=torch.bool)
    region[8:56, 10:70] = True
    reference_outside = reference.clone()
    reference_outside[:, ~region] = 255.0  # pixels outside the region do not count
    matched = ms.match_colour(image, reference_outside, region)
    lab_m, lab_r, lab_i = (ms.rgb_to_lab(x)[:, region] for x in (matched, reference, image))
    assert (lab_i.mean(1) - lab_r.mean(1)).abs().max() > 10  # far apart before
    _close(lab_m.mean(1), lab_r.mean(1), 0.3)
    _close(lab_m.std(1), lab_r.std(1), 0.3)
    assert matched.min() >= 0 and matched.max() <= 255


def test_lab_round_trip() -> None:
    rgb = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(2)) * 255
    _close(ms.lab_to_rgb(ms.rgb_to_lab(rgb)), rgb, 2e-3)
    white = ms.rgb_to_lab(torch.full((3, 1), 255.0))
    _close(white[:, 0], torch.tensor([100.0, 0.0, 0.0]), 1e-3)


def test_feathered_mask_is_zero_outside_the_region_and_one_deep_inside() -> None:
    region = torch.zeros(100, 120, dtype=torch.bool)
    region[20:80, 10:110] = True
    region[40:50, 50:60] = False  # a hole
    mask = ms.feathered_mask(region, sigma=3.0)  # reach R = 9
    outside = (~region).float()[None, None]

    def near(reach: int) -> torch.Tensor:  # within `reach` pixels of the outside (a square's reach)
        return torch.nn.functional.max_pool2d(outside, 2 * reach + 1, stride=1, padding=reach)[0, 0] > 0

    assert (mask[~region] == 0).all()  # exactly, also at the holes
    assert (mask[~near(9)] > 0).all()  # the eroded region and its blur
    assert (mask[~near(18)] > 0.999).all()  # fully on 2R in
    assert mask[20 + 9, 30] == pytest.approx(0.5, abs=0.1)  # about half at the eroded edge


@pytest.fixture(scope="module")
def painted(astronaut, mesh):  # type: ignore[no-untyped-def]
    """A source of the same face, rotated 20°, scaled 1.3, tinted green and painted with dark stripes
    (its mesh: the target's through the same map), and the stripes' mask in the source."""
    matrix = _rotation(20, 1.3, (225.0, 116.0), (300.0, 300.0))
    paint = torch.zeros(1, 512, 512)
    for k in range(4):
        paint[:, :, 185 + 24 * k : 197 + 24 * k] = 1.0
    paint[:, :60] = 0
    stripes = geo.warp(paint, matrix, 600)[0]  # geo.warp takes image → crop matrices: here image → source
    image = geo.warp(astronaut, matrix, 600)
    image = image * torch.tensor([0.7, 1.1, 0.75])[:, None, None]
    image = image * (1 - stripes) + torch.tensor([30.0, 40.0, 140.0])[:, None, None] * stripes
    return image.clamp(0, 255), _affine(mesh, matrix), stripes


@pytest.mark.parametrize("device", DEVICES)
def test_swap_leaves_everything_outside_the_outline_bit_identical(  # type: ignore[no-untyped-def]
    astronaut, mesh, triangles, painted, device: str
) -> None:
    source, source_points, _ = painted
    target = astronaut.to(device)
    out = ms.swap_face_mesh(target, mesh.to(device), source.to(device), source_points.to(device), triangles)
    assert out.device.type == device and out.shape == target.shape and out.dtype == target.dtype
    out, target = out.cpu(), target.cpu()
    outside = torch.from_numpy(~_outline_region(mesh, triangles, (512, 512)))
    assert torch.equal(out[:, outside], target[:, outside])
    assert torch.equal(out.round().byte()[:, outside], target.round().byte()[:, outside])
    changed = (out != target).any(0)
    assert changed.sum() > 5000  # the face did change
    assert (out >= 0).all() and (out <= 255).all()


def test_swap_of_a_face_leaving_the_frame(astronaut, mesh, triangles, painted) -> None:  # type: ignore[no-untyped-def]
    source, source_points, _ = painted
    target = astronaut[:, :, 200:]  # the face's left part is cut off
    points = mesh - torch.tensor([200.0, 0.0], dtype=torch.float64)
    out = ms.swap_face_mesh(target, points, source, source_points, triangles)
    assert out.shape == target.shape
    outside = torch.from_numpy(~_outline_region(mesh, triangles, (512, 512))[:, 200:])
    assert torch.equal(out[:, outside], target[:, outside])
    # As in a larger frame: the same α (the feather sees the outline past the edge), not faded at the edge.
    whole = ms.swap_face_mesh(astronaut, mesh, source, source_points, triangles, colour=False)
    cut = ms.swap_face_mesh(target, points, source, source_points, triangles, colour=False)
    difference = (cut - whole[:, :, 200:]).abs()
    assert difference.max() < 0.05, difference.max()
    assert (cut[:, :, :3] != target[:, :, :3]).any(0).sum() > 100
    gone = ms.swap_face_mesh(target, points - 1000, source, source_points, triangles)
    assert torch.equal(gone, target)  # a face wholly outside the frame changes nothing


def test_swap_in_place(astronaut, mesh, triangles, painted) -> None:  # type: ignore[no-untyped-def]
    source, source_points, _ = painted
    copy = ms.swap_face_mesh(astronaut, mesh, source, source_points, triangles)
    frame = astronaut.clone()
    out = ms.swap_face_mesh(frame, mesh, source, source_points, triangles, inplace=True)
    assert out is frame and torch.equal(frame, copy)


def test_swap_brings_the_source_face_and_the_target_colour(astronaut, mesh, triangles, painted) -> None:  # type: ignore[no-untyped-def]
    source, source_points, stripes = painted
    # The stripes' mask carried onto the target face, and the inner face (where α is 1).
    carried = ms.warp_mesh(stripes[None], source_points, mesh, triangles, 512, 512)
    x0, y0 = carried.x0, carried.y0
    height, width = carried.triangle.shape
    plain = ms.swap_face_mesh(astronaut, mesh, source, source_points, triangles, colour=False)
    matched = ms.swap_face_mesh(astronaut, mesh, source, source_points, triangles)
    inner = torch.zeros(512, 512, dtype=torch.bool)
    inner[y0 : y0 + height, x0 : x0 + width] = torch.from_numpy(
        ms.feathered_mask(carried.triangle >= 0, 1.5).numpy() > 0.99  # well inside the face
    )
    on = torch.zeros_like(inner)
    on[y0 : y0 + height, x0 : x0 + width] = carried.image[0] > 0.95
    on &= inner
    off = inner & ~torch.nn.functional.max_pool2d(on.float()[None, None], 5, 1, 2)[0, 0].bool()
    assert on.sum() > 500 and off.sum() > 500, (on.sum(), off.sum())

    def contrast(image: torch.Tensor) -> float:  # luminance off the stripes minus on them
        luma = image.mul(torch.tensor([0.299, 0.587, 0.114])[:, None, None]).sum(0)
        return float(luma[off].mean() - luma[on].mean())

    assert abs(contrast(astronaut)) < 10  # no stripes on the target
    assert contrast(plain) > 80 and contrast(matched) > 50  # the source's stripes, both ways
    # Without colour matching the face takes the source's tint; with it, the target's colour.
    face = inner & ~on
    mean = {name: img[:, face].mean(1) for name, img in (("target", astronaut), ("plain", plain), ("matched", matched))}
    assert mean["plain"][1] - mean["plain"][0] > 0  # greener than red: the source's tint
    assert mean["target"][0] - mean["target"][1] > 20  # skin: redder than green
    assert mean["matched"][0] - mean["matched"][1] > 10
    lab_t, lab_m, lab_p = (ms.rgb_to_lab(image[:, inner]).mean(1) for image in (astronaut, matched, plain))
    assert (lab_m - lab_t).norm() < 0.5 * (lab_p - lab_t).norm()


def test_fill_holes_takes_the_eyes_from_the_source(astronaut, mesh, triangles) -> None:  # type: ignore[no-untyped-def]
    source = torch.zeros_like(astronaut)  # a black source: where it is used, the result darkens
    kept = ms.swap_face_mesh(astronaut, mesh, source, mesh, triangles, colour=False)
    filled = ms.swap_face_mesh(astronaut, mesh, source, mesh, triangles, colour=False, fill_holes=True)
    for loop in ms.boundary_loops(triangles)[1:]:
        cx, cy = mesh[torch.as_tensor(loop, dtype=torch.long)].mean(0).round().long().tolist()
        assert torch.equal(kept[:, cy, cx], astronaut[:, cy, cx])  # the target's eye / mouth
        assert filled[:, cy, cx].max() < 1.0  # the source's
