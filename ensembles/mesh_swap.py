"""Face swap on MediaPipe's 468-point face mesh: a piecewise-affine warp, colour transfer and a feathered blend.

The source face is warped onto the target's mesh triangle by triangle (each triangle of the target is
filled by the affine map that takes it onto the same triangle of the source), its colour statistics
are moved to the target face's, and it is blended onto the target frame through a mask over the
mesh's outline, eroded and blurred in proportion to the face's size. No network is involved: the
points come from the face-mesh network that the caller runs.

Conventions (as :mod:`imgpipe.ensembles.face_geometry`): points are 2-D image pixel coordinates
(x, y) with pixel centres at integers, so ``grid_sample`` runs with ``align_corners=True`` (normalised
−1 is the centre of the first pixel, +1 that of the last). MediaPipe's landmarks put pixel centres at
half-integers (a crop pixel i spans [i, i+1]): subtract 0.5 when mapping them back to the image.
Images are CHW float tensors in 0..255; everything runs on the device of the target frame (CPU or
CUDA alike), float32 per pixel, float64 for the small per-triangle maths.

The triangulation is build-time work in numpy (:func:`triangles_from_edges`, :func:`mediapipe_triangles`):
MediaPipe publishes its tessellation only as the edges of the mesh, and mediapipe is not installed
where the server runs, so the build derives the triangles once and ships them.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import math
from collections import defaultdict, deque
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.nn import functional as F

MESH_POINTS = 468  # MediaPipe's face mesh without the iris points (the attention model's 478 adds ten)
CONNECTIONS_FILE = "python/solutions/face_mesh_connections.py"  # inside the mediapipe package
CHUNK_PIXELS = 1 << 21  # candidate pixels rasterised at once (~100 MB of temporaries at most)
STD_RATIO = (0.25, 4.0)  # bounds of the colour transfer's per-channel std ratio (target / source)

# --- the triangulation (build time, numpy) ---------------------------------------------------------


def triangles_from_edges(edges: Iterable[tuple[int, int]]) -> np.ndarray:
    """The faces of the triangulated surface whose edges are ``edges`` (pairs of vertex indices):
    [T, 3] int32, consistently oriented, in sorted order.

    Every face is a 3-clique of the edge graph, but not every 3-clique is a face: a *separating*
    triangle (three edges around a patch of other faces, e.g. around a vertex of degree 3) is a
    3-cycle that encloses vertices. Removing its three vertices leaves the inside apart from the
    outside, and both touch all three. Removing a face's may also split the graph (a boundary vertex
    whose only neighbours are two of the face's), but at most one of the parts can touch all three:
    two such parts and a point inside the face would embed K₃,₃ in the plane. So a 3-clique is dropped
    when two parts of the graph without it each touch all three of its vertices. Only the cliques with
    an edge shared by three or more cliques need the test (an edge borders at most two faces; a
    non-face with an interior edge adds a third). Not decided by this rule, and left to the check
    below: a separating triangle with two of its edges on the outline. A triangular hole is
    combinatorially a face and is kept.

    The result is then checked as a surface: every edge borders one face (a boundary edge) or two (an
    interior edge), Euler's formula for a connected planar surface with b boundary loops holds
    (V − E + F = 2 − b; a disc is b = 1, MediaPipe's mesh, with its two eyes and mouth open, b = 4),
    and the faces are oriented consistently (each interior edge traversed once each way). A
    ``ValueError`` says what failed.

    Orientation is propagated from face to face across shared edges; its global sense (per connected
    piece) follows the majority of the given pairs read as directed edges (i → j), which for
    MediaPipe's list (each triangle written as its three directed edges) is MediaPipe's own winding.
    """
    pairs = np.asarray([tuple(e) for e in edges], dtype=np.int64).reshape(-1, 2)
    if (pairs[:, 0] == pairs[:, 1]).any() or (pairs < 0).any():
        raise ValueError("edges must join two different vertices with non-negative indices")
    undirected = {(min(a, b), max(a, b)) for a, b in pairs.tolist()}
    neighbours: dict[int, set[int]] = defaultdict(set)
    for a, b in undirected:
        neighbours[a].add(b)
        neighbours[b].add(a)
    if not _connected(neighbours, frozenset()):
        raise ValueError("the edge graph is not connected")

    cliques = sorted(
        {(a, b, c) for a, b in undirected for c in neighbours[a] & neighbours[b] if c > b}
    )  # each clique once, as a sorted triple
    count: dict[tuple[int, int], int] = defaultdict(int)
    for a, b, c in cliques:
        for e in ((a, b), (a, c), (b, c)):
            count[e] += 1
    faces = [
        t
        for t in cliques
        if max(count[(t[0], t[1])], count[(t[0], t[2])], count[(t[1], t[2])]) < 3 or not _separating(neighbours, t)
    ]
    oriented = _orient(faces, {(int(a), int(b)) for a, b in pairs})
    check_surface(oriented, vertices=len(neighbours))
    return oriented


def _separating(neighbours: dict[int, set[int]], triangle: tuple[int, int, int]) -> bool:
    """Whether two connected parts of the graph without ``triangle``'s vertices each have a neighbour
    in all three of them."""
    removed = set(triangle)
    seen: set[int] = set(removed)
    touching_all = 0
    for start in neighbours:
        if start in seen:
            continue
        seen.add(start)
        queue, touched = deque([start]), set()
        while queue:
            for w in neighbours[queue.popleft()]:
                if w in removed:
                    touched.add(w)
                elif w not in seen:
                    seen.add(w)
                    queue.append(w)
        touching_all += touched == removed
        if touching_all >= 2:
            return True
    return False


def _connected(neighbours: dict[int, set[int]], removed: frozenset[int]) -> bool:
    """Whether the graph stays connected without the vertices ``removed`` (breadth-first search)."""
    rest = [v for v in neighbours if v not in removed]
    if not rest:
        return True
    seen = {rest[0]}
    queue = deque(seen)
    while queue:
        for w in neighbours[queue.popleft()]:
            if w not in seen and w not in removed:
                seen.add(w)
                queue.append(w)
    return len(seen) == len(rest)


def _orient(faces: list[tuple[int, int, int]], directed: set[tuple[int, int]]) -> np.ndarray:
    """Faces oriented consistently with their neighbours (breadth-first over shared edges), each
    connected piece in the sense most of the ``directed`` pairs agree with; rotated so the smallest
    index comes first, rows sorted."""
    by_edge: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, (a, b, c) in enumerate(faces):
        for e in ((a, b), (a, c), (b, c)):
            by_edge[e].append(i)
    oriented: list[tuple[int, int, int] | None] = [None] * len(faces)
    for start in range(len(faces)):
        if oriented[start] is not None:
            continue
        piece = [start]
        oriented[start] = faces[start]
        queue = deque(piece)
        while queue:
            a, b, c = oriented[queue.popleft()]  # type: ignore[misc]
            for u, v in ((a, b), (b, c), (c, a)):
                for j in by_edge[(min(u, v), max(u, v))]:
                    if oriented[j] is None:
                        (w,) = set(faces[j]) - {u, v}
                        oriented[j] = (v, u, w)  # the shared edge traversed the other way
                        piece.append(j)
                        queue.append(j)
        agree = sum((u, v) in directed for j in piece for u, v in _half_edges(oriented[j]))  # type: ignore[arg-type]
        against = sum((v, u) in directed for j in piece for u, v in _half_edges(oriented[j]))  # type: ignore[arg-type]
        if against > agree:
            for j in piece:
                a, b, c = oriented[j]  # type: ignore[misc]
                oriented[j] = (a, c, b)
    rows = []
    for a, b, c in oriented:  # type: ignore[misc]
        k = int(np.argmin((a, b, c)))
        rows.append((a, b, c)[k:] + (a, b, c)[:k])
    return np.array(sorted(rows), dtype=np.int32).reshape(-1, 3)


def _half_edges(triangle: tuple[int, int, int]) -> tuple[tuple[int, int], ...]:
    a, b, c = triangle
    return ((a, b), (b, c), (c, a))


def check_surface(triangles: np.ndarray, vertices: int | None = None) -> list[np.ndarray]:
    """Check that ``triangles`` [T,3] form a connected, consistently oriented planar surface (a disc
    with holes) and return its boundary loops (:func:`boundary_loops`); ``ValueError`` otherwise.

    Each undirected edge borders one or two triangles and each directed half-edge occurs once (so an
    interior edge is traversed once each way: a consistent orientation), and V − E + F = 2 − b for the
    b boundary loops (genus 0). ``vertices`` is V (default: the vertices the triangles use)."""
    tris = np.asarray(triangles, dtype=np.int64).reshape(-1, 3)
    half = np.concatenate([tris[:, [0, 1]], tris[:, [1, 2]], tris[:, [2, 0]]])
    if len({tuple(e) for e in half.tolist()}) != len(half):
        raise ValueError("a directed edge occurs twice: the triangles are not consistently oriented")
    undirected = {(min(a, b), max(a, b)) for a, b in half.tolist()}
    loops = boundary_loops(tris)
    used = len(np.unique(tris))
    v = used if vertices is None else vertices
    if v != used:
        raise ValueError(f"{v - used} vertices are in no triangle")
    euler = v - len(undirected) + len(tris)
    if euler != 2 - len(loops):
        raise ValueError(
            f"V − E + F = {v} − {len(undirected)} + {len(tris)} = {euler}, not 2 − {len(loops)} boundary loops: "
            "not a connected planar surface"
        )
    return loops


def boundary_loops(triangles: np.ndarray) -> list[np.ndarray]:
    """The boundary loops of oriented ``triangles`` [T,3]: each an int32 array of vertex indices in
    the order of the boundary half-edges (the triangles' own sense, so a triangle closing the loop
    across edge (u → v) is (v, u, ·)), longest first (for a face mesh, the outline before the holes).

    ``ValueError`` if an edge borders more than two triangles or a vertex lies on the boundary twice
    (a pinch): the surface is not a manifold."""
    tris = np.asarray(triangles, dtype=np.int64).reshape(-1, 3)
    half = {tuple(e) for e in np.concatenate([tris[:, [0, 1]], tris[:, [1, 2]], tris[:, [2, 0]]]).tolist()}
    sides: dict[tuple[int, int], int] = defaultdict(int)
    for a, b in half:
        sides[(min(a, b), max(a, b))] += 1
    if any(n > 2 for n in sides.values()):
        raise ValueError("an edge borders more than two triangles")
    following: dict[int, int] = {}
    for a, b in half:
        if (b, a) not in half:
            if a in following:
                raise ValueError(f"vertex {a} is on the boundary twice (a pinch)")
            following[a] = b
    loops = []
    while following:
        start = min(following)
        loop = [start]
        v = following.pop(start)
        while v != start:
            loop.append(v)
            v = following.pop(v)
        loops.append(np.array(loop, dtype=np.int32))
    loops.sort(key=lambda loop: (-len(loop), int(loop.min())))
    return loops


def connections_file() -> Path:
    """MediaPipe's ``face_mesh_connections.py``, found without importing mediapipe (its wheel is
    installed without dependencies at build time; the module itself is plain Python literals)."""
    spec = importlib.util.find_spec("mediapipe")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the mediapipe package is not installed (pip install --no-deps mediapipe)")
    path = Path(next(iter(spec.submodule_search_locations))) / CONNECTIONS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing")
    return path


def connections(name: str = "FACEMESH_TESSELATION", path: Path | None = None) -> list[tuple[int, int]]:
    """The pairs of one of the connections file's ``frozenset([...])`` constants, in source order,
    read with ``ast`` (no import: mediapipe's package ``__init__`` needs its dependencies)."""
    tree = ast.parse(Path(path or connections_file()).read_text())
    for node in tree.body:
        if (
            isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == name for t in node.targets)
            and isinstance(node.value, ast.Call)
            and len(node.value.args) == 1
        ):
            return [(int(a), int(b)) for a, b in ast.literal_eval(node.value.args[0])]
    raise KeyError(f"{name} is not a frozenset([...]) literal in {path or connections_file()}")


