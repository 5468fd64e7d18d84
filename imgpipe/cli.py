"""The ``imgpipe`` command line."""

from __future__ import annotations

import signal
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from imgpipe.paths import DEFAULT_MANIFEST, DEFAULT_REPOSITORY, ROOT
from imgpipe.server import TritonServer

app = typer.Typer(
    help="Image AI pipelines on NVIDIA Triton Inference Server.", no_args_is_help=True, pretty_exceptions_enable=False
)
console = Console()
err = Console(stderr=True)

ManifestOpt = Annotated[Path, typer.Option("--manifest", "-m", help="Manifest (TOML) declaring the networks.")]
RepoOpt = Annotated[Path, typer.Option("--repository", "-r", help="Triton model repository folder.")]


def _fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(code)


@app.command()
def build(
    manifest: ManifestOpt = DEFAULT_MANIFEST,
    repository: RepoOpt = DEFAULT_REPOSITORY,
    target: Annotated[str, typer.Option(help="Execution target of the networks: python.")] = "python",
    models: Annotated[list[str] | None, typer.Option("--models", help="Build only these models.")] = None,
) -> None:
    """Export the manifest's networks and write the Triton model repository with generated configs."""
    from imgpipe.build.export import ExportError
    from imgpipe.build.repository import build_repository
    from imgpipe.manifest import ManifestError, load_manifest

    try:
        spec = load_manifest(manifest)
        with Progress(
            SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console, transient=True
        ) as progress:
            task = progress.add_task("building", total=None)
            built = build_repository(
                spec,
                repository,
                target=target,
                models=models,  # type: ignore[arg-type]
                progress=lambda msg: progress.update(task, description=msg),
            )
    except (ManifestError, ExportError, ValueError) as exc:
        raise _fail(str(exc)) from None
    table = Table(title=f"model repository {repository}")
    for column in ("model", "kind", "result", "seconds"):
        table.add_column(column)
    for b in built:
        table.add_row(b.name, b.kind, b.action, f"{b.seconds:.1f}")
    console.print(table)


