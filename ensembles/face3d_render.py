"""A small z-buffer rasterizer in torch for reconstruct_face's PREVIEW: shaded views of a face mesh.

No display, no OpenGL: triangles are rasterised on the tensors' device (CPU or CUDA). Each triangle's
bounding box is enumerated as candidate pixels in flat tensors (chunked), barycentric coordinates decide
coverage (pixel centres on whole numbers), and the nearest surface wins through one ``scatter_reduce``
over a key that packs the quantised depth above the triangle's index. Views are orthographic: the mesh
(metres, y up, z towards the viewer) turned about the vertical axis, framed so every turn fits. Shading is
Lambert from a light above and to the right of the viewer, plus an ambient term; the surface colour is the
photo texture through the uv, or the vertex colours.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.nn import functional as F

CHUNK = 1 << 21  # candidate pixels per pass
DEPTH_LEVELS = (1 << 20) - 1
LIGHT = (0.3, 0.35, 1.0)  # towards the light, view coordinates (x right, y up, z towards the viewer)
AMBIENT = 0.35
BACKGROUND = (38, 40, 46)
BOX_COLOUR = (255, 140, 0)
VIEWS = (0.0, 45.0)  # degrees about the vertical axis: the front, and turned so the face looks to the image's right
MAX_FACES = 8  # faces drawn in one preview (the first ones of the response)


def rasterize(
    xy: torch.Tensor, depth: torch.Tensor, triangles: torch.Tensor, height: int, width: int, chunk: int = CHUNK
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each pixel of a height×width image, the nearest triangle covering it and its barycentric
    coordinates: ([H,W] long, −1 where none; [H,W,3] float32). ``xy`` [V,2] are pixel coordinates (x
    right, y down, pixel centres on whole numbers), ``depth`` [V] larger = nearer, ``triangles`` [T,3]."""
    device = xy.device
    count = int(triangles.shape[0])
    p = xy.to(torch.float64)
    corners = p[triangles]  # [T,3,2]
    a, b, c = corners[:, 0], corners[:, 1], corners[:, 2]
    area2 = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0])
    valid = area2.abs() > 1e-12
    x0 = torch.ceil(corners[..., 0].amin(1) - 1e-9).clamp(min=0)
    x1 = torch.floor(corners[..., 0].amax(1) + 1e-9).clamp(max=width - 1)
    y0 = torch.ceil(corners[..., 1].amin(1) - 1e-9).clamp(min=0)
    y1 = torch.floor(corners[..., 1].amax(1) + 1e-9).clamp(max=height - 1)
    bw = (x1 - x0 + 1).clamp(min=0).to(torch.long)
    bh = (y1 - y0 + 1).clamp(min=0).to(torch.long)
    sizes = torch.where(valid, bw * bh, torch.zeros_like(bw))
    z = depth.to(torch.float64)
    z_lo, z_hi = z.min(), z.max()
    z_span = (z_hi - z_lo).clamp_min(1e-12)
    keys = torch.full((height * width,), -1, dtype=torch.long, device=device)
    ends = torch.cumsum(sizes, 0).cpu().numpy()  # a host read: the passes' sizes
    begin = 0
    while begin < count:
        done = int(ends[begin - 1]) if begin else 0
        stop = max(int(np.searchsorted(ends, done + chunk, side="right")), begin + 1)
        total = int(ends[stop - 1]) - done
        if total:
            span = sizes[begin:stop]
            tri = torch.repeat_interleave(torch.arange(begin, stop, device=device), span, output_size=total)
            local = torch.arange(total, device=device) - (torch.cumsum(span, 0) - span)[tri - begin]
            px = x0[tri] + (local % bw[tri]).to(torch.float64)
            py = y0[tri] + torch.div(local, bw[tri], rounding_mode="floor").to(torch.float64)
            lam = _barycentric(corners[tri], area2[tri], px, py)
            inside = (lam >= -1e-9).all(1)
            zz = (lam * z[triangles[tri]]).sum(1)
            level = ((zz - z_lo) / z_span * DEPTH_LEVELS).round().clamp(0, DEPTH_LEVELS).to(torch.long)
            key = level * count + tri
            pixel = py.to(torch.long) * width + px.to(torch.long)
            keys.scatter_reduce_(0, pixel[inside], key[inside], reduce="amax")
        begin = stop
    covered = keys >= 0
    triangle = torch.where(covered, keys % max(count, 1), keys)
    bary = torch.zeros((height * width, 3), dtype=torch.float32, device=device)
    index = torch.nonzero(covered).flatten()
    if len(index):
        tri = triangle[index]
        px = (index % width).to(torch.float64)
        py = torch.div(index, width, rounding_mode="floor").to(torch.float64)
        bary[index] = _barycentric(corners[tri], area2[tri], px, py).clamp(0, 1).to(torch.float32)
    return triangle.view(height, width), bary.view(height, width, 3)