def mediapipe_triangles(path: Path | None = None) -> np.ndarray:
    """The triangles of MediaPipe's face mesh, [852, 3] int32, derived from ``FACEMESH_TESSELATION``
    (:func:`triangles_from_edges`), in MediaPipe's winding: on a real face mesh in image pixel
    coordinates (x right, y down) the cross product (b − a) × (c − a) of a visible triangle is
    negative (counter-clockwise as seen on screen). A surface with four boundary loops: the face's
    outline (36 points), the mouth (20) and the eyes (16 each)."""
    return _mediapipe_triangles(str(path or connections_file())).copy()


@functools.lru_cache(maxsize=4)
def _mediapipe_triangles(path: str) -> np.ndarray:
    return triangles_from_edges(connections("FACEMESH_TESSELATION", Path(path)))


# --- topology on a device (serving time) ------------------------------------------------------------


@dataclass(frozen=True)
class _Topology:
    """The triangles plus one fan per hole (each boundary loop but the longest, the outline) around a
    virtual point appended after the mesh's points (the loop's centroid), on one device."""

    triangles: torch.Tensor  # [T + fans, 3] long: the mesh's, then the fans'
    mesh: int  # T: the first T rows are the mesh's
    loop_points: torch.Tensor  # [L] long: the holes' loop vertices, concatenated
    loop_ids: torch.Tensor  # [L] long: which hole each belongs to
    loop_sizes: torch.Tensor  # [H] float
    holes: int


