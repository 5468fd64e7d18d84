"""Mesh files for reconstruct_face: binary glTF 2.0 (GLB), OBJ + MTL + PNG (one ZIP), binary PLY.

Written here with numpy, struct, zipfile and Pillow (already in the serving image) rather than through a
mesh library: the three layouts are small and fully specified, and the files then do not depend on
which optional packages the server has. The tests read every file back with independent readers
(trimesh and pygltflib where installed, and their own GLB/PLY parsers).

Coordinates are metres, x right, y up, z towards the viewer (glTF's convention: +y up, the camera of an
unposed scene looks along −z). Triangles are counter-clockwise seen from the front (glTF's front face),
so normals point out of the face. ``uv`` follow OBJ (origin at the texture's bottom-left); glTF's origin is
the top-left, so the GLB writer stores (u, 1 − v).
"""

from __future__ import annotations

import io
import json
import struct
import zipfile
from dataclasses import dataclass

import numpy as np

from imgpipe.imaging import encode_png

FORMATS = ("glb", "obj", "ply")
SUFFIXES = {"glb": ".glb", "obj": ".zip", "ply": ".ply"}
OBJ_FILES = ("face.obj", "face.mtl", "face.png")  # the members of an OBJ result's ZIP
MEDIA_TYPES = {"glb": "model/gltf-binary", "obj": "application/zip", "ply": "application/octet-stream"}

# glTF constants
_FLOAT, _USHORT, _UINT = 5126, 5123, 5125
_ARRAY_BUFFER, _ELEMENT_ARRAY_BUFFER = 34962, 34963
_LINEAR, _CLAMP_TO_EDGE = 9729, 33071
_GLB_MAGIC, _CHUNK_JSON, _CHUNK_BIN = 0x46546C67, 0x4E4F534A, 0x004E4942


@dataclass(frozen=True)
class FaceMesh:
    """One face's mesh, on the host: ``vertices`` [V,3] float32 (metres), ``triangles`` [T,3] (0-based,
    counter-clockwise from the front), ``normals`` [V,3], ``uv`` [V,2] (OBJ convention) into ``texture``
    [h,w,3] uint8, ``colours`` [V,3] uint8 (PLY's vertex colours), ``comment`` (one line: what made it)."""

    vertices: np.ndarray
    triangles: np.ndarray
    normals: np.ndarray
    uv: np.ndarray
    texture: np.ndarray
    colours: np.ndarray
    comment: str = ""

    def __post_init__(self) -> None:
        v = len(self.vertices)
        shapes = {
            "vertices": (self.vertices.shape, (v, 3)),
            "normals": (self.normals.shape, (v, 3)),
            "uv": (self.uv.shape, (v, 2)),
            "colours": (self.colours.shape, (v, 3)),
        }
        for name, (got, want) in shapes.items():
            if tuple(got) != want:
                raise ValueError(f"FaceMesh.{name}: shape {tuple(got)}, expected {want}")
        tri = np.asarray(self.triangles)
        if tri.ndim != 2 or tri.shape[1] != 3 or (tri.size and (tri.min() < 0 or tri.max() >= v)):
            raise ValueError(f"FaceMesh.triangles: [T, 3] indices of the {v} vertices expected")
        if self.texture.ndim != 3 or self.texture.shape[2] != 3 or self.texture.dtype != np.uint8:
            raise ValueError("FaceMesh.texture: an h×w×3 uint8 image expected")


def encode_mesh(mesh: FaceMesh, fmt: str) -> bytes:
    """``mesh`` as a ``glb``, ``obj`` (ZIP of face.obj, face.mtl, face.png) or ``ply`` file."""
    if fmt == "glb":
        return to_glb(mesh)
    if fmt == "obj":
        return to_obj_zip(mesh)
    if fmt == "ply":
        return to_ply(mesh)
    raise ValueError(f"unknown mesh format {fmt!r}: expected one of {', '.join(FORMATS)}")


