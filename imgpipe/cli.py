"""The ``imgpipe`` command line."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
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


def _protocol(value: str) -> str:
    from imgpipe.clients.triton import check_protocol

    try:
        return check_protocol(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


ProtocolOpt = Annotated[str, typer.Option(help="grpc or http.", callback=_protocol)]


def _fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(code)


def _gate_table(title: str, errors: list) -> Table:
    table = Table(title=title)
    for column in ("network", "output", "max abs", "mean abs", "PSNR dB", "result"):
        table.add_column(column)
    for e in errors:
        psnr = "—" if e.psnr is None else ("inf" if e.psnr == float("inf") else f"{e.psnr:.1f}")
        verdict = "[green]pass[/]" if e.passed else f"[red]FAIL: {'; '.join(e.failures)}[/]"
        table.add_row(e.network, e.output, f"{e.max_abs:.3g}", f"{e.mean_abs:.3g}", psnr, verdict)
    return table


def _load(manifest: Path, overrides: list[str] | None):  # type: ignore[no-untyped-def]
    from imgpipe.manifest import ManifestError, load_manifest

    try:
        return load_manifest(manifest, overrides or [])
    except ManifestError as exc:
        raise _fail(str(exc)) from None


@app.command()
def build(
    manifest: ManifestOpt = DEFAULT_MANIFEST,
    repository: RepoOpt = DEFAULT_REPOSITORY,
    target: Annotated[str, typer.Option(help="python, onnxruntime or tensorrt.")] = "python",
    models: Annotated[list[str] | None, typer.Option("--models", help="Build only these models.")] = None,
    precision: Annotated[str | None, typer.Option(help="fp32, fp16 or int8 (default: the manifest's).")] = None,
    gpu_arch: Annotated[str, typer.Option(help="Plans: 'auto' (this GPU) or compute capabilities, 8.0,9.0.")] = "auto",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Write nothing; print what would be built.")] = False,
    overrides: Annotated[
        list[str] | None,
        typer.Option(
            "--set", help="Manifest override KEY=VALUE, e.g. networks.segmenter.batching.max_queue_delay_us=500"
        ),
    ] = None,
    gate: Annotated[bool, typer.Option(help="Run the accuracy gate on every new artifact.")] = True,
) -> None:
    """Export the manifest's networks and write the Triton model repository for a target."""
    from imgpipe.build.accuracy import AccuracyError
    from imgpipe.build.export import ExportError
    from imgpipe.build.repository import build_repository
    from imgpipe.build.targets import TARGETS, BuildOptions
    from imgpipe.build.tensorrt_plan import PlanBuildError

    if target not in TARGETS:
        raise _fail(f"--target must be one of {', '.join(TARGETS)}, got {target!r}")
    if precision not in (None, "fp32", "fp16", "int8"):
        raise _fail(f"--precision must be fp32, fp16 or int8, got {precision!r}")
    archs = () if gpu_arch == "auto" else tuple(a.strip() for a in gpu_arch.split(",") if a.strip())
    spec = _load(manifest, overrides)
    options = BuildOptions(target=target, precision=precision, gpu_archs=archs, dry_run=dry_run, gate=gate)  # type: ignore[arg-type]
    try:
        with Progress(
            SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console, transient=True
        ) as progress:
            task = progress.add_task("building", total=None)
            built = build_repository(
                spec, repository, options, models=models, progress=lambda msg: progress.update(task, description=msg)
            )
    except AccuracyError as exc:
        console.print(_gate_table("accuracy gate (build discarded)", exc.errors))
        raise _fail(f"accuracy gate failed: {exc}") from None
    except (ExportError, PlanBuildError, ValueError) as exc:
        raise _fail(str(exc)) from None
    for b in built:
        for command in b.commands:
            console.print(command, highlight=False, soft_wrap=True)
        for note in b.notes:
            console.print(f"# note: {note}", highlight=False)
    table = Table(title=f"{'dry run: ' if dry_run else ''}model repository {repository} ({target})")
    for column in ("model", "kind", "result", "seconds"):
        table.add_column(column)
    for b in built:
        table.add_row(b.name, b.kind, b.action, f"{b.seconds:.1f}")
    console.print(table)
    gated = [e for b in built for e in b.gate]
    if gated:
        console.print(_gate_table("accuracy gate", gated))


@app.command()
def init(
    path: Annotated[Path, typer.Argument(help="Where to write the manifest.")] = Path("manifest.toml"),
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
) -> None:
    """Write the default manifest (shipped in the package) for editing; `imgpipe build` then uses it."""
    from imgpipe.paths import PACKAGED_MANIFEST

    if path.exists() and not force:
        raise _fail(f"{path} exists: pass --force to overwrite it")
    path.write_text(PACKAGED_MANIFEST.read_text(encoding="utf-8"), encoding="utf-8")
    console.print(f"wrote {path}: edit it, then `imgpipe build -m {path}`")


@app.command()
def pipelines(
    manifest: ManifestOpt = DEFAULT_MANIFEST,
    overrides: Annotated[list[str] | None, typer.Option("--set", help="Manifest override KEY=VALUE.")] = None,
) -> None:
    """The registered pipelines and their contracts: inputs, outputs and request parameters."""
    from imgpipe.pipelines.registry import registry

    spec = _load(manifest, overrides)
    for name, pipeline in registry().items():
        contract = pipeline.contract
        state = "in the manifest" if name in spec.pipelines else "not in the manifest"
        table = Table(title=f"{name} ({state}): model {contract.model!r}. {contract.summary}", title_justify="left")
        for column in ("", "name", "description"):
            table.add_column(column)
        for kind, items in (("input", contract.inputs), ("output", contract.outputs)):
            for item in items:
                table.add_row(kind, item.name, item.describe(is_input=kind == "input"))
        for param in contract.parameters:
            table.add_row("parameter", param.name, param.describe())
        console.print(table)


@app.command("check-trt")
def check_trt(
    models: Annotated[list[str] | None, typer.Argument(help="Networks to check (default: all).")] = None,
    manifest: ManifestOpt = DEFAULT_MANIFEST,
    precision: Annotated[str, typer.Option(help="Comma-separated precisions to check.")] = "fp32,fp16",
    overrides: Annotated[list[str] | None, typer.Option("--set", help="Manifest override KEY=VALUE.")] = None,
) -> None:
    """Parse and build every network with TensorRT-RTX (no GPU needed): the exported graphs and the
    optimization profiles the tensorrt target uses. A check, not a plan build: nothing is run or timed."""
    from imgpipe.build.trt_check import check_manifest, format_results, tensorrt_rtx_version

    if tensorrt_rtx_version() is None:
        raise _fail("TensorRT-RTX is not installed: pip install 'imgpipe[trt-check]'")
    spec = _load(manifest, overrides)
    with console.status("parsing and building with TensorRT-RTX …"):
        results = check_manifest(spec, tuple(p.strip() for p in precision.split(",")), networks=models)
    console.print(format_results(results), highlight=False)
    failed = [f"{r.network}/{r.precision}" for r in results if not r.ok]
    if failed:
        raise _fail(f"TensorRT-RTX rejected: {', '.join(failed)}")