def _topology(triangles: torch.Tensor | np.ndarray, points: int, device: torch.device) -> _Topology:
    tris = np.ascontiguousarray(torch.as_tensor(triangles).cpu().numpy(), dtype=np.int64).reshape(-1, 3)
    return _topology_cached(tris.tobytes(), points, device)


@functools.lru_cache(maxsize=16)
def _topology_cached(data: bytes, points: int, device: torch.device) -> _Topology:
    tris = np.frombuffer(data, dtype=np.int64).reshape(-1, 3)
    if len(tris) == 0 or tris.min() < 0 or tris.max() >= points:
        raise ValueError(f"triangles must index the {points} points")
    holes = boundary_loops(tris)[1:]
    fans = [
        np.stack([np.roll(loop, -1), loop, np.full(len(loop), points + k)], axis=1) for k, loop in enumerate(holes)
    ]  # across the boundary half-edge u → v, the fan's triangle runs v → u: the mesh's orientation
    all_tris = np.concatenate([tris, *fans]) if fans else tris
    loop_points = np.concatenate(holes) if holes else np.zeros(0, np.int64)
    loop_ids = np.concatenate([np.full(len(loop), k) for k, loop in enumerate(holes)]) if holes else loop_points
    return _Topology(
        triangles=torch.as_tensor(all_tris, dtype=torch.long, device=device),
        mesh=len(tris),
        loop_points=torch.as_tensor(loop_points, dtype=torch.long, device=device),
        loop_ids=torch.as_tensor(loop_ids, dtype=torch.long, device=device),
        loop_sizes=torch.as_tensor([len(h) for h in holes], dtype=torch.float64, device=device),
        holes=len(holes),
    )