def _stop_on_signals() -> threading.Event:
    """An event set by Ctrl-C or SIGTERM; installed before the server starts, so no signal is lost."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def _serve_until(server: TritonServer, stop: threading.Event) -> int:
    while not stop.wait(0.5):
        if not server.is_running():
            err.print("[red]tritonserver exited unexpectedly[/]")
            err.print(server.log[-4000:])
            return 1
    console.print("stopping tritonserver …")
    server.stop()
    console.print("stopped")
    return 0


@app.command()
def serve(
    repository: RepoOpt = DEFAULT_REPOSITORY,
    http_port: Annotated[int, typer.Option(help="HTTP/REST port.")] = 8000,
    grpc_port: Annotated[int, typer.Option(help="gRPC port.")] = 8001,
    metrics_port: Annotated[int, typer.Option(help="Prometheus metrics port.")] = 8002,
    log_verbose: Annotated[int, typer.Option(help="Triton's --log-verbose level.")] = 0,
) -> None:
    """Start the local tritonserver on the repository, wait until ready, serve until Ctrl-C/SIGTERM."""
    from imgpipe.server import Ports, ServerError

    server = TritonServer(repository.resolve(), Ports(http_port, grpc_port, metrics_port), log_verbose=log_verbose)
    stop = _stop_on_signals()
    try:
        with console.status("starting tritonserver …"):
            server.start()
    except ServerError as exc:
        raise _fail(str(exc)) from None
    table = Table(title="tritonserver ready")
    table.add_column("endpoint")
    table.add_column("address")
    table.add_row("gRPC", server.grpc_url)
    table.add_row("HTTP", f"http://{server.http_url}")
    table.add_row("metrics", server.metrics_url)
    console.print(table)
    models = Table(title="models")
    for column in ("name", "version", "state"):
        models.add_column(column)
    for m in server.loaded_models():
        models.add_row(m.get("name", ""), m.get("version", ""), m.get("state", ""))
    console.print(models)
    console.print("Ctrl-C stops the server.")
    raise typer.Exit(_serve_until(server, stop))


def remove_background_files(
    images: list[Path],
    out_dir: Path,
    url: str | None,
    protocol: str,
    concurrency: int,
    mode: str,
    background: str | None,
) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Send every image, write ``<out_dir>/<stem>.png``; returns (written, [(image, error)])."""
    from imgpipe.clients.remove_background import remove_background
    from imgpipe.clients.triton import InferenceError, TritonClient

    client = TritonClient(url, protocol)  # type: ignore[arg-type]
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    failed: list[tuple[Path, str]] = []

    def one(path: Path) -> Path:
        result = remove_background(client, path.read_bytes(), mode=mode, background=background)  # type: ignore[arg-type]
        target = out_dir / f"{path.stem}.png"
        target.write_bytes(result)
        return target

    columns = (TextColumn("remove-bg"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with (
        Progress(*columns, console=console, disable=len(images) < 2) as progress,
        ThreadPoolExecutor(max(1, concurrency)) as pool,
    ):
        task = progress.add_task("images", total=len(images))
        futures = {pool.submit(one, p): p for p in images}
        for future in as_completed(futures):
            path = futures[future]
            try:
                written.append(future.result())
            except InferenceError as exc:
                failed.append((path, f"{exc.status}: {exc.message}"))
            except OSError as exc:
                failed.append((path, str(exc)))
            progress.advance(task)
    return written, failed


@app.command("remove-bg")
def remove_bg(
    images: Annotated[list[Path], typer.Argument(help="JPEG/PNG/WebP files.", exists=True, dir_okay=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the PNG results.")] = Path("out"),
    url: Annotated[str | None, typer.Option(help="Server address (default localhost:8001 gRPC, :8000 HTTP).")] = None,
    protocol: Annotated[str, typer.Option(help="grpc or http.")] = "grpc",
    concurrency: Annotated[int, typer.Option(help="Requests in flight at once.")] = 4,
    mode: Annotated[str, typer.Option(help="rgba (cut-out), mask, or composite.")] = "rgba",
    background: Annotated[str | None, typer.Option(help="Colour for --mode composite, e.g. '#00ff00'.")] = None,
) -> None:
    """Remove the background of IMAGES through the server; writes OUTPUT/<name>.png."""
    if protocol not in ("grpc", "http"):
        raise _fail(f"--protocol must be grpc or http, got {protocol!r}")
    written, failed = remove_background_files(images, output, url, protocol, concurrency, mode, background)
    for path in sorted(written):
        console.print(f"wrote {path}")
    for path, message in failed:
        err.print(f"[red]{path}[/]: {message}", highlight=False)
    if failed:
        raise typer.Exit(1)


@app.command()
def demo(
    manifest: ManifestOpt = DEFAULT_MANIFEST,
    repository: RepoOpt = DEFAULT_REPOSITORY,
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the results.")] = ROOT / "out",
) -> None:
    """What `make run` does: build, start the local server, run every pipeline on sample images, stop."""
    from imgpipe.samples import write_samples
    from imgpipe.server import Ports, ServerError, free_ports

    build(manifest=manifest, repository=repository, target="python", models=None)
    samples = write_samples(output / "samples")
    console.print(f"sample images in {output / 'samples'}")
    server = TritonServer(repository.resolve(), Ports(*free_ports(3)))
    try:
        with console.status("starting tritonserver …"):
            server.start()
    except ServerError as exc:
        raise _fail(str(exc)) from None
    failures = 0
    try:
        console.print(f"tritonserver ready (gRPC {server.grpc_url}, HTTP {server.http_url})")
        for mode, background in (("rgba", None), ("mask", None), ("composite", "#3cb371")):
            folder = output / "remove_background" / mode
            written, failed = remove_background_files(samples, folder, server.grpc_url, "grpc", 2, mode, background)
            failures += len(failed)
            for path, message in failed:
                err.print(f"[red]{path}[/]: {message}")
            console.print(f"remove_background ({mode}): {len(written)} PNGs in {folder}")
    finally:
        server.stop()
    console.print(
        "[bold]Note:[/] the default segmenter has untrained reference weights: its masks are "
        "meaningless until a real ONNX is configured in manifest.toml (see README)."
    )
    if failures:
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
