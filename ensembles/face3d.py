"""3D faces: Deep3DFaceRecon's alignment and 3DMM, the face mesh in a metric frame, head pose, photo textures.

Two ways to a 3D face, both torch on the tensors' device (CPU or CUDA alike):

- **the face mesh** (MediaPipe's 468 points, real weights): the points, x and y in image pixels and z in
  the same units (smaller = nearer the camera), are moved into a metric-like frame (:func:`mesh_frame`):
  centred on their centroid, scaled so the eye centres lie :data:`INTER_OCULAR_M` apart (metres), y up
  and z towards the camera (the camera looks along −z, so the nose tip has a larger z than the eyes);
  a proper rotation of the image frame (x, −y, −z), so the mesh keeps its handedness and winding.
- **the 3DMM** (Deep3DFaceRecon's contract): :func:`pos_fit` and :func:`align_crops` are ``align_img``
  (the 8-parameter least-squares camera fit of 5 landmarks to its standard 3D landmarks, scale 102/s,
  PIL's bicubic resize then a 224×224 crop); :func:`assemble` is ``ParametricFaceModel.compute_for_render``
  (shape = mean + idBase·id + exBase·exp, colour = (meantex + texBase·tex)/255 lit by 9-band spherical
  harmonics, rotation Rz·Ry·Rx, translation, the perspective camera at distance 10 with focal 1015).

**Head pose** (:func:`head_pose`): the least-squares similarity (Umeyama: rotation, scale, translation) that
takes Deep3DFaceRecon's standard 3D landmarks — five points of the mean face, frontal, y up, z towards the
camera — onto the same five points of the face (eye centres, nose tip, mouth corners) in the frame above;
its rotation is decomposed as Deep3DFaceRecon composes its angles, R = Rz(roll)·Ry(yaw)·Rx(pitch), so both
methods report pose in one convention: yaw > 0 turns the nose towards the image's right (the subject's
left), pitch > 0 tilts it down, roll > 0 turns the face counter-clockwise on the image.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch.nn import functional as F

from imgpipe.ensembles import face_mesh, mesh_swap

# Deep3DFaceRecon's standard 3D landmarks (``load_lm3d``: the 5-point reduction of similarity_Lm3D_all.mat),
# decimetres, y up, z towards the camera: left eye, right eye, nose tip, left and right mouth corner (as seen
# on the image).
LM3D_STD = np.array(
    [
        [-0.31148657, 0.29036078, 0.13377953],
        [0.30979887, 0.28972036, 0.13179526],
        [0.0032535, -0.04617932, 0.55244243],
        [-0.25216928, -0.38133916, 0.22405732],
        [0.2484662, -0.38128236, 0.22235769],
    ]
)
LM3D_STD.setflags(write=False)
RESCALE = 102.0  # align_img's rescale_factor
CROP = 224  # align_img's target_size, the regressor's input side
FOCAL = 1015.0  # ParametricFaceModel's perspective camera
CENTER = 112.0
CAMERA_DISTANCE = 10.0
INIT_LIT = (0.8, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)  # added to each colour's 9 SH coefficients
SPLIT = (("id", 80), ("exp", 64), ("tex", 80), ("angle", 3), ("gamma", 27), ("trans", 3))
COEFFICIENTS = sum(n for _, n in SPLIT)  # 257
DECIMETRE = 0.1  # the 3DMM's unit (BFM / 1e5, as Deep3DFaceRecon scales it) in metres
INTER_OCULAR_M = 0.063  # the face mesh's scale: eye centre to eye centre, an adult's mean, in metres
_SH_A = (math.pi, 2 * math.pi / math.sqrt(3.0), 2 * math.pi / math.sqrt(8.0))
_SH_C = (
    1 / math.sqrt(4 * math.pi),
    math.sqrt(3.0) / math.sqrt(4 * math.pi),
    3 * math.sqrt(5.0) / math.sqrt(12 * math.pi),
)


# --- the 3DMM ---------------------------------------------------------------------------------------------


class Coefficients(NamedTuple):
    """The 257 coefficients split as Deep3DFaceRecon's ``split_coeff``: id 80, exp 64, tex 80, angle 3
    (radians: x, y, z = pitch, yaw, roll), gamma 27 (SH lighting: 9 per colour, R then G then B), trans 3."""

    id: torch.Tensor
    exp: torch.Tensor
    tex: torch.Tensor
    angle: torch.Tensor
    gamma: torch.Tensor
    trans: torch.Tensor


def split_coefficients(coefficients: torch.Tensor) -> Coefficients:
    """[F,257] → the six groups (views of the input)."""
    if coefficients.dim() != 2 or coefficients.shape[1] != COEFFICIENTS:
        raise ValueError(f"coefficients must be [F, {COEFFICIENTS}], got {list(coefficients.shape)}")
    parts, start = [], 0
    for _, n in SPLIT:
        parts.append(coefficients[:, start : start + n])
        start += n
    return Coefficients(*parts)


@dataclass(frozen=True)
class Basis:
    """A BFM-format 3DMM on one device (the layout :mod:`imgpipe.build.bfm` checks and ships):
    ``mean_shape`` [N,3] (recentred, decimetres), ``id_base`` [3N,80], ``exp_base`` [3N,64], ``mean_tex``
    [N,3] (0..255), ``tex_base`` [3N,80], ``triangles`` [T,3] (0-based, counter-clockwise seen from the
    front), ``keypoints`` [68] (0-based vertex indices of the 68 landmarks)."""

    mean_shape: torch.Tensor
    id_base: torch.Tensor
    exp_base: torch.Tensor
    mean_tex: torch.Tensor
    tex_base: torch.Tensor
    triangles: torch.Tensor
    keypoints: torch.Tensor
    description: str = ""
    synthetic: bool = False

    @property
    def vertices(self) -> int:
        return int(self.mean_shape.shape[0])

    @classmethod
    def load(cls, data: bytes | str, device: torch.device | str = "cpu") -> Basis:
        """From the shipped ``.npz`` (bytes or a path)."""
        source = io.BytesIO(data) if isinstance(data, bytes) else data
        with np.load(source, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
        floats = {
            k: torch.from_numpy(np.ascontiguousarray(arrays[k], dtype=np.float32)).to(device)
            for k in ("mean_shape", "id_base", "exp_base", "mean_tex", "tex_base")
        }
        return cls(
            **floats,
            triangles=torch.from_numpy(arrays["triangles"].astype(np.int64)).to(device),
            keypoints=torch.from_numpy(arrays["keypoints"].astype(np.int64)).to(device),
            description=str(arrays.get("description", "")),
            synthetic=bool(arrays.get("synthetic", False)),
        )


def face_shape(basis: Basis, identity: torch.Tensor, expression: torch.Tensor) -> torch.Tensor:
    """``compute_shape``: mean + idBase·id + exBase·exp → [F,N,3] (decimetres, the model's frame)."""
    flat = identity @ basis.id_base.T + expression @ basis.exp_base.T + basis.mean_shape.reshape(1, -1)
    return flat.reshape(len(identity), -1, 3)


def face_albedo(basis: Basis, texture: torch.Tensor) -> torch.Tensor:
    """``compute_texture``: (meantex + texBase·tex) / 255 → [F,N,3] RGB (about 0..1)."""
    flat = texture @ basis.tex_base.T + basis.mean_tex.reshape(1, -1)
    return (flat / 255.0).reshape(len(texture), -1, 3)


def rotation_matrix(angles: torch.Tensor) -> torch.Tensor:
    """``compute_rotation`` as a column-vector matrix: R = Rz(z)·Ry(y)·Rx(x) for angles [F,3] (x, y, z)
    in radians, p' = R·p ([F,3,3]; Deep3DFaceRecon returns Rᵀ and multiplies row vectors)."""
    x, y, z = angles.unbind(-1)
    one, zero = torch.ones_like(x), torch.zeros_like(x)
    rx = torch.stack([one, zero, zero, zero, x.cos(), -x.sin(), zero, x.sin(), x.cos()], -1).view(-1, 3, 3)
    ry = torch.stack([y.cos(), zero, y.sin(), zero, one, zero, -y.sin(), zero, y.cos()], -1).view(-1, 3, 3)
    rz = torch.stack([z.cos(), -z.sin(), zero, z.sin(), z.cos(), zero, zero, zero, one], -1).view(-1, 3, 3)
    return rz @ ry @ rx


def euler_angles(rotation: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`rotation_matrix`: [F,3,3] → (x, y, z) radians [F,3], y within ±π/2."""
    r = rotation
    y = torch.asin((-r[:, 2, 0]).clamp(-1.0, 1.0))
    x = torch.atan2(r[:, 2, 1], r[:, 2, 2])
    z = torch.atan2(r[:, 1, 0], r[:, 0, 0])
    return torch.stack([x, y, z], -1)


def vertex_normals(vertices: torch.Tensor, triangles: torch.Tensor) -> torch.Tensor:
    """``compute_norm``: each vertex's normal, the normalised sum of the unit normals of the triangles
    around it (cross(v1 − v2, v2 − v3), i.e. outwards for counter-clockwise triangles) → [F,N,3]."""
    v = vertices
    a, b, c = v[:, triangles[:, 0]], v[:, triangles[:, 1]], v[:, triangles[:, 2]]
    face = F.normalize(torch.cross(a - b, b - c, dim=-1), dim=-1)
    total = torch.zeros_like(v)
    for k in range(3):
        total.index_add_(1, triangles[:, k], face)
    return F.normalize(total, dim=-1)


def sh_lighting(normals: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """``compute_color``'s light: the 9-band SH irradiance per vertex and colour → [F,N,3] (multiply the
    albedo by it). ``gamma`` [F,27] is offset by INIT_LIT (0.8 on band 0) as Deep3DFaceRecon does."""
    a, c = _SH_A, _SH_C
    nx, ny, nz = normals[..., 0:1], normals[..., 1:2], normals[..., 2:3]
    y = torch.cat(
        [
            a[0] * c[0] * torch.ones_like(nx),
            -a[1] * c[1] * ny,
            a[1] * c[1] * nz,
            -a[1] * c[1] * nx,
            a[2] * c[2] * nx * ny,
            -a[2] * c[2] * ny * nz,
            0.5 * a[2] * c[2] / math.sqrt(3.0) * (3 * nz**2 - 1),
            -a[2] * c[2] * nx * nz,
            0.5 * a[2] * c[2] * (nx**2 - ny**2),
        ],
        dim=-1,
    )  # [F,N,9]
    lit = gamma.reshape(-1, 3, 9) + torch.tensor(INIT_LIT, dtype=gamma.dtype, device=gamma.device)
    return y @ lit.transpose(1, 2)  # [F,N,3]


def project(vertices: torch.Tensor) -> torch.Tensor:
    """``to_camera`` + ``to_image``: world vertices [F,N,3] → the 224-pixel crop [F,N,2] (pixel indices,
    y up as Deep3DFaceRecon's landmarks: crop row = 223 − y)."""
    depth = CAMERA_DISTANCE - vertices[..., 2:3]
    return FOCAL * vertices[..., :2] / depth + CENTER


@dataclass(frozen=True)
class Assembled:
    """:func:`assemble`'s result for F faces: ``vertices`` [F,N,3] world (decimetres: rotated and
    translated, y up, z towards the camera at z = 10, as Deep3DFaceRecon's ``save_mesh`` writes them),
    ``normals`` [F,N,3] (rotated), ``albedo`` and ``colour`` (lit) [F,N,3] RGB in 0..1 (not clipped),
    ``projected`` [F,N,2] (the crop, y up), ``landmarks`` [F,68,2] (the keypoints' projections)."""

    vertices: torch.Tensor
    normals: torch.Tensor
    albedo: torch.Tensor
    colour: torch.Tensor
    projected: torch.Tensor
    landmarks: torch.Tensor


def assemble(basis: Basis, coefficients: torch.Tensor) -> Assembled:
    """``compute_for_render`` of [F,257] coefficients on ``basis``."""
    c = split_coefficients(coefficients.to(basis.mean_shape.dtype))
    shape = face_shape(basis, c.id, c.exp)
    rotation = rotation_matrix(c.angle)
    world = shape @ rotation.transpose(1, 2) + c.trans[:, None, :]
    normals = vertex_normals(shape, basis.triangles) @ rotation.transpose(1, 2)
    albedo = face_albedo(basis, c.tex)
    colour = sh_lighting(normals, c.gamma) * albedo
    projected = project(world)
    return Assembled(world, normals, albedo, colour, projected, projected[:, basis.keypoints])


# --- Deep3DFaceRecon's alignment (align_img) ---------------------------------------------------------------


def pos_fit(
    landmarks: torch.Tensor, reference: np.ndarray | torch.Tensor = LM3D_STD
) -> tuple[torch.Tensor, torch.Tensor]:
    """``POS``: the least-squares affine camera (8 parameters: x = R1·X + tx, y = R2·X + ty) taking the
    standard 3D landmarks onto ``landmarks`` [F,5,2] (image pixels, **y up**: H − 1 − row); returns the
    translation t [F,2] and s = (‖R1‖ + ‖R2‖)/2 [F], float64. The two rows share one design matrix
    A = [X 1] (5×4), so the solution is its pseudo-inverse applied to each coordinate: the same numbers
    as ``numpy.linalg.lstsq`` on POS's 10×8 system, batched, with no solver call per face."""
    points = torch.as_tensor(landmarks).to(torch.float64)
    x3 = torch.as_tensor(np.array(reference), dtype=torch.float64).to(points.device)
    design = torch.cat([x3, torch.ones_like(x3[:, :1])], dim=1)  # [5,4]
    k = torch.linalg.pinv(design) @ points  # [F,4,2]: columns for x and y
    r1, r2 = k[:, :3, 0], k[:, :3, 1]
    scale = (torch.linalg.vector_norm(r1, dim=-1) + torch.linalg.vector_norm(r2, dim=-1)) / 2
    return k[:, 3, :], scale


@dataclass(frozen=True)
class Alignment:
    """One face's ``align_img``: the image (w0 × h0) resized to w × h (scale ``s`` = 102 / POS's s, sizes
    truncated as ``astype(int32)``), then cropped at (left, up), 224×224."""

    w0: int
    h0: int
    s: float
    w: int
    h: int
    left: int
    up: int

    def crop_to_image(self, xy: torch.Tensor) -> torch.Tensor:
        """Crop pixel coordinates (x right, **y up** as Deep3DFaceRecon's projections) → image pixel
        coordinates (x right, y down; pixel centres on whole numbers), through PIL's resize geometry."""
        column = xy[..., 0]
        row = (CROP - 1) - xy[..., 1]
        x = (column + self.left + 0.5) * (self.w0 / self.w) - 0.5
        y = (row + self.up + 0.5) * (self.h0 / self.h) - 0.5
        return torch.stack([x, y], -1)

    def image_to_crop(self, xy: torch.Tensor) -> torch.Tensor:
        """Image pixel coordinates (y down) → crop pixel coordinates (y down)."""
        x = (xy[..., 0] + 0.5) * (self.w / self.w0) - 0.5 - self.left
        y = (xy[..., 1] + 0.5) * (self.h / self.h0) - 0.5 - self.up
        return torch.stack([x, y], -1)


def alignments(landmarks: torch.Tensor, height: int, width: int) -> list[Alignment]:
    """``align_img``'s geometry for each face's 5 landmarks [F,5,2] (image pixels, y down)."""
    lm = torch.as_tensor(landmarks).to(torch.float64).clone()
    lm[..., 1] = height - 1 - lm[..., 1]
    t, s = pos_fit(lm)
    out = []
    for (tx, ty), scale in zip(t.tolist(), s.tolist(), strict=True):
        s2 = RESCALE / scale
        w, h = int(width * s2), int(height * s2)  # astype(np.int32): truncation towards zero
        left = int(w / 2 - CROP / 2 + (tx - width / 2) * s2)
        up = int(h / 2 - CROP / 2 + (height / 2 - ty) * s2)
        out.append(Alignment(width, height, s2, w, h, left, up))
    return out


def _bicubic(x: torch.Tensor) -> torch.Tensor:
    """PIL's bicubic kernel (a = −0.5)."""
    a = -0.5
    x = x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def resize_weights(size_in: int, size_out: int, first: int, count: int, device: torch.device) -> torch.Tensor:
    """Rows ``first … first + count − 1`` of PIL's bicubic resize of an axis from ``size_in`` to
    ``size_out`` samples, as a dense [count, size_in] float64 matrix (PIL's ``precompute_coeffs``: the
    kernel stretched by the scale when reducing, taps from int(centre − support + 0.5), normalised to sum
    1). Rows outside 0 … size_out − 1 are zero (PIL's crop fills outside the image with black)."""
    scale = size_in / size_out
    stretch = max(scale, 1.0)
    support = 2.0 * stretch
    out = torch.arange(first, first + count, dtype=torch.float64, device=device)
    centre = (out + 0.5) * scale
    lo = torch.trunc(centre - support + 0.5).clamp(min=0)
    hi = torch.trunc(centre + support + 0.5).clamp(max=size_in)
    j = torch.arange(size_in, dtype=torch.float64, device=device)
    weights = _bicubic((j[None, :] - centre[:, None] + 0.5) / stretch)
    weights = torch.where((j[None, :] >= lo[:, None]) & (j[None, :] < hi[:, None]), weights, torch.zeros_like(weights))
    total = weights.sum(1, keepdim=True)
    weights = torch.where(total != 0, weights / torch.where(total != 0, total, torch.ones_like(total)), weights)
    inside = (out >= 0) & (out < size_out)
    return weights * inside[:, None]


def align_crops(image: torch.Tensor, landmarks: torch.Tensor) -> tuple[torch.Tensor, list[Alignment]]:
    """``align_img`` for every face: the H×W×3 uint8 ``image`` resized by PIL's bicubic filter to w × h
    and cropped 224×224 at (left, up), computed directly as two separable weight matrices over the band
    of source pixels the crop needs, in PIL's order: the horizontal pass rounded to 8 bits, then the
    vertical one; then RGB /255 → [F,3,224,224] float32 in [0, 1] (the regressor's input), and each
    face's :class:`Alignment`."""
    height, width = image.shape[:2]
    found = alignments(landmarks, height, width)
    chw = image.permute(2, 0, 1).to(torch.float32)
    crops = []
    for a in found:
        wy = resize_weights(height, a.h, a.up, CROP, image.device)  # [224, H]
        wx = resize_weights(width, a.w, a.left, CROP, image.device)  # [224, W]
        rows = torch.nonzero(wy.any(0)).flatten()
        cols = torch.nonzero(wx.any(0)).flatten()
        if len(rows) == 0 or len(cols) == 0:
            crops.append(torch.zeros((3, CROP, CROP), dtype=torch.float32, device=image.device))
            continue
        r0, r1 = int(rows[0]), int(rows[-1]) + 1
        c0, c1 = int(cols[0]), int(cols[-1]) + 1
        band = chw[:, r0:r1, c0:c1]
        wy32, wx32 = wy[:, r0:r1].to(torch.float32), wx[:, c0:c1].to(torch.float32)
        rows_done = torch.floor(band @ wx32.T + 0.5).clamp_(0, 255)  # PIL: horizontal pass, 8-bit result
        crops.append(torch.floor(wy32 @ rows_done + 0.5).clamp_(0, 255))  # then the vertical pass
    return torch.stack(crops) / 255.0, found


# --- the face mesh: closed triangles, a metric frame, head pose ------------------------------------------------

# The corners where each hole of MediaPipe's mesh is split into two chains (upper and lower lid or lip):
# the eyes' corners and the inner mouth's.
HOLE_CORNERS = ((33, 133), (362, 263), (78, 308))


def close_holes(triangles: np.ndarray, corners: tuple[tuple[int, int], ...] = HOLE_CORNERS) -> np.ndarray:
    """``triangles`` [T,3] (an oriented disc with holes, as :func:`mesh_swap.mediapipe_triangles`) with
    every hole but the outline filled, no vertex added: each hole loop is split at its named corners (or
    at two opposite points) into two chains joined by a zig-zag strip of L − 2 triangles, oriented with
    the mesh. For MediaPipe's mesh: 852 + 14 + 14 + 18 = 898 triangles, a disc with one boundary (the
    outline): the photo's eyes and mouth are textured on the closing triangles.
    Build-time numpy; ``ValueError`` if the result is not a consistently oriented disc."""
    tris = np.asarray(triangles, dtype=np.int64).reshape(-1, 3)
    added = []
    for loop in mesh_swap.boundary_loops(tris)[1:]:
        polygon = [int(v) for v in loop[::-1]]  # the new faces run each boundary edge the other way
        n = len(polygon)
        pair = next((p for p in corners if p[0] in polygon and p[1] in polygon), None)
        first, second = (polygon.index(pair[0]), polygon.index(pair[1])) if pair else (0, n // 2)
        polygon = polygon[first:] + polygon[:first]
        second = (second - first) % n
        if n < 3 or second in (0,):
            raise ValueError("a hole's corners must be two different vertices of its loop")
        a = polygon[: second + 1]  # c0 … c1 forwards
        b = [polygon[0], *polygon[: second - 1 : -1]]  # c0 … c1 backwards
        k, m = len(a) - 2, len(b) - 2  # interior vertices of each chain
        if k < 1 or m < 1:  # a corner next to the other: fan from c0
            added += [(polygon[0], polygon[i], polygon[i + 1]) for i in range(1, n - 1)]
            continue
        strip = [(a[0], a[1], b[1])]
        i = j = 1
        while i < k or j < m:
            if i < k and (j >= m or i / k <= j / m):
                strip.append((a[i], a[i + 1], b[j]))
                i += 1
            else:
                strip.append((a[i], b[j + 1], b[j]))
                j += 1
        strip.append((a[k], a[k + 1], b[m]))
        added += strip
    closed = np.concatenate([tris, np.asarray(added, dtype=np.int64).reshape(-1, 3)])
    loops = mesh_swap.check_surface(closed)
    if len(loops) != 1:
        raise ValueError(f"closing the holes left {len(loops)} boundary loops, expected 1")
    return closed.astype(np.int32)


def face_mesh_triangles() -> np.ndarray:
    """MediaPipe's tessellation with the eyes and the mouth closed: [898, 3] int32 (build time)."""
    return close_holes(mesh_swap.mediapipe_triangles())


def mesh_five_points(points: torch.Tensor) -> torch.Tensor:
    """The five landmarks of face meshes [F,468,3] (any frame): eye centres (mean of each eye's corners),
    nose tip, mouth corners → [F,5,3]."""
    return torch.stack(
        [
            points[:, list(face_mesh.LEFT_EYE)].mean(1),
            points[:, list(face_mesh.RIGHT_EYE)].mean(1),
            points[:, face_mesh.NOSE_TIP],
            points[:, face_mesh.MOUTH[0]],
            points[:, face_mesh.MOUTH[1]],
        ],
        1,
    )


@dataclass(frozen=True)
class MeshFrame:
    """Face meshes in the metric frame: ``vertices`` [F,V,3] metres (x right, y up, z towards the camera),
    and how to go back to the image: x = cx + scale·X, y = cy − scale·Y (``centre`` [F,3] is cx, cy, cz
    in image pixels, ``scale`` [F] image pixels per metre)."""

    vertices: torch.Tensor
    centre: torch.Tensor
    scale: torch.Tensor


def mesh_frame(points: torch.Tensor) -> MeshFrame:
    """Face meshes [F,468,3] in image pixels (z in the same units, smaller = nearer) → :class:`MeshFrame`:
    centred on the points' centroid, (x, −y, −z) (a rotation by π about x: handedness and winding kept),
    scaled so the eye centres are INTER_OCULAR_M apart (their 3D distance, so turning the head does not
    shrink it)."""
    p = points.to(torch.float64)
    centre = p.mean(1)
    five = mesh_five_points(p)
    eyes = torch.linalg.vector_norm(five[:, 1] - five[:, 0], dim=-1).clamp_min(1e-6)
    scale = eyes / INTER_OCULAR_M  # image pixels per metre
    flip = torch.tensor([1.0, -1.0, -1.0], dtype=p.dtype, device=p.device)
    vertices = (p - centre[:, None]) * flip / scale[:, None, None]
    return MeshFrame(vertices.to(torch.float32), centre.to(torch.float32), scale.to(torch.float32))


def similarity_3d(source: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Umeyama's least-squares similarity taking ``source`` [K,3] (or [F,K,3]) onto ``target`` [F,K,3]:
    target ≈ s·R·source + t. Returns R [F,3,3] (a proper rotation), s [F], t [F,3], float64."""
    y = target.to(torch.float64)
    x = torch.as_tensor(source).to(device=y.device, dtype=torch.float64).expand_as(y)
    mx, my = x.mean(1, keepdim=True), y.mean(1, keepdim=True)
    xc, yc = x - mx, y - my
    cov = yc.transpose(1, 2) @ xc / x.shape[1]  # [F,3,3]
    u, d, vh = torch.linalg.svd(cov)
    sign = torch.sign(torch.linalg.det(u) * torch.linalg.det(vh))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    correction = torch.ones_like(d)
    correction[:, 2] = sign
    rotation = u @ torch.diag_embed(correction) @ vh
    variance = (xc**2).sum((1, 2)) / x.shape[1]
    scale = (d * correction).sum(1) / variance
    translation = my[:, 0] - scale[:, None] * (rotation @ mx[:, 0, :, None])[..., 0]
    return rotation, scale, translation


def head_pose(frame_points: torch.Tensor) -> torch.Tensor:
    """Head pose of face meshes in the metric frame [F,468,3]: the rotation of the similarity from
    Deep3DFaceRecon's standard 3D landmarks onto the mesh's five points, as (x, y, z) = (pitch, yaw, roll)
    radians [F,3] in Deep3DFaceRecon's convention (R = Rz·Ry·Rx)."""
    rotation, _, _ = similarity_3d(torch.from_numpy(np.array(LM3D_STD)), mesh_five_points(frame_points))
    return euler_angles(rotation)


# --- textures from the photo -------------------------------------------------------------------------------


@dataclass(frozen=True)
class PhotoTexture:
    """A texture cut from the photo: ``image`` [h,w,3] uint8 (on the input's device) and each vertex's
    ``uv`` [V,2] float32 (OBJ's convention: u = (x − x0 + 0.5)/width, v = 1 − (y − y0 + 0.5)/height of the
    vertex's image point in the cut; glTF writers flip v)."""

    image: torch.Tensor
    uv: torch.Tensor


def photo_texture(image: torch.Tensor, xy: torch.Tensor, max_side: int, margin: float = 0.05) -> PhotoTexture:
    """The part of the H×W×3 uint8 ``image`` under the vertices ``xy`` [V,2] (image pixels): their
    bounding box grown by ``margin`` of its size on each side, clipped to the image, reduced (antialiased
    bilinear) when its long side exceeds ``max_side``; the uv of each vertex in it."""
    height, width = image.shape[:2]
    lo, hi = xy.amin(0), xy.amax(0)
    grow = (hi - lo) * margin
    x0 = int(max(0, math.floor(float(lo[0] - grow[0]))))
    y0 = int(max(0, math.floor(float(lo[1] - grow[1]))))
    x1 = int(min(width, math.ceil(float(hi[0] + grow[0])) + 1))
    y1 = int(min(height, math.ceil(float(hi[1] + grow[1])) + 1))
    if x1 <= x0 or y1 <= y0:  # every vertex outside the image: a one-pixel texture at the nearest corner
        x0, y0 = min(max(x0, 0), width - 1), min(max(y0, 0), height - 1)
        x1, y1 = x0 + 1, y0 + 1
    cut = image[y0:y1, x0:x1]
    cw, ch = x1 - x0, y1 - y0
    uv = torch.stack([(xy[:, 0] - x0 + 0.5) / cw, 1.0 - (xy[:, 1] - y0 + 0.5) / ch], -1).to(torch.float32)
    reduce = max(cw, ch) / max_side
    if reduce > 1:
        size = (max(1, round(ch / reduce)), max(1, round(cw / reduce)))
        chw = cut.permute(2, 0, 1)[None].to(torch.float32)
        cut = F.interpolate(chw, size=size, mode="bilinear", antialias=True, align_corners=False)[0]
        cut = cut.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0)
    return PhotoTexture(cut.contiguous(), uv)


def sample_colours(image: torch.Tensor, xy: torch.Tensor) -> torch.Tensor:
    """The photo's colour at each point ``xy`` [V,2] (image pixels; bilinear, edge pixels outside) →
    [V,3] uint8."""
    height, width = image.shape[:2]
    chw = image.permute(2, 0, 1)[None].to(torch.float32)
    gx = xy[:, 0].to(torch.float32) * (2.0 / max(width - 1, 1)) - 1.0
    gy = xy[:, 1].to(torch.float32) * (2.0 / max(height - 1, 1)) - 1.0
    grid = torch.stack([gx, gy], -1).view(1, 1, -1, 2)
    out = F.grid_sample(chw, grid, mode="bilinear", padding_mode="border", align_corners=True)
    return out[0, :, 0].T.round().clamp(0, 255).to(torch.uint8)