def _with_hole_centres(points: torch.Tensor, topo: _Topology) -> torch.Tensor:
    """``points`` [P,2] with each hole's centroid appended: [P + H, 2] float64."""
    pts = points.to(torch.float64)
    if topo.holes == 0:
        return pts
    sums = torch.zeros((topo.holes, 2), dtype=torch.float64, device=pts.device)
    sums.index_add_(0, topo.loop_ids, pts[topo.loop_points])
    return torch.cat([pts, sums / topo.loop_sizes[:, None]])


# --- the piecewise-affine warp ----------------------------------------------------------------------


class MeshWarp(NamedTuple):
    """A source warped onto the target mesh inside a window of the target frame.

    ``image`` [C,h,w] is defined (finite) everywhere, meaningful where ``triangle`` ≥ 0; ``triangle``
    [h,w] long is the index of the triangle covering each pixel (−1: none); the window's top-left
    pixel is (x0, y0) in frame coordinates."""

    image: torch.Tensor
    triangle: torch.Tensor
    x0: int
    y0: int

    @property
    def coverage(self) -> torch.Tensor:
        """1 where a triangle covers the pixel, 0 elsewhere: [h,w] float32."""
        return (self.triangle >= 0).to(torch.float32)


def mesh_box(points: torch.Tensor, height: int, width: int, margin: int = 0) -> tuple[int, int, int, int]:
    """The window (x0, y0, x1, y1), end exclusive, of the pixels ``points`` [P,2] span, clipped to the
    frame grown by ``margin`` on each side (a face leaving the frame is still seen that far past its
    edge). One host read of 4 numbers."""
    lo = points.detach().amin(dim=0)
    hi = points.detach().amax(dim=0)
    (xmin, ymin), (xmax, ymax) = torch.stack([lo, hi]).tolist()
    x0 = max(math.ceil(xmin), -margin)
    y0 = max(math.ceil(ymin), -margin)
    x1 = min(math.floor(xmax) + 1, width + margin)
    y1 = min(math.floor(ymax) + 1, height + margin)
    return x0, y0, max(x1, x0), max(y1, y0)


