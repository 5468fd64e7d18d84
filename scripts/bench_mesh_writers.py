"""Side by side: reconstruct_face's own mesh writers (imgpipe.ensembles.face3d_io) against trimesh's
exporters, on one face-mesh-sized mesh (468 vertices, 898 triangles, a 512² texture).

    .venv/bin/python scripts/bench_mesh_writers.py
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import trimesh
from PIL import Image

from imgpipe.ensembles import face3d_io
from imgpipe.ensembles.face3d import face_mesh_triangles


def main(repeats: int = 20) -> None:
    rng = np.random.default_rng(0)
    triangles = face_mesh_triangles().astype(np.int32)
    vertices = rng.normal(size=(468, 3)).astype(np.float32)
    normals = (vertices / np.linalg.norm(vertices, axis=1, keepdims=True)).astype(np.float32)
    uv = rng.uniform(size=(468, 2)).astype(np.float32)
    texture = rng.integers(0, 255, (512, 512, 3), dtype=np.uint8)
    colours = rng.integers(0, 255, (468, 3), dtype=np.uint8)
    mesh = face3d_io.FaceMesh(vertices, triangles, normals, uv, texture, colours)

    def trimesh_glb() -> bytes:
        visual = trimesh.visual.TextureVisuals(uv=uv, image=Image.fromarray(texture))
        return trimesh.Trimesh(vertices, triangles, vertex_normals=normals, visual=visual, process=False).export(
            file_type="glb"
        )

    def trimesh_ply() -> bytes:
        return trimesh.Trimesh(vertices, triangles, vertex_colors=colours, process=False).export(file_type="ply")

    writers: dict[str, Callable[[], bytes]] = {
        "glb imgpipe": lambda: face3d_io.to_glb(mesh),
        "glb trimesh": trimesh_glb,
        "ply imgpipe": lambda: face3d_io.to_ply(mesh),
        "ply trimesh": trimesh_ply,
    }
    for name, write in writers.items():
        write()
        start = time.perf_counter()
        for _ in range(repeats):
            data = write()
        print(f"{name}: {(time.perf_counter() - start) / repeats * 1000:.2f} ms, {len(data)} bytes")


if __name__ == "__main__":
    main()
