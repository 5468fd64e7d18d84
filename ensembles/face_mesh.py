"""MediaPipe's face mesh (the 468-point face landmark network) on faces found by any detector.

MediaPipe's face landmark graph (``face_landmark_front_cpu``) runs the network on a square region of
interest around each detection: the detection's box, rotated so the eyes are level
(``DetectionsToRectsCalculator``, rotation from keypoint 0 → 1, i.e. the eye on the image's left to the
one on its right for an upright face), enlarged 1.5× and squared on its long side
(``RectTransformationCalculator``: scale 1.5, ``square_long``), cut out at 192×192, RGB in [0, 1]
(``ImageToTensorCalculator``). The network's 1404 values are 468 (x, y, z) in crop pixels; they are
projected back through the same rotation and scale (``LandmarkProjectionCalculator``), z with the x
scale (MediaPipe: z in the units of x, smaller = nearer the camera). The second output is the logit
of "a face is in the crop".

Everything here is torch on the tensors' device (CPU or CUDA): the crops for all faces are one
``grid_sample``, the projection one batched matrix product. Image coordinates are pixel indices (pixel
centres on whole numbers), as the detectors' boxes and landmarks and :mod:`face_geometry` use them; the
network's outputs are continuous crop coordinates (pixel i spans [i, i + 1]), shifted by half a pixel.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import torch

from imgpipe.ensembles import face_geometry as geo
from imgpipe.ensembles.mtcnn import Faces

INPUT_SIZE = 192
ROI_SCALE = 1.5
POINTS = 468

# Indices into the 468 points used to relate the mesh to the detectors' 5-point layout
# (MediaPipe's canonical face mesh: eye corners 33/133 and 362/263, nose tip 1, mouth corners 61/291;
# "left"/"right" as they appear on the image for an upright, frontal face).
LEFT_EYE = (33, 133)
RIGHT_EYE = (362, 263)
NOSE_TIP = 1
MOUTH = (61, 291)

Run = Callable[..., Awaitable[tuple[torch.Tensor, ...]]]


@dataclass(frozen=True)
class Meshes:
    """Face meshes of one image: ``points`` [F,468,3] float32 (x, y in image pixels, z in the same
    units, smaller towards the camera) and ``presence`` [F] in [0, 1] (the network's face flag)."""

    points: torch.Tensor
    presence: torch.Tensor

    def __len__(self) -> int:
        return int(self.points.shape[0])

    def five_points(self) -> torch.Tensor:
        """The detectors' 5-point layout [F,5,2] taken from the mesh (eye centres, nose tip, mouth corners)."""
        p = self.points[..., :2]
        return torch.stack(
            [
                p[:, list(LEFT_EYE)].mean(1),
                p[:, list(RIGHT_EYE)].mean(1),
                p[:, NOSE_TIP],
                p[:, MOUTH[0]],
                p[:, MOUTH[1]],
            ],
            1,
        )


def roi_matrices(faces: Faces, size: int = INPUT_SIZE, scale: float = ROI_SCALE) -> torch.Tensor:
    """Image → crop similarity [F,2,3] float64 (pixel indices on both sides) of each face's region of
    interest: centred on its box, rotated so its eyes are level, side ``scale`` × the box's long side,
    mapped onto ``size``×``size``."""
    boxes = faces.boxes.to(torch.float64)
    eyes = faces.landmarks.to(torch.float64)[:, :2]
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    side = (boxes[:, 2:] - boxes[:, :2]).amax(1).clamp_min(1.0) * scale
    delta = eyes[:, 1] - eyes[:, 0]
    angle = torch.atan2(delta[:, 1], delta[:, 0])  # the eye line's tilt; the crop turns it level
    k = size / side
    cos, sin = torch.cos(angle) * k, torch.sin(angle) * k
    # crop = k·R(−angle)·(p − centre) + c, c the crop's centre in pixel indices
    c = size / 2 - 0.5
    tx = c - (cos * centre[:, 0] + sin * centre[:, 1])
    ty = c - (-sin * centre[:, 0] + cos * centre[:, 1])
    return torch.stack([torch.stack([cos, sin, tx], -1), torch.stack([-sin, cos, ty], -1)], -2)


def crops(image: torch.Tensor, matrices: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """The network input for every face: [F,size,size,3] float32 RGB in [0, 1] (NHWC), from the H×W×3
    uint8 ``image``; pixels outside the image are black (as MediaPipe's zero border)."""
    chw = image.permute(2, 0, 1).to(torch.float32)
    out = geo.warp(chw, matrices, size)  # [F,3,size,size]
    return (out / 255.0).clamp_(0, 1).permute(0, 2, 3, 1).contiguous()


def project(raw: torch.Tensor, flag: torch.Tensor, matrices: torch.Tensor, size: int = INPUT_SIZE) -> Meshes:
    """The network's outputs (1404 values per face in crop pixels, and the face-flag logit) → meshes in
    image pixels, through the inverse of each face's ROI matrix; z scaled like x."""
    points = raw.reshape(len(raw), POINTS, 3).to(torch.float64)
    inverse = geo.invert(matrices.to(points.device))  # [F,2,3]
    xy = (points[..., :2] - 0.5) @ inverse[:, :, :2].transpose(1, 2) + inverse[:, None, :, 2]
    z = points[..., 2:] / (matrices[:, 0, :2].norm(dim=-1).to(points.device)[:, None, None])
    del size  # the crop size is in the matrices; kept in the signature for symmetry with crops()
    presence = torch.sigmoid(flag.reshape(len(flag), -1)[:, 0].to(torch.float32))
    return Meshes(torch.cat([xy, z], -1).to(torch.float32), presence)


async def find_meshes(image: torch.Tensor, faces: Faces, run: Run, role: str = "mesh") -> Meshes:
    """The face mesh of every face in ``faces`` (found in the H×W×3 uint8 ``image``), all faces in one
    batch of the network (``run(role, crops)`` → raw points, face flag)."""
    if len(faces) == 0:
        return Meshes(
            torch.zeros((0, POINTS, 3), dtype=torch.float32, device=image.device),
            torch.zeros((0,), dtype=torch.float32, device=image.device),
        )
    matrices = roi_matrices(faces.to(image.device))
    raw, flag = await run(role, crops(image, matrices))
    return project(raw.to(image.device), flag.to(image.device), matrices)