def _barycentric(corners: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For triangles [T,3,2] (float64), the affine forms of their barycentric coordinates, [T,3,3]
    (row i: α, β, γ with λ_i(x, y) = αx + βy + γ), and twice their signed areas [T]."""
    a, b, c = corners.unbind(1)
    area2 = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0])
    safe = torch.where(area2.abs() > 1e-12, area2, torch.ones_like(area2))
    rows = []
    for j, k in ((b, c), (c, a), (a, b)):  # λ_i = (v_k − v_j) × (p − v_j) / area2 for the edge opposite i
        u = k - j
        rows.append(torch.stack([-u[:, 1], u[:, 0], u[:, 1] * j[:, 0] - u[:, 0] * j[:, 1]], dim=-1))
    return torch.stack(rows, dim=1) / safe[:, None, None], area2


def _rasterize(
    corners: torch.Tensor, height: int, width: int, chunk: int = CHUNK_PIXELS
) -> tuple[torch.Tensor, torch.Tensor]:
    """The triangle covering each pixel of a height×width window whose top-left pixel is the origin
    of ``corners`` [T,3,2] (float64, window coordinates): [h,w] long (−1: none), and the barycentric
    forms [T,3,3] of :func:`_barycentric`.

    Scanlines, all triangles at once: each triangle's rows (its bounding box's) get their span of x
    from the three barycentric inequalities λ_i ≥ −ε (float64, per row: a few thousand rows for a
    face), then exactly the pixels of the spans are enumerated in flat tensors, so the cost follows
    the face's area, not triangles × pixels, and no pixel is tested. ε (1e-9) closes the cracks along
    shared edges. A pixel in several triangles (a shared edge, or a mesh folded over itself where the
    head turns away) takes a front-facing one (the sign of the mesh's total area), then the highest
    index. Chunks of whole rows hold at most ``chunk`` pixels (a longer row is a chunk of its own)."""
    device = corners.device
    count = corners.shape[0]
    forms, area2 = _barycentric(corners)
    valid = area2.abs() > 1e-12
    front = (area2 * area2.sum().sign()) >= 0
    y_lo = torch.ceil(corners[..., 1].amin(dim=1) - 1e-9).clamp(min=0)
    y_hi = torch.floor(corners[..., 1].amax(dim=1) + 1e-9).clamp(max=height - 1)
    rows_per = torch.where(valid, (y_hi - y_lo + 1).clamp(min=0), torch.zeros_like(y_lo)).to(torch.long)
    rows = int(rows_per.sum())  # a host read: the rows' tensors' size
    keys = torch.full((height * width,), -1, dtype=torch.long, device=device)
    if rows == 0:
        return keys.view(height, width), forms
    tri = torch.repeat_interleave(torch.arange(count, device=device), rows_per, output_size=rows)
    first = torch.cumsum(rows_per, 0) - rows_per
    y = y_lo[tri] + (torch.arange(rows, device=device) - first[tri])
    f = forms[tri]  # [R,3,3]
    a = f[..., 0]  # λ_i = a·x + c along the row
    c = f[..., 1] * y[:, None] + f[..., 2] + 1e-9
    bound = -c / torch.where(a == 0, torch.ones_like(a), a)
    inf = torch.full_like(bound, math.inf)
    lower = torch.where(a > 0, bound, -inf).amax(dim=1)
    upper = torch.where(a < 0, bound, inf).amin(dim=1)
    empty = ((a == 0) & (c < 0)).any(dim=1)
    x_lo = torch.ceil(lower).clamp(min=0)
    x_hi = torch.floor(upper).clamp(max=width - 1)
    lengths = torch.where(empty, torch.zeros_like(x_lo), (x_hi - x_lo + 1).clamp(min=0)).to(torch.long)
    starts = y.to(torch.long) * width + x_lo.clamp(max=width - 1).to(torch.long)  # flat index of each span
    priority = (torch.arange(count, device=device) + count * front.to(torch.long))[tri]
    ends = torch.cumsum(lengths, 0).cpu().numpy()  # a host read: the chunks' sizes
    begin = 0
    while begin < rows:
        done = int(ends[begin - 1]) if begin else 0
        stop = max(int(np.searchsorted(ends, done + chunk, side="right")), begin + 1)
        total = int(ends[stop - 1]) - done
        if total:
            span = lengths[begin:stop]
            row = torch.repeat_interleave(torch.arange(begin, stop, device=device), span, output_size=total)
            offset = torch.arange(total, device=device) - (torch.cumsum(span, 0) - span)[row - begin]
            keys.scatter_reduce_(0, starts[row] + offset, priority[row], reduce="amax")
        begin = stop
    triangle = torch.where(keys >= count, keys - count, keys)
    return triangle.view(height, width), forms


def _source_coordinates(forms: torch.Tensor, source_corners: torch.Tensor, triangle: torch.Tensor) -> torch.Tensor:
    """For each window pixel, its point in the source through its triangle's affine map: [h,w,2] float32
    (uncovered pixels get triangle 0's map: finite, and masked by the caller)."""
    height, width = triangle.shape
    maps = (source_corners.transpose(1, 2) @ forms).to(torch.float32)  # [T,2,3]: Σ_i s_i λ_i(x, y)
    m = maps[triangle.clamp(min=0)]  # [h,w,2,3]
    xs = torch.arange(width, dtype=torch.float32, device=triangle.device)[None, :]
    ys = torch.arange(height, dtype=torch.float32, device=triangle.device)[:, None]
    return torch.stack(
        [m[..., 0, 0] * xs + m[..., 0, 1] * ys + m[..., 0, 2], m[..., 1, 0] * xs + m[..., 1, 1] * ys + m[..., 1, 2]],
        dim=-1,
    )


def _sample(source: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Bilinear samples of CHW ``source`` at pixel coordinates [h,w,2] (x, y), ``align_corners=True``
    (pixel centres at integers); outside the source, its border is repeated (a mesh reaching past the
    source's edge takes the edge's colour rather than black)."""
    height, width = source.shape[-2:]
    gx = coords[..., 0] * (2.0 / max(width - 1, 1)) - 1.0
    gy = coords[..., 1] * (2.0 / max(height - 1, 1)) - 1.0
    grid = torch.stack([gx, gy], dim=-1).unsqueeze(0).to(source.dtype)
    return F.grid_sample(source.unsqueeze(0), grid, mode="bilinear", padding_mode="border", align_corners=True)[0]


def warp_mesh(
    source: torch.Tensor,
    source_points: torch.Tensor,
    target_points: torch.Tensor,
    triangles: torch.Tensor | np.ndarray,
    height: int,
    width: int,
    *,
    margin: int = 0,
    chunk: int = CHUNK_PIXELS,
) -> MeshWarp:
    """Warp CHW float ``source`` onto the target mesh: each pixel of the target's window (the
    :func:`mesh_box` of ``target_points`` in a height×width frame, ``margin`` past its edges) is mapped
    through its triangle's affine map (target triangle → the same source triangle, in barycentric
    coordinates) and sampled bilinearly (``align_corners=True``). Points are [P,2] pixel (x, y);
    ``triangles`` [T,3] index them. Runs on the source's device; cost follows the window, not the frame."""
    device = source.device
    tris = torch.as_tensor(triangles, device=device).to(torch.long)
    x0, y0, x1, y1 = mesh_box(target_points, height, width, margin)
    origin = torch.tensor([x0, y0], dtype=torch.float64, device=device)
    target = target_points.to(device=device, dtype=torch.float64) - origin
    triangle, forms = _rasterize(target[tris], y1 - y0, x1 - x0, chunk)
    src = source_points.to(device=device, dtype=torch.float64)
    image = _sample(source, _source_coordinates(forms, src[tris], triangle))
    return MeshWarp(image, triangle, x0, y0)


# --- colour --------------------------------------------------------------------------------------------

_RGB_TO_XYZ = (
    (0.4124564, 0.3575761, 0.1804375),
    (0.2126729, 0.7151522, 0.0721750),
    (0.0193339, 0.1191920, 0.9503041),
)
_WHITE_D65 = (0.95047, 1.0, 1.08883)
_DELTA = 6.0 / 29.0


@functools.lru_cache(maxsize=8)
def _colour_matrices(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """sRGB(linear) → XYZ/white, its inverse, and the white: small constants, made once per device."""
    white = torch.tensor(_WHITE_D65, dtype=torch.float64)
    forward = torch.tensor(_RGB_TO_XYZ, dtype=torch.float64) / white[:, None]
    return forward.float().to(device), torch.linalg.inv(forward).float().to(device), white.float().to(device)


def rgb_to_lab(image: torch.Tensor) -> torch.Tensor:
    """CIE L*a*b* (D65) of sRGB ``image`` [3,...] in 0..255 (clipped to it): [3,...] float32."""
    forward, _, _ = _colour_matrices(_device(image.device))
    c = (image.to(torch.float32) / 255.0).clamp(0.0, 1.0)
    linear = torch.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    xyz = _mix(forward, linear).clamp(min=0.0)
    f = torch.where(xyz > _DELTA**3, xyz.clamp(min=_DELTA**3) ** (1.0 / 3.0), xyz / (3 * _DELTA**2) + 4.0 / 29.0)
    return torch.stack([116.0 * f[1] - 16.0, 500.0 * (f[0] - f[1]), 200.0 * (f[1] - f[2])])


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """sRGB in 0..255 (clipped) of CIE L*a*b* (D65) ``lab`` [3,...]: [3,...] float32."""
    _, inverse, _ = _colour_matrices(_device(lab.device))
    fy = (lab[0] + 16.0) / 116.0
    f = torch.stack([fy + lab[1] / 500.0, fy, fy - lab[2] / 200.0])
    xyz = torch.where(f > _DELTA, f**3, 3 * _DELTA**2 * (f - 4.0 / 29.0))
    linear = _mix(inverse, xyz).clamp(0.0, 1.0)
    c = torch.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear.clamp(min=0.0031308) ** (1 / 2.4) - 0.055)
    return (c * 255.0).clamp(0.0, 255.0)


def _mix(matrix: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
    """``matrix`` [3,3] applied to the channels of [3,...] (a plain matrix product: einsum's batched
    path is orders of magnitude slower on CPU for this shape)."""
    return (matrix @ channels.reshape(3, -1)).reshape(channels.shape)


def _device(device: torch.device) -> torch.device:
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _statistics(values: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel weighted mean and standard deviation of [C,h,w] over [h,w] weights: [C,1,1] each."""
    total = weight.sum().clamp(min=1e-6)
    mean = (values * weight).sum(dim=(1, 2), keepdim=True) / total
    var = (((values - mean) ** 2) * weight).sum(dim=(1, 2), keepdim=True) / total
    return mean, var.sqrt()


def match_colour(image: torch.Tensor, reference: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """``image`` (CHW RGB, 0..255) with its colour statistics moved to ``reference``'s (same shape):
    per channel of L*a*b*, (x − μ_image) · σ_ref / σ_image + μ_ref, the statistics taken over
    ``region`` [h,w] (weights, e.g. the face's pixels). Returns RGB 0..255 float32.

    Lab rather than RGB (Reinhard et al.'s colour transfer): its channels are nearly decorrelated
    for natural images, lightness apart from the two opponent-colour axes, so matching each one
    alone moves the lighting (L) and the skin tone (a, b) independently without the hue and
    saturation shifts that scaling correlated R, G, B separately gives. The std ratio is kept within
    :data:`STD_RATIO` so a flat source channel (a greyscale photo's a, b) does not blow up its noise."""
    weight = region.to(torch.float32)
    lab_image, lab_reference = rgb_to_lab(image), rgb_to_lab(reference)
    mean_i, std_i = _statistics(lab_image, weight)
    mean_r, std_r = _statistics(lab_reference, weight)
    ratio = (std_r / std_i.clamp(min=1e-3)).clamp(*STD_RATIO)
    return lab_to_rgb((lab_image - mean_i) * ratio + mean_r)


# --- mask and blend ------------------------------------------------------------------------------------


def _window_sum(x: torch.Tensor, radius: int, dim: int) -> torch.Tensor:
    """Sums over windows of 2·radius + 1 along ``dim`` of an already padded tensor (shorter by 2·radius),
    by differences of a float64 cumulative sum: O(n) whatever the radius. Exact for 0/1 values, and
    exactly 0 over a window of zeros (adding 0.0 leaves the running sum as it was)."""
    c = torch.cumsum(x, dim=dim, dtype=torch.float64)
    c = torch.cat([torch.zeros_like(c.narrow(dim, 0, 1)), c], dim=dim)
    n = x.shape[dim] - 2 * radius
    return c.narrow(dim, 2 * radius + 1, n) - c.narrow(dim, 0, n)


def _box_radius(sigma: float) -> int:
    """The radius r of the box filter that, applied three times, has a Gaussian's ``sigma``: each box
    of 2r + 1 adds r(r + 1)/3 to the variance."""
    return max(1, round((math.sqrt(1.0 + 4.0 * sigma * sigma) - 1.0) / 2.0))


def feather_reach(sigma: float) -> int:
    """How far :func:`feathered_mask` erodes, and how far its blur reaches: R = 3r (about 3σ); 0 for σ ≤ 0."""
    return 3 * _box_radius(sigma) if sigma > 0 else 0


def feathered_mask(region: torch.Tensor, sigma: float) -> torch.Tensor:
    """``region`` [h,w] (bool or 0/1) eroded by R = :func:`feather_reach` pixels (a (2R+1)² square)
    and blurred by three box filters of radius R/3 (a Gaussian of ``sigma`` to within a few percent,
    with a support of exactly R): [h,w] float32 in [0, 1], exactly 0 wherever the region is not (the
    blur reaches no farther than the erosion took away), about 0.5 at R inside its edge and 1 from 2R
    in. Pixels beyond the window count as outside. Box sums by cumulative sums cost the same for any
    σ (a 109-tap Gaussian convolution took ~100 ms on CPU for a 900-px face)."""
    mask = region.to(torch.float32)
    if sigma <= 0:
        return mask
    r = _box_radius(sigma)
    reach = 3 * r
    outside = F.pad(1.0 - mask, (reach, reach, reach, reach), value=1.0)
    # Erosion: a pixel stays if no outside pixel lies in its square.
    x = (_window_sum(_window_sum(outside, reach, 1), reach, 0) < 0.5).to(torch.float64)
    for _ in range(3):
        x = _window_sum(_window_sum(F.pad(x, (r, r, r, r)), r, 1), r, 0) / (2 * r + 1) ** 2
    return x.to(torch.float32).clamp(0.0, 1.0)


def _soften(coverage: torch.Tensor) -> torch.Tensor:
    """A [1, 2, 1]/4 binomial blur of [h,w] (zero outside): antialiases the staircase of the mesh's
    edges along the eye and mouth holes."""
    kernel = torch.tensor([0.25, 0.5, 0.25], dtype=torch.float32, device=coverage.device)
    x = F.conv2d(coverage[None, None], kernel.view(1, 1, 1, 3), padding=(0, 1))
    return F.conv2d(x, kernel.view(1, 1, 3, 1), padding=(1, 0))[0, 0]


def swap_face_mesh(
    target: torch.Tensor,
    target_points: torch.Tensor,
    source: torch.Tensor,
    source_points: torch.Tensor,
    triangles: torch.Tensor | np.ndarray,
    *,
    feather: float = 0.02,
    colour: bool = True,
    fill_holes: bool = False,
    inplace: bool = False,
    chunk: int = CHUNK_PIXELS,
) -> torch.Tensor:
    """The target frame (CHW float 0..255) with the source's face warped onto one target face.

    ``target_points``/``source_points`` [P,2] are each face's mesh points in its own image's pixel
    coordinates (x, y; drop the network's z), ``triangles`` [T,3] the mesh's (:func:`mediapipe_triangles`).
    Steps: (1) rasterise the target mesh in its bounding window, its holes (eyes, mouth: every boundary
    loop but the outline) closed by fans around their centroids; (2) warp the source through the same
    triangles (:func:`warp_mesh`'s maths); (3) if ``colour``, move the warped face's Lab statistics to
    the target face's over the mesh's own pixels (:func:`match_colour`); (4) blend
    ``target + α·(face − target)`` with α the mesh's filled outline eroded and blurred by σ =
    ``feather`` × the face's size (√ of its box's area) — :func:`feathered_mask` — times the mesh's
    coverage, so by default the eyes and the inner mouth stay the target's (its gaze, blinks and
    teeth: a source's closed eye or mouth cannot be stretched into an open one); ``fill_holes``
    takes them from the source too, through the fans.

    α is exactly 0 on and outside the outline (the erosion reaches as far as the blur), and there the
    frame is returned bit for bit; so is everything outside the face's window. Several faces: call
    once per face, with ``inplace`` to write into ``target`` itself (returned) rather than a copy of
    the whole frame per face (a 1080p float frame is 25 MB). Runs on the target's device; the source
    is moved there."""
    device = target.device
    height, width = target.shape[-2:]
    source = source.to(device=device, dtype=torch.float32)
    tp = target_points.to(device=device, dtype=torch.float64)
    sp = source_points.to(device=device, dtype=torch.float64)
    if tp.shape != sp.shape or tp.dim() != 2 or tp.shape[1] != 2:
        raise ValueError(f"points must be [P,2] alike, got {tuple(tp.shape)} and {tuple(sp.shape)}")
    topo = _topology(triangles, tp.shape[0], _device(device))
    target_all, source_all = _with_hole_centres(tp, topo), _with_hole_centres(sp, topo)

    (xmin, ymin), (xmax, ymax) = torch.stack([tp.amin(0), tp.amax(0)]).tolist()
    size = math.sqrt(max(xmax - xmin, 1.0) * max(ymax - ymin, 1.0))
    sigma = max(feather, 0.0) * size
    # The window: the face's box (outside it is outside the outline, as the erosion takes it), up to
    # twice the feather's reach past the frame's edges, so that where the face leaves the frame the
    # erosion and then the blur see its true outline, and α is what it would be in a larger frame.
    x0, y0, x1, y1 = mesh_box(tp, height, width, 2 * feather_reach(sigma))
    if x1 <= max(x0, 0) or y1 <= max(y0, 0) or min(x1, width) <= max(x0, 0) or min(y1, height) <= max(y0, 0):
        return target if inplace else target.clone()
    origin = torch.tensor([x0, y0], dtype=torch.float64, device=device)
    corners = (target_all - origin)[topo.triangles]
    triangle, forms = _rasterize(corners, y1 - y0, x1 - x0, chunk)
    face = _sample(source, _source_coordinates(forms, source_all[topo.triangles], triangle))
    region = triangle >= 0
    skin = region & (triangle < topo.mesh) if not fill_holes else region

    # The part of the window inside the frame.
    cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
    inner = (slice(cy0 - y0, cy1 - y0), slice(cx0 - x0, cx1 - x0))
    alpha = (feathered_mask(region, sigma) * _soften(skin.to(torch.float32)))[inner]
    face = face[(slice(None), *inner)]
    behind = target[:, cy0:cy1, cx0:cx1]
    if colour:
        face = match_colour(face, behind, (triangle[inner] >= 0) & (triangle[inner] < topo.mesh))
    blended = behind + alpha * (face.to(target.dtype) - behind)
    patch = torch.where(alpha > 0, blended, behind)
    out = target if inplace else target.clone()
    out[:, cy0:cy1, cx0:cx1] = patch
    return out