def _pad(data: bytes, fill: bytes) -> bytes:
    return data + fill * (-len(data) % 4)


def to_glb(mesh: FaceMesh) -> bytes:
    """Binary glTF 2.0: one node, one mesh, one triangle primitive (POSITION, NORMAL, TEXCOORD_0, indices),
    an unlit-looking PBR material (metallic 0, roughness 1) whose base colour is the texture (PNG inside
    the file), clamped and bilinear."""
    positions = np.ascontiguousarray(mesh.vertices, dtype="<f4")
    normals = np.ascontiguousarray(mesh.normals, dtype="<f4")
    uv = np.ascontiguousarray(np.stack([mesh.uv[:, 0], 1.0 - mesh.uv[:, 1]], 1), dtype="<f4")
    index_type = "<u2" if len(positions) <= 0xFFFF else "<u4"
    indices = np.ascontiguousarray(mesh.triangles, dtype=index_type).reshape(-1)
    png = encode_png(mesh.texture)

    binary = bytearray()
    views: list[dict[str, int]] = []

    def add(data: bytes, target: int | None = None) -> int:
        binary.extend(b"\0" * (-len(binary) % 4))
        view = {"buffer": 0, "byteOffset": len(binary), "byteLength": len(data)}
        if target is not None:
            view["target"] = target
        views.append(view)
        binary.extend(data)
        return len(views) - 1

    accessors = [
        {
            "bufferView": add(positions.tobytes(), _ARRAY_BUFFER),
            "componentType": _FLOAT,
            "count": len(positions),
            "type": "VEC3",
            "min": positions.min(0).tolist() if len(positions) else [0.0] * 3,
            "max": positions.max(0).tolist() if len(positions) else [0.0] * 3,
        },
        {"bufferView": add(normals.tobytes(), _ARRAY_BUFFER), "componentType": _FLOAT, "count": len(normals),
         "type": "VEC3"},
        {"bufferView": add(uv.tobytes(), _ARRAY_BUFFER), "componentType": _FLOAT, "count": len(uv), "type": "VEC2"},
        {"bufferView": add(indices.tobytes(), _ELEMENT_ARRAY_BUFFER),
         "componentType": _USHORT if index_type == "<u2" else _UINT, "count": len(indices), "type": "SCALAR"},
    ]  # fmt: skip
    image_view = add(png)
    binary.extend(b"\0" * (-len(binary) % 4))
    document = {
        "asset": {"version": "2.0", "generator": "imgpipe reconstruct_face"},
        "scene": 0,
        "scenes": [{"nodes": [0]}],
        "nodes": [{"mesh": 0, "name": "face"}],
        "meshes": [
            {
                "name": "face",
                "primitives": [
                    {
                        "attributes": {"POSITION": 0, "NORMAL": 1, "TEXCOORD_0": 2},
                        "indices": 3,
                        "material": 0,
                        "mode": 4,
                    }
                ],
                **({"extras": {"comment": mesh.comment}} if mesh.comment else {}),
            }
        ],
        "materials": [
            {
                "name": "face",
                "pbrMetallicRoughness": {
                    "baseColorTexture": {"index": 0},
                    "metallicFactor": 0.0,
                    "roughnessFactor": 1.0,
                },
                "doubleSided": True,
            }
        ],
        "textures": [{"source": 0, "sampler": 0}],
        "images": [{"bufferView": image_view, "mimeType": "image/png"}],
        "samplers": [{"magFilter": _LINEAR, "minFilter": _LINEAR, "wrapS": _CLAMP_TO_EDGE, "wrapT": _CLAMP_TO_EDGE}],
        "accessors": accessors,
        "bufferViews": views,
        "buffers": [{"byteLength": len(binary)}],
    }
    text = _pad(json.dumps(document, separators=(",", ":")).encode("utf-8"), b" ")
    body = bytes(binary)
    total = 12 + 8 + len(text) + 8 + len(body)
    return b"".join(
        [
            struct.pack("<III", _GLB_MAGIC, 2, total),
            struct.pack("<II", len(text), _CHUNK_JSON),
            text,
            struct.pack("<II", len(body), _CHUNK_BIN),
            body,
        ]
    )


