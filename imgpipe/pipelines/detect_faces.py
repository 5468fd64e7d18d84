"""``detect_faces``: a BLS model running the MTCNN cascade (pnet/rnet/onet), or one network decoded as
SCRFD/RetinaFace or YuNet (user ONNX files) or as MediaPipe's BlazeFace short-range detector. The step
lives in :mod:`imgpipe.ensembles.detect_faces`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from imgpipe.imaging import IntakeSettings
from imgpipe.manifest import Instances, Manifest, ManifestError
from imgpipe.pipelines.registry import IO, BuildContext, Contract, Param, Pipeline, bls_model, register, settings_json

IMAGE = IO("IMAGE", "BYTES", (1,), "encoded image: JPEG, PNG or WebP bytes, EXIF orientation applied")
BOXES = IO(
    "BOXES", "FP32", (-1, 4), "one row per face: x1, y1, x2, y2 in pixels of the EXIF-oriented image, best first"
)
SCORES = IO("SCORES", "FP32", (-1,), "face confidence in [0, 1], same order as BOXES")
LANDMARKS = IO(
    "LANDMARKS",
    "FP32",
    (-1, 5, 2),
    "five points (x, y) per face in pixels: left eye, right eye, nose, left mouth corner, right mouth corner",
)
MESH = IO(
    "MESH",
    "FP32",
    (-1, 468, 3),
    "MediaPipe's 468-point face mesh per face, same order as BOXES: x, y in pixels, z (depth) in the same units,"
    " smaller towards the camera; computed only when requested (the face mesh network runs on each face)",
    optional=True,
)

# Request parameters of the detector; swap_face accepts none of them (it uses the defaults). The ranges bound
# the work one request can ask for (issue 12: thresholds 0 with scale factor 0.95 once took 20-40 s on a 256²
# image): a scale step above 0.85 multiplies pnet's work (1 / (1 - step²): 2.0x at 0.709, 3.6x at 0.85, 10x at
# 0.95); the MTCNN stages keep their best candidates (ensembles.mtcnn.MAX_CANDIDATES), and the pyramid is held
# to the pipeline's max_pyramid_pixels.
DETECTOR_PARAMETERS = (
    Param("min_face_size", "int", 20, "smallest face to find, in pixels (MTCNN)", low=12, high=10_000),
    Param("pnet_threshold", "float", 0.6, "MTCNN proposal-stage threshold", low=0.05, high=1.0),
    Param("rnet_threshold", "float", 0.7, "MTCNN refinement-stage threshold", low=0.05, high=1.0),
    Param("onet_threshold", "float", 0.7, "MTCNN output-stage threshold", low=0.05, high=1.0),
    Param("scale_factor", "float", 0.709, "MTCNN image-pyramid scale step", low=0.5, high=0.85),
    Param("max_faces", "int", 100, "the most faces returned, best scores first", low=1, high=1000),
    Param(
        "score_threshold",
        "float",
        None,
        "minimum face score of the single-network detectors, when not given SCRFD 0.5, YuNet 0.6,"
        " BlazeFace 0.5 (MediaPipe's min_score_thresh); MTCNN ignores it",
        low=0.0,
        high=1.0,
    ),
)

CONTRACT = Contract(
    model="detect_faces",
    summary="Face detection: one encoded image in, boxes, scores and 5-point landmarks of every face out.",
    inputs=(IMAGE,),
    outputs=(BOXES, SCORES, LANDMARKS, MESH),
    parameters=DETECTOR_PARAMETERS,
)


class _DefaultSize(int):
    """The input_size a manifest did not set: each single-network detector's own (see Settings)."""


DETECTOR_INPUT_SIZES = {"scrfd": 640, "yunet": 640, "blazeface": 128}
BLAZEFACE_SHAPES = {"inputs": ((128, 128, 3),), "outputs": ((896, 16), (896, 1))}