@app.command()
def validate(
    models: Annotated[list[str] | None, typer.Argument(help="Networks to check (default: all).")] = None,
    manifest: ManifestOpt = DEFAULT_MANIFEST,
    repository: RepoOpt = DEFAULT_REPOSITORY,
    overrides: Annotated[list[str] | None, typer.Option("--set", help="Manifest override KEY=VALUE.")] = None,
) -> None:
    """Run the accuracy gate on the served version of each network; exit 1 if any output drifts."""
    import time

    from imgpipe.build.repository import validate_repository

    spec = _load(manifest, overrides)
    start = time.perf_counter()
    try:
        with console.status("validating …"):
            results = validate_repository(spec, repository, models)
    except ValueError as exc:
        raise _fail(str(exc)) from None
    errors = [e for errs in results.values() for e in errs]
    console.print(_gate_table("accuracy against the FP32 ONNX Runtime reference", errors))
    console.print(f"validated {len(results)} network(s) in {time.perf_counter() - start:.1f} s")
    failed = [f"{e.network}.{e.output}" for e in errors if not e.passed]
    if failed:
        raise _fail(f"outside tolerance: {', '.join(failed)}")


@app.command("versions")
def versions_cmd(
    model: Annotated[str, typer.Argument(help="Model name.")],
    repository: RepoOpt = DEFAULT_REPOSITORY,
) -> None:
    """List a model's versions with their build metadata; marks the served ones."""
    from imgpipe.build.versions import served, versions

    found = versions(repository / model)
    if not found:
        raise _fail(f"{model}: no versions in {repository / model}")
    serving = served(repository / model)
    table = Table(title=f"{model} versions")
    for column in ("version", "served", "target", "precision", "details", "created"):
        table.add_column(column)
    for v in found:
        meta = v.metadata
        details = meta.get("onnx_sha256", "")[:12]
        if meta.get("plans"):
            details = ", ".join(f"{cc}: {p.get('plan')} ({p.get('gpu', '')}, TRT {p.get('tensorrt', '')})"
                                for cc, p in meta["plans"].items())  # fmt: skip
        table.add_row(str(v.number), "●" if v.number in serving else "", meta.get("target", "?"),
                      meta.get("precision", meta.get("base", {}).get("settings", {}).get("precision", "")),
                      details, meta.get("created", ""))  # fmt: skip
    console.print(table)


@app.command()
def rollback(
    model: Annotated[str, typer.Argument(help="Model name.")],
    repository: RepoOpt = DEFAULT_REPOSITORY,
    to: Annotated[int | None, typer.Option(help="Version to serve (default: the one before the served one).")] = None,
) -> None:
    """Serve the previous version (pins it in the config's version_policy until the next new build)."""
    from imgpipe.build.versions import VersionError
    from imgpipe.build.versions import rollback as do_rollback

    try:
        version = do_rollback(repository / model, to)
    except VersionError as exc:
        raise _fail(str(exc)) from None
    console.print(f"{model}: now serving version {version} (a server polling the repository picks it up;"
                  " otherwise restart it)")  # fmt: skip