def _rows(array: np.ndarray, prefix: str, digits: int) -> str:
    if not len(array):
        return ""
    fmt = " ".join([f"%.{digits}f"] * array.shape[1])
    return "\n".join(prefix + " " + fmt % tuple(row) for row in array.tolist()) + "\n"


def to_obj(mesh: FaceMesh, material: str = OBJ_FILES[1], texture: str = OBJ_FILES[2]) -> tuple[str, str]:
    """Wavefront OBJ text (v, vt, vn; faces a/a/a, 1-based) and its MTL (map_Kd ``texture``)."""
    faces = np.asarray(mesh.triangles, dtype=np.int64) + 1
    head = "".join(f"# {line}\n" for line in (mesh.comment or "imgpipe reconstruct_face").splitlines())
    obj = (
        head
        + f"mtllib {material}\no face\n"
        + _rows(mesh.vertices, "v", 6)
        + _rows(mesh.uv, "vt", 6)
        + _rows(mesh.normals, "vn", 5)
        + "usemtl face\ns 1\n"
        + "".join(f"f {a}/{a}/{a} {b}/{b}/{b} {c}/{c}/{c}\n" for a, b, c in faces.tolist())
    )
    mtl = f"newmtl face\nKa 1 1 1\nKd 1 1 1\nKs 0 0 0\nd 1\nillum 1\nmap_Kd {texture}\n"
    return obj, mtl


def to_obj_zip(mesh: FaceMesh) -> bytes:
    """A ZIP of face.obj, face.mtl and face.png: the OBJ names the MTL, the MTL the PNG, all side by side
    (extract it into a folder and open face.obj)."""
    obj, mtl = to_obj(mesh)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(OBJ_FILES[0], obj, compress_type=zipfile.ZIP_DEFLATED, compresslevel=1)
        archive.writestr(OBJ_FILES[1], mtl, compress_type=zipfile.ZIP_DEFLATED)
        archive.writestr(OBJ_FILES[2], encode_png(mesh.texture), compress_type=zipfile.ZIP_STORED)
    return buffer.getvalue()


PLY_VERTEX = np.dtype(
    [("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("nx", "<f4"), ("ny", "<f4"), ("nz", "<f4"),
     ("red", "u1"), ("green", "u1"), ("blue", "u1")]
)  # fmt: skip
PLY_FACE = np.dtype([("count", "u1"), ("indices", "<i4", (3,))])


def to_ply(mesh: FaceMesh) -> bytes:
    """Binary little-endian PLY: vertices with normals and colours (uchar RGB), triangles as
    ``list uchar int vertex_indices``."""
    vertices = np.zeros(len(mesh.vertices), dtype=PLY_VERTEX)
    for i, axis in enumerate("xyz"):
        vertices[axis] = mesh.vertices[:, i]
        vertices[f"n{axis}"] = mesh.normals[:, i]
    for i, channel in enumerate(("red", "green", "blue")):
        vertices[channel] = mesh.colours[:, i]
    faces = np.zeros(len(mesh.triangles), dtype=PLY_FACE)
    faces["count"] = 3
    faces["indices"] = mesh.triangles
    comments = "".join(f"comment {line}\n" for line in (mesh.comment or "imgpipe reconstruct_face").splitlines())
    header = (
        "ply\nformat binary_little_endian 1.0\n"
        + comments
        + f"element vertex {len(vertices)}\n"
        + "".join(f"property float {n}\n" for n in ("x", "y", "z", "nx", "ny", "nz"))
        + "".join(f"property uchar {n}\n" for n in ("red", "green", "blue"))
        + f"element face {len(faces)}\nproperty list uchar int vertex_indices\nend_header\n"
    )
    return header.encode("ascii", "replace") + vertices.tobytes() + faces.tobytes()