@dataclass(frozen=True)
class Settings(IntakeSettings):
    """``[pipelines.detect_faces]``: the MTCNN cascade (``pnet``/``rnet``/``onet``), or one network
    (``network``, square input ``input_size``) decoded as SCRFD/RetinaFace or YuNet (a user ONNX file,
    input_size 640 unless set) or as MediaPipe's BlazeFace short-range detector (``blazeface``: the
    manifest's imported TFLite network; its input is 128, implied, and no other size is accepted)."""

    detector: Literal["mtcnn", "scrfd", "yunet", "blazeface"] = "mtcnn"
    network: str = ""
    input_size: int = _DefaultSize(640)
    pnet: str = "pnet"
    rnet: str = "rnet"
    onet: str = "onet"
    instances: Instances = field(default_factory=Instances)
    mesh: str = "face_mesh"  # the face landmark network behind the MESH output ("" = no MESH)
    # MTCNN's work bound: pixels over its whole image pyramid (a 12-megapixel photo at min_face_size 20: 8.7 M).
    # detect_faces refuses a request past it, naming the min_face_size that fits; swap_face and
    # reconstruct_face (which take no detector parameters) raise their min_face_size to fit instead.
    max_pyramid_pixels: int = 16_000_000

    def __post_init__(self) -> None:
        super().__post_init__()  # the intake limits
        if self.max_pyramid_pixels < 144:
            raise ManifestError(
                f"max_pyramid_pixels: must be at least 144 (one pnet window), got {self.max_pyramid_pixels}"
            )
        if isinstance(self.input_size, _DefaultSize):  # not set: the detector's own size, a plain int
            object.__setattr__(self, "input_size", DETECTOR_INPUT_SIZES.get(self.detector, int(self.input_size)))
        if self.detector == "blazeface" and self.input_size != DETECTOR_INPUT_SIZES["blazeface"]:
            raise ManifestError(f"input_size: BlazeFace's input is 128×128, got {self.input_size}")


def detector_networks(settings: Settings) -> dict[str, str]:
    """Role → network name of the configured detector (shared with swap_face)."""
    if settings.detector == "mtcnn":
        return {"pnet": settings.pnet, "rnet": settings.rnet, "onet": settings.onet}
    return {"network": settings.network}


def detector_roles(settings: Settings) -> dict[str, str]:
    """The BLS roles of the detector's networks (the single-network detectors' role is "detector")."""
    return {("detector" if k == "network" else k): v for k, v in detector_networks(settings).items()}


@register
class DetectFaces(Pipeline):
    name = "detect_faces"
    settings = Settings
    contract = CONTRACT

    def networks(self, settings: Settings) -> dict[str, str]:
        return {**detector_networks(settings), **({"mesh": settings.mesh} if settings.mesh else {})}

    def validate(self, manifest: Manifest, settings: Settings) -> None:
        if settings.detector != "mtcnn" and not settings.network:
            raise ManifestError(f"pipelines.detect_faces.network: required when detector = {settings.detector!r}")
        if settings.detector == "blazeface":
            network = manifest.network(settings.network)
            shapes = {
                "inputs": tuple(t.shape for t in network.inputs),
                "outputs": tuple(t.shape for t in network.outputs),
            }
            if shapes != BLAZEFACE_SHAPES:
                raise ManifestError(
                    f"pipelines.detect_faces.network: {settings.network!r} is not a BlazeFace short-range network:"
                    f" expected input [128, 128, 3] (NHWC, RGB in [-1, 1]) and outputs regressors [896, 16],"
                    f" classificators [896, 1], got {shapes}"
                )

    def models(self, ctx: BuildContext, settings: Settings) -> list[Any]:
        from imgpipe.ensembles.detect_faces import DetectFaces as Step

        return [
            bls_model(
                CONTRACT,
                Step,
                settings,
                ctx.manifest,
                {**detector_roles(settings), **({"mesh": settings.mesh} if settings.mesh else {})},
                extra={"imgpipe.detector": settings_json(settings)},
            )
        ]