def _barycentric(corners: torch.Tensor, area2: torch.Tensor, px: torch.Tensor, py: torch.Tensor) -> torch.Tensor:
    """Barycentric coordinates [K,3] of the points (px, py) in the triangles ``corners`` [K,3,2]."""
    a, b, c = corners[:, 0], corners[:, 1], corners[:, 2]

    def cross(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return (u[:, 0] - px) * (v[:, 1] - py) - (u[:, 1] - py) * (v[:, 0] - px)

    l0 = cross(b, c) / area2
    l1 = cross(c, a) / area2
    return torch.stack([l0, l1, 1.0 - l0 - l1], 1)


def _turn(yaw_degrees: float, device: torch.device) -> torch.Tensor:
    t = math.radians(yaw_degrees)
    return torch.tensor(
        [[math.cos(t), 0.0, math.sin(t)], [0.0, 1.0, 0.0], [-math.sin(t), 0.0, math.cos(t)]],
        dtype=torch.float32,
        device=device,
    )


def render_view(
    vertices: torch.Tensor,
    normals: torch.Tensor,
    triangles: torch.Tensor,
    size: int,
    yaw_degrees: float = 0.0,
    colours: torch.Tensor | None = None,
    uv: torch.Tensor | None = None,
    texture: torch.Tensor | None = None,
) -> torch.Tensor:
    """The mesh (metres, y up, z towards the viewer) turned by ``yaw_degrees`` about the vertical axis
    through its centre, drawn orthographically into a size×size image, shaded; surface colour from
    ``texture`` [h,w,3] uint8 through ``uv`` [V,2] (OBJ convention) when given, else ``colours`` [V,3]
    (uint8 or 0..1 float), else grey. Framed by the mesh's bounding sphere, so every turn of it has the
    same scale. Returns [size,size,3] uint8 on the vertices' device."""
    device = vertices.device
    v = vertices.to(torch.float32)
    centre = (v.amax(0) + v.amin(0)) / 2
    radius = float((v - centre).norm(dim=1).max().clamp_min(1e-9))
    turn = _turn(yaw_degrees, device)
    view = (v - centre) @ turn.T
    n = F.normalize(normals.to(torch.float32) @ turn.T, dim=-1)
    k = (size / 2 - 1) / radius
    xy = torch.stack([view[:, 0] * k + (size - 1) / 2, (size - 1) / 2 - view[:, 1] * k], -1)
    triangle, bary = rasterize(xy, view[:, 2], triangles, size, size)
    covered = triangle >= 0
    tri = triangles[triangle.clamp(min=0)]  # [H,W,3]
    normal = F.normalize((bary[..., None] * n[tri]).sum(2), dim=-1)
    normal = torch.where(normal[..., 2:3] < 0, -normal, normal)  # a back face seen at the edge: light it as a front
    light = F.normalize(torch.tensor(LIGHT, device=device), dim=0)
    shade = AMBIENT + (1 - AMBIENT) * (normal @ light).clamp(min=0)
    if texture is not None and uv is not None:
        st = (bary[..., None] * uv.to(torch.float32)[tri]).sum(2)  # [H,W,2]
        grid = torch.stack([st[..., 0] * 2 - 1, (1 - st[..., 1]) * 2 - 1], -1)[None]
        tex = texture.permute(2, 0, 1)[None].to(device=device, dtype=torch.float32) / 255.0
        albedo = F.grid_sample(tex, grid, mode="bilinear", padding_mode="border", align_corners=False)[0]
        albedo = albedo.permute(1, 2, 0)
    elif colours is not None:
        c = colours.to(torch.float32)
        c = c / 255.0 if colours.dtype == torch.uint8 else c
        albedo = (bary[..., None] * c[tri]).sum(2)
    else:
        albedo = torch.full((size, size, 3), 0.75, device=device)
    pixels = (albedo.clamp(0, 1) * shade[..., None] * 255.0).round()
    background = torch.tensor(BACKGROUND, dtype=torch.float32, device=device)
    return torch.where(covered[..., None], pixels, background).to(torch.uint8)


def compose(image: np.ndarray, boxes: np.ndarray, views: list[list[np.ndarray]], size: int) -> np.ndarray:
    """The preview: the input (scaled to the views' height, the faces' boxes drawn and numbered) on the
    left, then one row per face with its views, left to right. ``views`` [F][k] are size×size×3 uint8."""
    rows = max(1, len(views))
    height = size * rows
    picture = Image.fromarray(image).convert("RGB")
    ratio = height / picture.height
    picture = picture.resize((max(1, round(picture.width * ratio)), height), Image.BILINEAR)
    pen = ImageDraw.Draw(picture)
    line = max(1, round(height / 256))
    for i, (x1, y1, x2, y2) in enumerate(np.asarray(boxes, dtype=np.float64)[:rows].tolist()):
        box = [x1 * ratio, y1 * ratio, x2 * ratio, y2 * ratio]
        pen.rectangle(box, outline=BOX_COLOUR, width=line)
        pen.text((box[0] + 2 * line, box[1] + line), str(i), fill=BOX_COLOUR)
    columns = max((len(v) for v in views), default=0)
    canvas = Image.new("RGB", (picture.width + columns * size, height), BACKGROUND)
    canvas.paste(picture, (0, 0))
    for r, row in enumerate(views):
        for c, view in enumerate(row):
            canvas.paste(Image.fromarray(view), (picture.width + c * size, r * size))
    return np.asarray(canvas)
