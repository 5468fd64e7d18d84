"""Client of the ``reconstruct_face`` pipeline (contract: :mod:`imgpipe.pipelines.reconstruct_face`), and the
body of ``imgpipe reconstruct`` (:func:`main`).

Each face comes back as one file: GLB and PLY as they are, OBJ as a ZIP of face.obj, face.mtl and face.png.
:meth:`ReconstructedFace.save` writes ``<stem>_face<i>.glb`` / ``.ply``, or extracts the OBJ into the folder
``<stem>_face<i>/`` (the three files side by side, so the OBJ's material and texture paths resolve).
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from imgpipe.clients.triton import InferenceError, TritonClient
from imgpipe.pipelines import reconstruct_face as contract

MODEL = contract.CONTRACT.model
FORMATS = contract.FORMATS
METHODS = contract.METHODS
SUFFIXES = {"glb": ".glb", "ply": ".ply", "obj": ""}  # obj: a folder per face


@dataclass(frozen=True)
class ReconstructedFace:
    index: int  # position in the response (detection order among the chosen faces)
    box: tuple[float, float, float, float]  # x, y, width, height in pixels of the original image
    pose: tuple[float, float, float]  # yaw, pitch, roll in degrees
    coefficients: tuple[float, ...]  # 3dmm: the 257; mesh: yaw, pitch, roll, scale, cx, cy
    mesh: bytes  # the file: GLB, PLY, or a ZIP of face.obj, face.mtl, face.png
    fmt: str

    def files(self) -> dict[str, bytes]:
        """The face's files by name: one for GLB and PLY, the ZIP's three members for OBJ."""
        if self.fmt != "obj":
            return {f"face{SUFFIXES[self.fmt]}": self.mesh}
        with zipfile.ZipFile(io.BytesIO(self.mesh)) as archive:
            names = [n for n in archive.namelist() if Path(n).name == n and n not in (".", "..")]  # no paths
            return {name: archive.read(name) for name in names}

    def save(self, folder: Path, stem: str) -> list[Path]:
        """Write the face's file(s) into ``folder``: ``<stem>_face<i>.glb|.ply``, or for OBJ the folder
        ``<stem>_face<i>/`` with face.obj, face.mtl and face.png. Returns the paths written."""
        name = f"{stem}_face{self.index}"
        folder.mkdir(parents=True, exist_ok=True)
        if self.fmt != "obj":
            path = folder / f"{name}{SUFFIXES[self.fmt]}"
            path.write_bytes(self.mesh)
            return [path]
        target = folder / name
        target.mkdir(parents=True, exist_ok=True)
        written = []
        for member, data in self.files().items():
            path = target / member
            path.write_bytes(data)
            written.append(path)
        return written

    def as_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "box": [round(v, 2) for v in self.box],
            "pose": {k: round(v, 3) for k, v in zip(("yaw", "pitch", "roll"), self.pose, strict=True)},
            "coefficients": [round(v, 6) for v in self.coefficients],
        }


@dataclass(frozen=True)
class Reconstruction:
    faces: list[ReconstructedFace]
    fmt: str
    method: str | None  # what was asked (None: the server's default)
    preview: bytes | None = None  # PNG, when asked for


def reconstruct_face(
    client: TritonClient,
    image: bytes,
    fmt: str = "glb",
    method: str | None = None,
    faces: str | int = "all",
    preview: bool = False,
) -> Reconstruction:
    """A textured 3D mesh of each chosen face of ``image``: ``fmt`` glb | obj | ply, ``method`` mesh | 3dmm
    (None: not sent, the server's manifest decides), ``faces`` all | largest | an index; ``preview`` asks
    for the PNG too. The server's refusals (no face, a bad parameter) raise :class:`InferenceError`
    (INVALID_ARGUMENT)."""
    parameters: dict[str, str | int | float | bool] = {"format": fmt, "faces": str(faces)}
    if method is not None:
        parameters["method"] = method
    names = [o.name for o in contract.CONTRACT.outputs if preview or not o.optional]
    out = client.infer(MODEL, {"IMAGE": np.array([image], dtype=object)}, names, parameters=parameters)
    meshes = out["MESH"].reshape(-1)
    boxes = out["BOXES"].reshape(-1, 4)
    poses = out["POSE"].reshape(-1, 3)
    coefficients = out["COEFFICIENTS"].reshape(len(meshes), -1)
    found = [
        ReconstructedFace(
            i,
            (float(x1), float(y1), float(x2 - x1), float(y2 - y1)),
            (float(p[0]), float(p[1]), float(p[2])),
            tuple(float(v) for v in c),
            bytes(mesh),
            fmt,
        )
        for i, (mesh, (x1, y1, x2, y2), p, c) in enumerate(zip(meshes, boxes, poses, coefficients, strict=True))
    ]
    picture = bytes(out["PREVIEW"].reshape(-1)[0]) if preview else None
    return Reconstruction(found, fmt, method, picture)


def save_reconstruction(result: Reconstruction, folder: Path, stem: str) -> list[Path]:
    """Every face's file(s), ``<stem>.json`` (boxes, poses, coefficients, file names) and, when present,
    ``<stem>_preview.png``."""
    written: list[Path] = []
    entries = []
    for face in result.faces:
        paths = face.save(folder, stem)
        written += paths
        entries.append({**face.as_json(), "files": [str(p.relative_to(folder)) for p in paths]})
    if result.preview is not None:
        path = folder / f"{stem}_preview.png"
        path.write_bytes(result.preview)
        written.append(path)
    summary = folder / f"{stem}.json"
    summary.write_text(json.dumps({"format": result.fmt, "method": result.method, "faces": entries}, indent=1))
    written.append(summary)
    return written


def reconstruct_files(
    client: TritonClient,
    images: Sequence[Path],
    folder: Path,
    fmt: str = "glb",
    method: str | None = None,
    faces: str | int = "all",
    preview: bool = False,
    concurrency: int = 2,
    progress: Any = None,
) -> tuple[dict[Path, list[Path]], list[tuple[Path, str]]]:
    """Send every image, save its results under ``folder`` (:func:`save_reconstruction`, stem = the image's
    name without suffix). ``progress(path)`` is called after each image. Returns ({image: files written},
    [(image, error)])."""
    written: dict[Path, list[Path]] = {}
    failed: list[tuple[Path, str]] = []
    folder.mkdir(parents=True, exist_ok=True)

    def one(path: Path) -> list[Path]:
        result = reconstruct_face(client, path.read_bytes(), fmt=fmt, method=method, faces=faces, preview=preview)
        return save_reconstruction(result, folder, path.stem)

    with ThreadPoolExecutor(max(1, concurrency)) as pool:
        futures = {pool.submit(one, p): p for p in images}
        for future in as_completed(futures):
            path = futures[future]
            try:
                written[path] = future.result()
            except InferenceError as exc:
                failed.append((path, f"{exc.status}: {exc.message}"))
            except OSError as exc:
                failed.append((path, str(exc)))
            if progress is not None:
                progress(path)
    return written, failed


def main(
    images: Sequence[Path],
    output: Path,
    fmt: str = "glb",
    method: str | None = None,
    faces: str = "all",
    preview: bool = False,
    url: str | None = None,
    protocol: str = "grpc",
    concurrency: int = 2,
    console: Any = None,
    err: Any = None,
) -> int:
    """``imgpipe reconstruct IMAGE… -o DIR``: a Rich progress bar over the images, a table of the faces,
    the errors; returns the exit status (1 when an image failed or an option is wrong)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from imgpipe.clients.triton import check_protocol

    console = console or Console()
    err = err or Console(stderr=True)
    fmt = fmt.strip().lower()
    problems = []
    if fmt not in FORMATS:
        problems.append(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if method is not None and method.strip().lower() not in METHODS:
        problems.append(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    try:
        check_protocol(protocol)
    except ValueError as exc:
        problems.append(str(exc))
    if problems:
        for line in problems:
            err.print(f"[bold red]error:[/] {line}", highlight=False)
        return 1
    columns = (TextColumn("reconstruct"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with TritonClient(url, protocol) as client, Progress(*columns, console=console, disable=len(images) < 2) as bar:  # type: ignore[arg-type]
        task = bar.add_task("images", total=len(images))
        written, failed = reconstruct_files(
            client, images, output, fmt, method and method.strip().lower(), faces, preview, concurrency,
            progress=lambda _path: bar.advance(task),
        )  # fmt: skip
    table = Table(title=f"3D faces ({fmt}) in {output}")
    for column in ("image", "face", "yaw°", "pitch°", "roll°", "file"):
        table.add_column(column)
    for image in images:
        if image not in written:
            continue
        summary = json.loads((output / f"{image.stem}.json").read_text())
        for face in summary["faces"]:
            pose = face["pose"]
            table.add_row(image.name, str(face["index"]), f"{pose['yaw']:.1f}", f"{pose['pitch']:.1f}",
                          f"{pose['roll']:.1f}", ", ".join(face["files"]))  # fmt: skip
    console.print(table)
    for image, message in failed:
        err.print(f"[red]{image}[/]: {message}", highlight=False)
    return 1 if failed else 0