def _stop_on_signals() -> threading.Event:
    """An event set by Ctrl-C or SIGTERM; installed before the server starts, so no signal is lost."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def _serve_until(server: TritonServer, stop: threading.Event) -> int:
    """Serve until Ctrl-C/SIGTERM (drain, exit 0), or until the server stops by itself: the supervisor gave
    up on a model (exit 1, so an orchestrator restarts the pod) or tritonserver died (exit 1)."""
    while not stop.wait(0.5):
        if server.failure:
            server.stop()  # the supervisor's stop may still be draining
            err.print(f"[red]the supervisor stopped tritonserver: {server.failure}[/]")
            return 1
        if not server.is_running():
            err.print("[red]tritonserver exited unexpectedly[/]")
            err.print(server.log[-4000:])
            return 1
    console.print(f"stopping tritonserver (draining requests in flight, up to {server.exit_timeout_s:.0f} s) …")
    server.stop()
    restarts = f" ({server.restarts} model restart(s) by the supervisor)" if server.restarts else ""
    console.print(f"stopped{restarts}")
    return 0


@app.command()
def serve(
    repository: RepoOpt = DEFAULT_REPOSITORY,
    http_port: Annotated[int, typer.Option(help="HTTP/REST port.")] = 8000,
    grpc_port: Annotated[int, typer.Option(help="gRPC port.")] = 8001,
    metrics_port: Annotated[int, typer.Option(help="Prometheus metrics port.")] = 8002,
    log_verbose: Annotated[int, typer.Option(help="Triton's --log-verbose level.")] = 0,
    cache_mib: Annotated[int, typer.Option(help="Response cache size in MiB (models with response_cache).")] = 0,
    poll_secs: Annotated[
        int,
        typer.Option(help="Poll the repository every N s for new versions (0: off). Triton refuses model control "
                     "in poll mode, so the supervisor cannot reload a model whose stub died: it stops the server "
                     "(exit 1) for the orchestrator to restart it."),
    ] = 0,
    host: Annotated[
        str, typer.Option(envvar="IMGPIPE_HOST", help="Address HTTP, gRPC and metrics bind to (0.0.0.0: all).")
    ] = "127.0.0.1",
    admin_key: Annotated[
        str | None,
        typer.Option(
            envvar="IMGPIPE_ADMIN_KEY",
            help="Restrict the admin APIs (--restrict) to requests carrying this key in --admin-header.",
        ),
    ] = None,
    admin_header: Annotated[
        str, typer.Option(envvar="IMGPIPE_ADMIN_HEADER", help="Header that carries the admin key.")
    ] = "imgpipe-admin-key",
    restrict: Annotated[
        str,
        typer.Option(envvar="IMGPIPE_RESTRICT", help="Comma-separated Triton APIs the admin key guards "
                     "(model-config, metadata, inference, "
                     "health may be added)."),
    ] = "model-repository,shared-memory,logging,trace,statistics",
    grpc_tls_cert: Annotated[
        Path | None, typer.Option(envvar="IMGPIPE_GRPC_TLS_CERT", help="PEM server certificate: gRPC over TLS.")
    ] = None,
    grpc_tls_key: Annotated[
        Path | None, typer.Option(envvar="IMGPIPE_GRPC_TLS_KEY", help="PEM server private key (with --grpc-tls-cert).")
    ] = None,
    grpc_tls_client_ca: Annotated[
        Path | None,
        typer.Option(envvar="IMGPIPE_GRPC_TLS_CLIENT_CA", help="PEM CA of client certificates: mutual TLS."),
    ] = None,
    metrics: Annotated[
        bool, typer.Option("--metrics/--no-metrics", envvar="IMGPIPE_METRICS", help="Prometheus metrics endpoint.")
    ] = True,
    triton_args: Annotated[
        list[str] | None,
        typer.Option("--triton-arg", help="Extra tritonserver flag, e.g. --triton-arg=--http-thread-count=4 "
                     "(repeatable; applied last)."),
    ] = None,
    supervise: Annotated[
        bool,
        typer.Option("--supervise/--no-supervise", envvar="IMGPIPE_SUPERVISE",
                     help="Reload a model whose Python-backend stub died (explicit model control; gives up, "
                     "exit 1, after 3 failed reloads in 5 minutes or a crash loop)."),
    ] = True,
    grace_secs: Annotated[
        float,
        typer.Option(envvar="IMGPIPE_GRACE_SECS", help="SIGTERM drain: the longest wait for requests in flight "
                     "and open HTTP connections (Triton's --exit-timeout-secs)."),
    ] = 30.0,
    open_internal_models: Annotated[
        bool,
        typer.Option("--open-internal-models", help="Internal networks and steps become callable from outside "
                     "(no internal key): for debugging, and perf_analyzer on a single network."),
    ] = False,
) -> None:  # fmt: skip
    """Start the local tritonserver on the repository, wait until ready, serve until Ctrl-C/SIGTERM (then drain)."""
    from imgpipe.server import WILDCARD_HOSTS, GrpcTls, Ports, Restriction, ServerError, host_port

    try:
        if grace_secs < 0:
            raise ServerError("--grace-secs must be at least 0")
        restriction = (
            Restriction(admin_key, admin_header, tuple(a.strip() for a in restrict.split(",") if a.strip()))
            if admin_key
            else None
        )
        if (grpc_tls_cert is None) != (grpc_tls_key is None) or (grpc_tls_client_ca and not grpc_tls_cert):
            raise ServerError("gRPC TLS needs both --grpc-tls-cert and --grpc-tls-key")
        tls = GrpcTls(grpc_tls_cert, grpc_tls_key, grpc_tls_client_ca) if grpc_tls_cert and grpc_tls_key else None
    except ServerError as exc:
        raise _fail(str(exc)) from None
    server = TritonServer(
        repository.resolve(),
        Ports(http_port, grpc_port, metrics_port),
        host=host,
        log_verbose=log_verbose,
        cache_mib=cache_mib,
        poll_secs=poll_secs,
        restriction=restriction,
        grpc_tls=tls,
        metrics=metrics,
        extra_args=tuple(triton_args or ()),
        supervise=supervise,
        grace_s=grace_secs,
        open_internal_models=open_internal_models,
    )
    stop = _stop_on_signals()
    try:
        with console.status("starting tritonserver …"):
            server.start()
    except ServerError as exc:
        raise _fail(str(exc)) from None
    grpc_security = "plain text"
    if tls:
        grpc_security = "TLS, client certificates required" if tls.client_ca else "TLS"
    table = Table(title="tritonserver ready")
    for column in ("endpoint", "address", "security"):
        table.add_column(column)
    table.add_row("gRPC", host_port(host, grpc_port), grpc_security)
    table.add_row("HTTP", f"http://{host_port(host, http_port)}", "plain text")
    table.add_row("metrics", f"http://{host_port(host, metrics_port)}/metrics" if metrics else "off", "")
    if restriction:
        table.add_row("admin APIs", ", ".join(restriction.apis), f"key in header '{restriction.header}'")
    elif server.admin:
        table.add_row("model control", "model-repository", "the supervisor's own key (set --admin-key to use it)")
    table.add_row("supervisor", "on" if supervise else "off", f"model control {server.model_control_mode}")
    if open_internal_models:
        table.add_row("internal models", "callable from outside", "--open-internal-models")
    console.print(table)
    if host not in ("127.0.0.1", "localhost", "::1"):
        exposed = "every interface" if host in WILDCARD_HOSTS else host
        note = "" if restriction else "; no --admin-key: the admin APIs are open to the network"
        console.print(f"[yellow]listening on {exposed}{note}[/]")
    models = Table(title="models")
    for column in ("name", "version", "state"):
        models.add_column(column)
    for m in server.loaded_models():
        models.add_row(m.get("name", ""), m.get("version", ""), m.get("state", ""))
    console.print(models)
    console.print("Ctrl-C stops the server.")
    raise typer.Exit(_serve_until(server, stop))


def _each_file(
    images: list[Path], label: str, one: Callable[[Path], Path], concurrency: int
) -> tuple[list[Path], list[tuple[Path, str]]]:
    """``one(image)`` for every image, ``concurrency`` at a time, under a progress bar; returns (written,
    [(image, error)]) — a server's refusal or a file error fails that image only."""
    from imgpipe.clients.triton import InferenceError

    written: list[Path] = []
    failed: list[tuple[Path, str]] = []
    columns = (TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
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


def remove_background_files(
    images: list[Path],
    out_dir: Path,
    url: str | None,
    protocol: str,
    concurrency: int,
    mode: str,
    background: str | None,
    fmt: str = "png",
) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Send every image, write ``<out_dir>/<stem>.<png|webp|jpg>`` (``fmt``); returns (written, [(image, error)])."""
    from imgpipe.clients.remove_background import SUFFIXES, remove_background
    from imgpipe.clients.triton import TritonClient

    client = TritonClient(url, protocol)  # type: ignore[arg-type]
    out_dir.mkdir(parents=True, exist_ok=True)

    def one(path: Path) -> Path:
        result = remove_background(client, path.read_bytes(), mode=mode, background=background, fmt=fmt)  # type: ignore[arg-type]
        target = out_dir / f"{path.stem}{SUFFIXES[fmt]}"
        target.write_bytes(result)
        return target

    with client:
        return _each_file(images, "remove-bg", one, concurrency)


@app.command("remove-bg")
def remove_bg(
    images: Annotated[list[Path], typer.Argument(help="JPEG/PNG/WebP files.", exists=True, dir_okay=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the PNG results.")] = Path("out"),
    url: Annotated[str | None, typer.Option(help="Server address (default localhost:8001 gRPC, :8000 HTTP).")] = None,
    protocol: ProtocolOpt = "grpc",
    concurrency: Annotated[int, typer.Option(help="Requests in flight at once.")] = 4,
    mode: Annotated[str, typer.Option(help="rgba (cut-out), mask, or composite.")] = "rgba",
    background: Annotated[str | None, typer.Option(help="Colour for --mode composite, e.g. '#00ff00'.")] = None,
    fmt: Annotated[
        str,
        typer.Option(
            "--format",
            help="png, webp (lossless by default: faster and smaller than png) or jpeg (not with --mode rgba).",
        ),
    ] = "png",
) -> None:
    """Remove the background of IMAGES through the server; writes OUTPUT/<name>.png (.webp, .jpg)."""
    from imgpipe.clients.remove_background import SUFFIXES

    fmt = fmt.strip().lower()
    if fmt not in SUFFIXES:
        raise typer.BadParameter(f"{fmt!r} is not one of {', '.join(SUFFIXES)}", param_hint="--format")
    written, failed = remove_background_files(images, output, url, protocol, concurrency, mode, background, fmt)
    for path in sorted(written):
        console.print(f"wrote {path}")
    for path, message in failed:
        err.print(f"[red]{path}[/]: {message}", highlight=False)
    if failed:
        raise typer.Exit(1)


def colorize_files(
    images: list[Path],
    out_dir: Path,
    url: str | None,
    protocol: str,
    concurrency: int,
    fmt: str = "png",
    size: int = 512,
) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Colorize every image, write ``<out_dir>/<stem>.<png|webp|jpg>``; returns (written, [(image, error)])."""
    from imgpipe.clients.colorize import SUFFIXES, colorize_one
    from imgpipe.clients.triton import TritonClient

    client = TritonClient(url, protocol)  # type: ignore[arg-type]
    out_dir.mkdir(parents=True, exist_ok=True)

    def one(path: Path) -> Path:
        target = out_dir / f"{path.stem}{SUFFIXES[fmt]}"
        target.write_bytes(colorize_one(client, path.read_bytes(), fmt=fmt, size=size))  # type: ignore[arg-type]
        return target

    with client:
        return _each_file(images, "colorize", one, concurrency)


@app.command("colorize")
def colorize_cmd(
    images: Annotated[list[Path], typer.Argument(help="JPEG/PNG/WebP files.", exists=True, dir_okay=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the results.")] = Path("out"),
    url: Annotated[str | None, typer.Option(help="Server address (default localhost:8001 gRPC, :8000 HTTP).")] = None,
    protocol: ProtocolOpt = "grpc",
    concurrency: Annotated[int, typer.Option(help="Requests in flight at once.")] = 4,
    fmt: Annotated[
        str, typer.Option("--format", help="png, webp or jpeg (not for images with an alpha channel).")
    ] = "png",
    size: Annotated[int, typer.Option(help="The colorizer's input side: 512 (DDColor's) or 256 (faster).")] = 512,
) -> None:
    """Colorize IMAGES through the server (DDColor contract: the lightness is kept, the colour comes from
    the colorizer network); writes OUTPUT/<name>.png (.webp, .jpg) at each input's size."""
    from imgpipe.clients.colorize import SUFFIXES
    from imgpipe.pipelines.colorize import SIZES

    fmt = fmt.strip().lower()
    if fmt not in SUFFIXES:
        raise typer.BadParameter(f"{fmt!r} is not one of {', '.join(SUFFIXES)}", param_hint="--format")
    if str(size) not in SIZES:
        raise typer.BadParameter(f"{size} is not one of {', '.join(SIZES)}", param_hint="--size")
    written, failed = colorize_files(images, output, url, protocol, concurrency, fmt, size)
    for path in sorted(written):
        console.print(f"wrote {path}")
    for path, message in failed:
        err.print(f"[red]{path}[/]: {message}", highlight=False)
    if failed:
        raise typer.Exit(1)


@app.command("reconstruct")
def reconstruct_cmd(
    images: Annotated[list[Path], typer.Argument(help="JPEG/PNG/WebP files.", exists=True, dir_okay=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the results.")] = Path("out"),
    fmt: Annotated[
        str, typer.Option("--format", help="glb (web viewers), obj (face.obj + .mtl + .png) or ply.")
    ] = "glb",
    method: Annotated[
        str | None, typer.Option(help="mesh (MediaPipe face mesh) or 3dmm (Deep3DFaceRecon); default: the manifest's.")
    ] = None,
    faces: Annotated[str, typer.Option(help="all, largest, or an index (best score first).")] = "all",
    preview: Annotated[bool, typer.Option(help="Also write <name>_preview.png (the mesh rendered).")] = True,
    url: Annotated[str | None, typer.Option(help="Server address (default localhost:8001 gRPC, :8000 HTTP).")] = None,
    protocol: ProtocolOpt = "grpc",
    concurrency: Annotated[int, typer.Option(help="Requests in flight at once.")] = 2,
) -> None:
    """Reconstruct each face of IMAGES as a textured 3D mesh through the server: writes OUTPUT/<name>_face<i>
    (.glb, .ply, or a folder with face.obj, face.mtl, face.png), <name>.json (boxes, pose, coefficients)
    and the preview."""
    from imgpipe.clients.reconstruct import main

    code = main(
        images, output, fmt=fmt, method=method, faces=faces, preview=preview, url=url,
        protocol=protocol, concurrency=concurrency, console=console, err=err,
    )  # fmt: skip
    if code:
        raise typer.Exit(code)


@app.command("loadtest")
def loadtest_cmd(
    pipeline: Annotated[str, typer.Argument(help="remove_background, detect_faces, swap_face, colorize, ...")],
    users: Annotated[int, typer.Option(help="Concurrent users (each a closed loop: the concurrency).")] = 8,
    spawn_rate: Annotated[float, typer.Option(help="Users started per second.")] = 8.0,
    duration: Annotated[str, typer.Option(help="How long: 60s, 2m, ... (the run stops by itself).")] = "60s",
    url: Annotated[str | None, typer.Option(help="Server address (default localhost:8001 gRPC, :8000 HTTP).")] = None,
    protocol: ProtocolOpt = "grpc",
    sizes: Annotated[str, typer.Option(help="Image size mix: WIDTHxHEIGHT[:WEIGHT],... (JPEG photos).")] = "1024x768",
    shape: Annotated[str, typer.Option(help="constant, ramp (1 to users over the run) or step.")] = "constant",
    step_users: Annotated[int, typer.Option(help="--shape step: users added per step.")] = 1,
    step_seconds: Annotated[float, typer.Option(help="--shape step: seconds per step.")] = 10.0,
    max_requests: Annotated[int, typer.Option(help="Request budget: the run stops after this many.")] = 100_000,
    think_ms: Annotated[float, typer.Option(help="Mean pause between a user's requests (0: closed loop).")] = 0.0,
    metrics_url: Annotated[str | None, typer.Option(help="Triton's metrics endpoint (default: host:8002).")] = None,
    prometheus: Annotated[bool, typer.Option(help="Collect metrics through a real Prometheus where installed.")] = True,
    ui: Annotated[bool, typer.Option(help="Show Locust's web UI (http://127.0.0.1:8089) during the run.")] = False,
    cross_check: Annotated[
        bool, typer.Option(help="Then measure the same scenario with perf_analyzer and compare.")
    ] = False,
    output: Annotated[Path, typer.Option("--output", "-o", help="Reports go to OUTPUT/PIPELINE-TIME/.")] = ROOT
    / "out"
    / "loadtest",
) -> None:
    """Load-test a running server with Locust: real JPEG photos, every request a Locust event
    (PIPELINE:OUTCOME), Triton's metrics over the window; writes Locust's CSV and HTML, the metrics, a
    summary and a plot."""
    import time as _time

    from imgpipe.clients.triton import DEFAULT_URLS
    from imgpipe.loadtest.run import LoadTest, parse_duration, run

    try:
        test = LoadTest(
            pipeline, users, spawn_rate, parse_duration(duration), url or DEFAULT_URLS[protocol], protocol,  # type: ignore[arg-type]
            sizes, shape, step_users, step_seconds, max_requests, think_ms, metrics_url=metrics_url,  # type: ignore[arg-type]
            prometheus=prometheus, ui=ui, cross_check=cross_check,
        )  # fmt: skip
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    folder = output / f"{pipeline}-{_time.strftime('%Y%m%d-%H%M%S')}"
    report = run(test, folder, console=console)
    show_loadtest(report)
    if report.unexpected_failures or not report.ok:
        raise typer.Exit(1)


def show_loadtest(report) -> None:  # type: ignore[no-untyped-def]
    """The run's outcomes and the models' window figures, as tables."""
    table = Table(title=f"{report.test.pipeline}: {report.throughput:.2f} ok requests/s over {report.seconds:.0f} s")
    for column in ("outcome", "requests", "p50 ms", "p99 ms", "mean ms"):
        table.add_column(column, justify="right" if column != "outcome" else "left")
    for kind, o in report.outcomes.items():
        style = "" if kind == "ok" else "yellow" if kind == "queue_full" else "red"
        table.add_row(kind, str(o.requests), f"{o.p50_ms:.0f}", f"{o.p99_ms:.0f}", f"{o.mean_ms:.0f}", style=style)
    console.print(table)
    models = Table(title=f"Triton over the window ({report.metrics_source} metrics)")
    for column in ("model", "requests", "failed", "batch size", "queue ms", "compute ms"):
        models.add_column(column, justify="right" if column != "model" else "left")
    for m in report.models.values():
        models.add_row(
            m.model, str(m.requests), str(m.failures), f"{m.batch_size or 0:.2f}", f"{m.queue_ms or 0:.1f}",
            f"{m.compute_ms or 0:.1f}",
        )  # fmt: skip
    console.print(models)
    for uuid, gpu in report.gpus.items():
        console.print(f"GPU {uuid}: utilisation mean {gpu['utilization_mean']:.0%}, peak memory"
                      f" {gpu.get('memory_used_max', 0) / 2**30:.2f} GiB")  # fmt: skip
    for error in report.metrics_errors[:5]:
        err.print(f"[yellow]metrics: {error}[/]")
    check = report.cross_check
    if check and "error" in check:
        err.print(f"[yellow]perf_analyzer cross-check failed: {check['error'][-300:]}[/]", markup=False)
    elif check:
        console.print(
            f"perf_analyzer, same scenario: {check['perf_analyzer_throughput_per_s']:.2f}/s (p99"
            f" {check['perf_analyzer_p99_ms']:.0f} ms); Locust/perf_analyzer = {check['locust_over_perf_analyzer']:.2f}"
            + ("" if check["agree_within_15_percent"] else " — the tools disagree by more than 15 %")
        )
    console.print(f"report in {report.folder} (report.html, report.png, locust_*.csv, requests.csv, metrics.json)")


@app.command("tune")
def tune_cmd(
    pipeline: Annotated[str, typer.Argument(help="The pipeline to tune (as in the manifest).")],
    budget_ms: Annotated[float, typer.Option(help="Latency budget: the winner's p99 must stay under it.")],
    trials: Annotated[int, typer.Option(help="Trials at most (1: unbatched, 2: the manifest as it is, ...).")] = 8,
    users: Annotated[int, typer.Option(help="Concurrency of every trial (Locust users).")] = 8,
    trial_seconds: Annotated[float, typer.Option(help="Seconds of load per trial.")] = 20.0,
    sizes: Annotated[str, typer.Option(help="Image size mix: WIDTHxHEIGHT[:WEIGHT],...")] = "1024x768",
    protocol: ProtocolOpt = "grpc",
    manifest: Annotated[Path, typer.Option(help="The manifest to tune and write back.")] = DEFAULT_MANIFEST,
    write: Annotated[bool, typer.Option("--write", help="Apply the winning values to the manifest.")] = False,
    prometheus: Annotated[bool, typer.Option(help="Collect each trial's metrics through Prometheus.")] = False,
    output: Annotated[Path, typer.Option("--output", "-o", help="Reports go to OUTPUT/PIPELINE-TIME/.")] = ROOT
    / "out"
    / "tune",
) -> None:
    """Tune PIPELINE's serving configuration (batching, queue delay, instances, queue policy) with Locust
    trials on a server of its own, pick the highest throughput whose p99 is under --budget-ms, show the
    manifest diff, and with --write apply it (comments and layout kept)."""
    import time as _time

    from rich.markup import escape

    from imgpipe.loadtest.tune import Tuner, diff, write_back

    folder = output / f"{pipeline}-{_time.strftime('%Y%m%d-%H%M%S')}"
    try:
        tuner = Tuner(
            pipeline, manifest, folder, budget_ms, trials, users, trial_seconds, sizes, protocol,
            prometheus=prometheus, console=console,
        )  # fmt: skip
        best = tuner.run()
    except (ValueError, OSError) as exc:
        err.print(f"[red]{exc}[/]")
        raise typer.Exit(2) from None
    table = Table(
        title=f"imgpipe tune {pipeline}: {users} users, {trial_seconds:g} s per trial, budget p99 {budget_ms:g} ms"
    )
    for column in ("#", "trial", "throughput/s", "p50 ms", "p99 ms", "failed", "within budget"):
        table.add_column(column, justify="left" if column == "trial" else "right", overflow="fold")
    for t in tuner.results:
        mark = "[green]best[/]" if t is best else ("yes" if t.within_budget else "no")
        table.add_row(
            str(t.number), escape(t.label), f"{t.throughput:.2f}", f"{t.p50_ms or 0:.0f}", f"{t.p99_ms or 0:.0f}",
            str(t.failures) if not t.error else f"[red]{escape(t.error[:60])}[/]", mark,
        )  # fmt: skip
    console.print(table)
    console.print(tuner.explanation())
    console.print(f"report: {folder / 'tune.json'}, {folder / 'tune.png'}")
    if best is None:
        raise typer.Exit(1)
    if not best.within_budget:
        err.print(f"[yellow]no trial kept p99 under {budget_ms:g} ms; the lowest p99 is shown, nothing is written[/]")
        raise typer.Exit(1)
    before, after = write_back(manifest, tuner.winning_assignments())
    if before == after:
        console.print("the manifest already has the winning values")
        return
    console.print(diff(before, after, manifest), markup=False, highlight=False, soft_wrap=True)
    if write:
        manifest.write_text(after)
        console.print(f"wrote {manifest}")
    else:
        console.print("(--write applies it)")


@app.command("capacity")
def capacity_cmd(
    rate: Annotated[float, typer.Option(help="Requests per second to serve (the peak).")],
    mix: Annotated[
        str,
        typer.Option(
            help="Pipeline shares: remove_background=0.6,detect_faces=0.4 ...; with image sizes measured by"
            " --bench files: remove_background@1024x768=0.4,remove_background@2048x1536=0.2 ..."
        ),
    ],
    p99_ms: Annotated[float, typer.Option(help="Latency target: every pipeline's p99 within it.")] = 1000.0,
    utilisation: Annotated[float, typer.Option(help="Planned busy share of each GPU (headroom).")] = 0.7,
    bench: Annotated[
        list[Path] | None,
        typer.Option(
            help="imgpipe bench's JSON with the measured curves; repeat it for runs at other image sizes"
            " (default: docs/benchmarks/bench.json)."
        ),
    ] = None,
    variant: Annotated[str, typer.Option(help="The bench variant whose curves to use.")] = "fp16",
    simulate: Annotated[
        str | None, typer.Option(help="LOW:HIGH@SECONDS: simulate the HPA through a step of the load.")
    ] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the simulation's picture.")] = ROOT
    / "out"
    / "capacity",
) -> None:
    """How many GPUs (pods) RATE requests/s of MIX need within the p99 target, from measured curves
    (docs/scaling.md); with --simulate, how the HPA on queue time reacts to a step of the load."""
    from imgpipe import capacity

    try:
        curves = capacity.load_curves(bench or [capacity.BENCH_JSON], variant)
        plan = capacity.plan(curves, rate, capacity.parse_mix(mix), p99_ms, utilisation)
    except (ValueError, KeyError, OSError) as exc:
        raise typer.BadParameter(exc.args[0] if isinstance(exc, KeyError) else str(exc)) from None
    table = Table(title=f"{rate:g} req/s within p99 {p99_ms:g} ms ({curves.source})")
    for column in ("pipeline", "req/s", "per GPU", "at concurrency", "GPUs of work"):
        table.add_column(column, justify="left" if column == "pipeline" else "right")
    for row in plan.rows:
        table.add_row(
            row.pipeline, f"{row.rate:.1f}", f"{row.capacity:.1f}", str(row.concurrency), f"{row.gpu_share:.2f}"
        )
    console.print(table)
    console.print(
        f"{plan.gpu_time:.2f} GPUs of work; at <= {utilisation:.0%} busy: [bold]{plan.pods} pods[/] (one GPU each);"
        f" the mix serves {plan.mixed_capacity:.1f} req/s per GPU"
    )
    if simulate:
        try:
            levels, at = simulate.split("@")
            low, high = (float(v) for v in levels.split(":"))
            start = float(at)
        except ValueError:
            raise typer.BadParameter(f"{simulate!r} is not LOW:HIGH@SECONDS, e.g. 20:80@120") from None
        output.mkdir(parents=True, exist_ok=True)
        for name, hpa in (("min2", capacity.Hpa()), ("plan", capacity.Hpa(min_pods=plan.pods))):
            sim = capacity.simulate(capacity.step_load(low, high, start), plan.mixed_capacity, 3600, hpa)
            title = f"HPA on queue time, minReplicas {hpa.min_pods}: {low:g} -> {high:g} req/s at {start:g} s"
            path = capacity.plot(sim, hpa, output / f"hpa-{name}.png", title)
            pods = [s.pods for s in sim.steps]
            console.print(f"minReplicas {hpa.min_pods}: pods {min(pods)}-{max(pods)}, worst queue time"
                          f" {sim.max_queue_ms():.0f} ms; picture {path}")  # fmt: skip


@app.command("deploy-configs")
def deploy_configs_cmd(
    output: Annotated[Path, typer.Option("--output", "-o", help="The compose stack's folder.")] = ROOT
    / "deploy"
    / "compose",
) -> None:
    """Write the local stack's generated files: Prometheus' scrape config and Grafana's provisioning and
    dashboard (deploy/compose/)."""
    from imgpipe import deploy

    for path in deploy.write(output):
        console.print(f"wrote {path}")


def draw_faces(image: bytes, faces: list, target: Path) -> None:
    """The image with each face's box and five landmarks drawn, and its face mesh (the triangles' edges)
    where the faces carry one, as PNG."""
    import io

    from PIL import Image, ImageDraw, ImageOps

    picture = ImageOps.exif_transpose(Image.open(io.BytesIO(image))).convert("RGB")
    pen = ImageDraw.Draw(picture)
    width = max(2, round(max(picture.size) / 300))
    edges = _mesh_edges() if any(face.mesh for face in faces) else []
    for face in faces:
        for a, b in edges:
            pen.line([face.mesh[a][:2], face.mesh[b][:2]], fill=(60, 220, 120), width=1)
        x, y, w, h = face.box
        pen.rectangle([x, y, x + w, y + h], outline=(255, 140, 0), width=width)
        for px, py in face.landmarks:
            pen.ellipse([px - width * 1.5, py - width * 1.5, px + width * 1.5, py + width * 1.5], fill=(0, 200, 255))
        pen.text((x, max(0, y - 12)), f"{face.score:.3f}", fill=(255, 140, 0))
    target.parent.mkdir(parents=True, exist_ok=True)
    picture.save(target, format="PNG")


def _mesh_edges() -> list[tuple[int, int]]:
    """The face mesh's edges, from MediaPipe's published tessellation (the mediapipe wheel)."""
    from imgpipe.ensembles.mesh_swap import connections

    try:
        return connections()
    except (FileNotFoundError, ImportError):  # no mediapipe wheel here: boxes and landmarks only
        return []


@app.command()
def detect(
    image: Annotated[Path, typer.Argument(help="JPEG/PNG/WebP file.", exists=True, dir_okay=False)],
    as_json: Annotated[bool, typer.Option("--json", help="Print the faces as JSON.")] = False,
    draw: Annotated[Path | None, typer.Option(help="Write the image with boxes and landmarks (PNG).")] = None,
    url: Annotated[str | None, typer.Option(help="Server address (default localhost:8001 gRPC, :8000 HTTP).")] = None,
    protocol: ProtocolOpt = "grpc",
    min_face_size: Annotated[int | None, typer.Option(help="Smallest face to find, in pixels (default 20).")] = None,
    thresholds: Annotated[str | None, typer.Option(help="MTCNN stage thresholds, e.g. 0.6,0.7,0.7.")] = None,
    mesh: Annotated[bool, typer.Option("--mesh", help="Also the 468-point face mesh of each face.")] = False,
) -> None:
    """Detect faces: boxes [x, y, width, height], scores and 5 landmarks in the original image's pixels
    (with --mesh, MediaPipe's 468-point face mesh too: in the JSON and the drawing)."""
    import json

    from imgpipe.clients.faces import detect_faces
    from imgpipe.clients.triton import InferenceError, TritonClient

    stages = None
    if thresholds:
        try:
            stages = tuple(float(v) for v in thresholds.split(","))
        except ValueError:
            raise _fail(f"--thresholds must be three numbers, got {thresholds!r}") from None
        if len(stages) != 3:
            raise _fail(f"--thresholds must be three numbers, got {thresholds!r}")
    data = image.read_bytes()
    try:
        with TritonClient(url, protocol) as client:  # type: ignore[arg-type]
            faces = detect_faces(client, data, min_face_size, stages, mesh=mesh)  # type: ignore[arg-type]
    except InferenceError as exc:
        raise _fail(f"{exc.status}: {exc.message}") from None
    if as_json:
        print(json.dumps({"faces": [f.as_json() for f in faces]}))
    else:
        table = Table(title=f"{len(faces)} face(s) in {image.name}")
        for column in ("box x, y, w, h", "score", "landmarks"):
            table.add_column(column)
        for f in faces:
            table.add_row(", ".join(f"{v:.0f}" for v in f.box), f"{f.score:.4f}",
                          "  ".join(f"({x:.0f}, {y:.0f})" for x, y in f.landmarks))  # fmt: skip
        console.print(table)
    if draw is not None:
        draw_faces(data, faces, draw)
        if not as_json:
            console.print(f"wrote {draw}")


@app.command()
def swap(
    source: Annotated[Path, typer.Argument(help="Image with the face to use.", exists=True, dir_okay=False)],
    target: Annotated[Path, typer.Argument(help="Image whose faces are replaced.", exists=True, dir_okay=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="Result file (.png or .jpg).")] = Path("swapped.png"),
    faces: Annotated[str, typer.Option(help="all, largest, or a face index (best score first).")] = "all",
    url: Annotated[str | None, typer.Option(help="Server address (default localhost:8001 gRPC, :8000 HTTP).")] = None,
    protocol: ProtocolOpt = "grpc",
) -> None:
    """Replace the faces of TARGET with the face of SOURCE; writes OUTPUT (same size as TARGET)."""
    from imgpipe.clients.faces import swap_face
    from imgpipe.clients.triton import InferenceError, TritonClient

    fmt = "jpeg" if output.suffix.lower() in (".jpg", ".jpeg") else "png"
    try:
        with TritonClient(url, protocol) as client:  # type: ignore[arg-type]
            result = swap_face(client, source.read_bytes(), target.read_bytes(), faces=faces, fmt=fmt)
    except InferenceError as exc:
        raise _fail(f"{exc.status}: {exc.message}") from None
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_bytes(result.image)
    console.print(f"swapped {result.swapped} face(s): wrote {output}")


def _demo_faces(samples: list[Path], folder: Path, url: str) -> int:
    """detect_faces on every sample: JSON and a drawing each; returns the number of failures."""
    import json

    from imgpipe.clients.faces import detect_faces
    from imgpipe.clients.triton import InferenceError, TritonClient

    failures = 0
    folder.mkdir(parents=True, exist_ok=True)
    with TritonClient(url, "grpc") as client:
        for path in samples:
            try:
                faces = detect_faces(client, path.read_bytes(), mesh=True)
            except InferenceError as exc:
                err.print(f"[red]{path}[/]: {exc.status}: {exc.message}")
                failures += 1
                continue
            (folder / f"{path.stem}.json").write_text(json.dumps({"faces": [f.as_json() for f in faces]}, indent=1))
            draw_faces(path.read_bytes(), faces, folder / f"{path.stem}.png")
            console.print(f"detect_faces: {len(faces)} face(s) in {path.name}")
        console.print(f"detect_faces: JSON and drawings in {folder}")
        from imgpipe.clients.faces import swap_face

        by_name = {p.stem: p for p in samples}
        for source, target in (("hopper", "astronaut"), ("astronaut", "hopper"), ("astronaut", "coffee")):
            try:
                result = swap_face(client, by_name[source].read_bytes(), by_name[target].read_bytes())
            except InferenceError as exc:
                err.print(f"[red]swap {source} -> {target}[/]: {exc.status}: {exc.message}")
                failures += 1
                continue
            (folder / f"swap_{source}_into_{target}.png").write_bytes(result.image)
            console.print(f"swap_face: {source} into {target}: {result.swapped} face(s) swapped")
        console.print(f"swap_face: results in {folder} (method mesh: MediaPipe's face mesh, real weights)")
    return failures


@app.command()
def demo(
    manifest: ManifestOpt = DEFAULT_MANIFEST,
    repository: RepoOpt = DEFAULT_REPOSITORY,
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the results.")] = ROOT / "out",
) -> None:
    """What `make run` does: build, start the local server, run every pipeline on sample images, stop."""
    from imgpipe.samples import write_samples
    from imgpipe.server import Ports, ServerError, free_ports

    build(
        manifest=manifest, repository=repository, target="python", models=None, precision=None, gpu_arch="auto",
        dry_run=False, overrides=None, gate=True,
    )  # fmt: skip
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
        # colorize: every sample (camera is greyscale), when the manifest serves it.
        declared = _load(manifest, None)
        if "colorize" in declared.pipelines:
            written, failed = colorize_files(samples, output / "colorize", server.grpc_url, "grpc", 2)
            failures += len(failed)
            for path, message in failed:
                err.print(f"[red]{path}[/]: {message}")
            colorizer = declared.network(declared.pipelines["colorize"].network)
            untrained = colorizer.source.kind == "reference"
            note = " (UNTRAINED reference colorizer: the colours are meaningless)" if untrained else ""
            console.print(f"colorize: {len(written)} PNGs in {output / 'colorize'}{note}")
        failures += _demo_faces(samples, output / "faces", server.grpc_url)
        # reconstruct_face: the astronaut's face as GLB (opens in any web glTF viewer) with its preview.
        if "reconstruct_face" in declared.pipelines:
            from imgpipe.clients.reconstruct import main as reconstruct

            astronaut = [p for p in samples if p.stem == "astronaut"]
            folder = output / "reconstruct"
            code = reconstruct(astronaut, folder, preview=True, url=server.grpc_url, console=console, err=err)
            failures += code != 0
            console.print(f"reconstruct_face (mesh): GLB, JSON and preview in {folder}")
    finally:
        server.stop()
    console.print(
        "[bold]Note:[/] the default segmenter is MediaPipe's selfie segmenter: made for people; on photos "
        "without a person (coffee, chelsea) it removes everything. For objects configure an RMBG-2.0 / "
        "BiRefNet ONNX (README)."
    )
    if failures:
        raise typer.Exit(1)


@app.command()
def bench(
    pipelines: Annotated[str, typer.Option(help="Comma-separated pipelines, or all.")] = "all",
    variants: Annotated[str, typer.Option(help="fp16 (tuned), fp32, naive.")] = "fp16,fp32,naive",
    width: Annotated[int, typer.Option(help="Reference networks' width (64: full cost; 0: the manifest's).")] = 64,
    concurrency: Annotated[str, typer.Option(help="Concurrency levels to sweep.")] = "1,2,4,8,16,32,64",
    duration: Annotated[float, typer.Option(help="Seconds measured per level.")] = 8.0,
    warmup: Annotated[float, typer.Option(help="Seconds of warm-up per level.")] = 2.0,
    model_seconds: Annotated[float, typer.Option(help="Model-only seconds per batch size.")] = 2.0,
    step_instances: Annotated[int, typer.Option(help="Python-step instances (0: automatic).")] = 0,
    build_only: Annotated[bool, typer.Option("--build-only", help="Only build the variants' repositories.")] = False,
    remove_background_format: Annotated[
        str,
        typer.Option(
            "--remove-background-format",
            help="FORMAT of remove_background's responses, one of its contract's (jpeg: sent as MODE composite).",
        ),
    ] = "png",
    photo_size: Annotated[
        str, typer.Option(help="WIDTHxHEIGHT of remove_background's and colorize's photos (a capacity plan per size).")
    ] = "1024x768",
    manifest: ManifestOpt = DEFAULT_MANIFEST,
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for bench.json and the plots.")] = ROOT
    / "out"
    / "bench",
) -> None:
    """Measure every pipeline served (tuned and naive) against its networks alone, in one run; on a GPU it
    uses the GPU. Writes OUTPUT/bench.json and OUTPUT/bench_<pipeline>.png.

    All five pipelines by default (remove_background, detect_faces, swap_face, colorize, reconstruct_face);
    the summary's last column is what one response of the first variant held (format, size, bytes)."""
    from imgpipe import benchmark
    from imgpipe.bench import PIPELINES, REMOVE_BACKGROUND_FORMATS, VARIANTS, BenchOptions, describe_facts, run

    chosen = PIPELINES if pipelines == "all" else tuple(p.strip() for p in pipelines.split(",") if p.strip())
    kinds = tuple(v.strip() for v in variants.split(",") if v.strip())
    cut_out_format = remove_background_format.strip().lower()
    if not chosen or set(chosen) - set(PIPELINES):
        raise _fail(f"--pipelines: choose from {', '.join(PIPELINES)}")
    if not kinds or set(kinds) - set(VARIANTS):
        raise _fail(f"--variants: choose from {', '.join(VARIANTS)}")
    if cut_out_format not in REMOVE_BACKGROUND_FORMATS:
        raise _fail(f"--remove-background-format: choose from {', '.join(REMOVE_BACKGROUND_FORMATS)}")
    try:
        levels = tuple(int(c) for c in concurrency.split(","))
    except ValueError:
        raise _fail(f"--concurrency must be integers, got {concurrency!r}") from None
    from imgpipe.capacity import parse_size

    try:
        photo = parse_size(photo_size)
    except ValueError as exc:
        raise _fail(f"--photo-size: {exc}") from None
    options = BenchOptions(
        pipelines=chosen, variants=kinds, width=width or None, concurrencies=levels, duration_s=duration,
        warmup_s=warmup, model_seconds=model_seconds, step_instances=step_instances, manifest=manifest,
        output=output, build_only=build_only, remove_background_format=cut_out_format, photo_size=photo,
    )  # fmt: skip
    result = run(options, report=lambda message: console.print(message, highlight=False))
    if build_only:
        return
    for variant, by_pipeline in result.served.items():
        for pipeline, points in by_pipeline.items():
            console.print(benchmark.summary_table(points, f"{pipeline}: {variant}", items="images"))
    for pipeline, times in result.times.get(kinds[0], {}).items():
        table = benchmark.stats_table(
            {k: benchmark.ModelTimes(**v) for k, v in times.items()}, f"{pipeline} ({kinds[0]}): where the time goes"
        )
        console.print(table)
    summary = Table(title=f"imgpipe bench on {result.machine.get('gpu', 'CPU')} ({result.machine.get('cpus')} cores)")
    for column in ("pipeline", *(f"{v} /s" for v in kinds), "model-only /s", "served/model", "served/naive",
                   "p99/p50", f"response ({kinds[0]})"):  # fmt: skip
        summary.add_column(column)

    def fmt(value: object, digits: int = 1) -> str:
        return "—" if value is None else f"{value:.{digits}f}"

    for pipeline in chosen:
        entry = result.summary.get(pipeline, {})
        peaks = entry.get("peak", {})
        summary.add_row(pipeline, *(fmt(peaks.get(v, {}).get("throughput")) for v in kinds),
                        fmt(entry.get("model_only_per_s")), fmt(entry.get("served_over_model_only"), 2),
                        fmt(entry.get("served_over_naive"), 2), fmt(entry.get("p99_over_p50_at_peak"), 2),
                        describe_facts(result.responses.get(kinds[0], {}).get(pipeline, {})))  # fmt: skip
    console.print(summary)
    for pipeline in chosen:
        missing = result.summary.get(pipeline, {}).get("model_only_missing")
        if missing:
            console.print(f"{pipeline}: no model-only figure: {', '.join(missing)} could not be timed (bench.json)")
    rooflines = {n: r for p in chosen for n, r in result.summary.get(p, {}).get("rooflines", {}).items()}
    for name, roofline in rooflines.items():
        console.print(
            f"{name}: {roofline['images_per_s']:.0f} items/s × {roofline['gflop_per_image']:.1f} GFLOP ="
            f" {roofline['tflops']:.1f} TFLOP/s, {roofline['share_of_fp16_peak']:.1%} of the FP16 dense peak"
        )
    memory = result.summary.get("gpu_memory")
    if memory:
        console.print(
            f"GPU memory used: FP16 {memory['fp16_bytes'] / 2**30:.1f} GiB,"
            f" FP32 {memory['fp32_bytes'] / 2**30:.1f} GiB ({memory['fp16_over_fp32']:.0%})"
        )
    console.print(f"wrote {output / 'bench.json'} and the plots bench_<pipeline>.png")


if __name__ == "__main__":
    app()
