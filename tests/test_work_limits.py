"""Work limits and public models (issue 12, deliverable 2): request parameters that multiply work are bounded,
every model's queue is bounded and has a timeout, and the networks and steps behind the pipelines refuse
callers from outside."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
import torch

from imgpipe.build.triton_config import parse
from imgpipe.clients.triton import InferenceError, TritonClient
from imgpipe.ensembles import mtcnn
from imgpipe.errors import InvalidInputError
from imgpipe.guard import INTERNAL_KEY_PARAM, VISIBILITY_PARAM, check_internal
from imgpipe.manifest import Manifest, ManifestError, QueuePolicy
from imgpipe.pipelines import detect_faces as declared
from imgpipe.pipelines.registry import model_visibility, registry
from imgpipe.samples import encode, sample_array


def _configs(repository: Path) -> dict[str, object]:
    return {d.name: parse((d / "config.pbtxt").read_text()) for d in repository.iterdir() if d.is_dir()}


def test_the_entry_models_have_bounded_queues_and_the_inner_models_none(
    repository: Path, test_manifest: Manifest
) -> None:
    """Each pipeline's entry model (the public BLS model, or an ensemble's first step) has a bounded queue with a
    timeout that rejects; the networks and inner steps have none: Triton 2.51's batcher stalls requests behind a
    queue policy (detect_faces with policies on pnet/rnet/onet: median 1,092 ms against 169 ms)."""
    configs = _configs(repository)
    entries = set()
    for name in test_manifest.pipelines:
        model = registry()[name].contract.model
        entries.add("bg_preprocess" if configs[model].platform == "ensemble" else model)
    for name, config in configs.items():
        if config.platform == "ensemble":
            continue
        assert config.HasField("dynamic_batching"), name
        policy = config.dynamic_batching.default_queue_policy
        if name in entries:
            assert policy.max_queue_size >= 1 and policy.default_timeout_microseconds >= 1, name
            assert policy.timeout_action == 0, name  # REJECT: a full or stale queue answers at once
        else:
            assert not config.dynamic_batching.HasField("default_queue_policy"), name


def test_the_pipelines_own_models_take_the_pipeline_queue_and_let_callers_shorten_the_timeout(
    repository: Path, test_manifest: Manifest
) -> None:
    configs = _configs(repository)
    for name, settings in test_manifest.pipelines.items():
        model = registry()[name].contract.model
        holder = "bg_preprocess" if configs[model].platform == "ensemble" else model  # an ensemble's first step
        policy = configs[holder].dynamic_batching.default_queue_policy
        assert policy.max_queue_size == settings.queue.max_queue_size, name
        assert policy.allow_timeout_override, name


def test_unbounded_queues_and_missing_timeouts_are_refused() -> None:
    with pytest.raises(ManifestError, match="max_queue_size: must be at least 1"):
        QueuePolicy(max_queue_size=0)
    with pytest.raises(ManifestError, match="default_timeout_us: must be at least 1"):
        QueuePolicy(default_timeout_us=0)


def test_every_model_says_who_may_call_it(repository: Path, test_manifest: Manifest) -> None:
    configs = _configs(repository)
    visibility = {name: config.parameters[VISIBILITY_PARAM].string_value for name, config in configs.items()}
    public = {registry()[p].contract.model for p in test_manifest.pipelines}
    assert {n for n, v in visibility.items() if v == "public"} == public
    segmenter = test_manifest.pipelines["remove_background"].segmenter
    assert {n for n, v in visibility.items() if v == "ensemble-step"} == {"bg_preprocess", segmenter, "bg_postprocess"}
    assert {"pnet", "rnet", "onet", "face_mesh", "colorizer", "swapper", "face_regressor"} <= {
        n for n, v in visibility.items() if v == "internal"
    }
    assert model_visibility(test_manifest) == {
        k: v for k, v in visibility.items() if k in model_visibility(test_manifest)
    }


def test_the_internal_guard_wants_the_servers_key() -> None:
    check_internal("pnet", "internal", {}, None)  # no key set (a tritonserver started by hand): open
    check_internal("bg_preprocess", "ensemble-step", {}, "secret-key")
    check_internal("pnet", "internal", {INTERNAL_KEY_PARAM: "secret-key"}, "secret-key")
    for given in ({}, {INTERNAL_KEY_PARAM: "guess"}, {INTERNAL_KEY_PARAM: 7}):
        with pytest.raises(InvalidInputError, match="'pnet' is internal to imgpipe and not callable from outside"):
            check_internal("pnet", "internal", given, "secret-key")


@pytest.mark.server
def test_internal_networks_refuse_outside_callers_and_the_pipelines_still_work(client: TritonClient) -> None:
    with pytest.raises(InferenceError, match="'pnet' is internal to imgpipe") as info:
        client.infer("pnet", {"input_1": np.zeros((1, 12, 12, 3), np.float32)}, ["conv2d_4"])
    assert info.value.is_invalid_argument
    with pytest.raises(InferenceError, match="internal to imgpipe"):  # a guessed key is no key
        client.infer(
            "onet", {"input_3": np.zeros((1, 48, 48, 3), np.float32)}, ["softmax_2"],
            parameters={INTERNAL_KEY_PARAM: "guessed-key-guessed-key"},
        )  # fmt: skip
    image = np.array([encode(sample_array("astronaut"), "JPEG")], dtype=object)
    assert len(client.infer("detect_faces", {"IMAGE": image}, ["SCORES"])["SCORES"]) == 1  # pnet/rnet/onet via BLS


@pytest.mark.server
def test_remove_background_refuses_unknown_request_parameters(client: TritonClient) -> None:
    image = np.array([[encode(sample_array("astronaut"), "JPEG")]], dtype=object)
    with pytest.raises(InferenceError, match="unknown parameter 'quality': expected none") as info:
        client.infer("remove_background", {"IMAGE": image}, ["OUTPUT"], parameters={"quality": 5})
    assert info.value.is_invalid_argument


# -- detector work ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"scale_factor": 0.95}, "'scale_factor' must be within"),
        ({"pnet_threshold": 0.0}, "'pnet_threshold' must be within"),
        ({"onet_threshold": 0.01}, "'onet_threshold' must be within"),
        ({"max_faces": 0}, "'max_faces' must be within"),
        ({"max_faces": 5000}, "'max_faces' must be within"),
    ],
)
def test_work_multiplying_parameters_are_bounded(parameters: dict, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        declared.CONTRACT.parse_parameters(parameters)


def test_pyramid_work_and_the_smallest_face_size_that_fits() -> None:
    params = mtcnn.MtcnnParams()
    assert mtcnn.pyramid_pixels(256, 256, params) < 256 * 256 * (12 / 20) ** 2 / (1 - 0.709**2) + 256 * 40
    budget = 2_000_000
    size = mtcnn.fit_min_face_size(4000, 3000, params, budget)
    assert size > params.min_face_size
    assert mtcnn.pyramid_pixels(4000, 3000, mtcnn.MtcnnParams(min_face_size=size)) <= budget
    assert mtcnn.pyramid_pixels(4000, 3000, mtcnn.MtcnnParams(min_face_size=size - 1)) > budget * 0.97


def test_every_pnet_cell_a_candidate_still_sends_a_bounded_batch_to_rnet_and_onet() -> None:
    """Thresholds at their lowest with a pnet that scores every cell: the cascade keeps its best candidates
    (each level, across levels, into rnet and onet) instead of cropping tens of thousands of boxes."""
    params = mtcnn.MtcnnParams(min_face_size=12, thresholds=(0.05, 0.05, 0.05), scale_factor=0.85)
    image = torch.from_numpy(sample_array("astronaut"))
    sizes: dict[str, int] = {}
    rng = torch.Generator().manual_seed(0)

    async def run(role: str, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        n = x.shape[0]
        sizes[role] = max(sizes.get(role, 0), n)
        if role == "pnet":
            w, h = (x.shape[1] - 12) // 2 + 1, (x.shape[2] - 12) // 2 + 1
            face = torch.rand((1, w, h), generator=rng) * 0.5 + 0.5
            return torch.zeros((1, w, h, 4)), torch.stack([1 - face, face], dim=-1)
        prob = torch.full((n, 2), 0.5)
        return (torch.zeros((n, 4)), torch.rand((n, 10), generator=rng), prob) if role == "onet" else (
            torch.zeros((n, 4)), prob)  # fmt: skip

    faces = asyncio.run(mtcnn.detect(image, params, run))
    assert sizes["rnet"] <= mtcnn.MAX_CANDIDATES and sizes["onet"] <= mtcnn.MAX_CANDIDATES
    assert sizes["rnet"] > 100 and len(faces) > 0  # the bound bit, and the cascade still answers


@pytest.mark.server
def test_detect_faces_returns_at_most_max_faces_best_first(client: TritonClient) -> None:
    face = sample_array("astronaut")[:256, 96:352]
    pair = encode(np.concatenate([face, face[:, ::-1]], axis=1), "PNG")  # two faces side by side
    image = np.array([pair], dtype=object)
    both = client.infer("detect_faces", {"IMAGE": image}, ["SCORES", "BOXES"])
    one = client.infer("detect_faces", {"IMAGE": image}, ["SCORES", "BOXES"], parameters={"max_faces": 1})
    assert len(both["SCORES"]) == 2 and len(one["SCORES"]) == 1
    assert one["SCORES"][0] == both["SCORES"].max()
    np.testing.assert_allclose(one["BOXES"][0], both["BOXES"][int(both["SCORES"].argmax())])


@pytest.mark.server
def test_detect_faces_refuses_a_pyramid_past_its_budget_naming_the_face_size_that_fits(
    client: TritonClient, test_manifest: Manifest
) -> None:
    budget = test_manifest.pipelines["detect_faces"].max_pyramid_pixels
    side = int((budget * (1 - 0.709**2)) ** 0.5) + 64  # at min_face_size 12 (scale 1) the pyramid is past it
    image = np.array([encode(np.full((side, side, 3), 128, np.uint8), "PNG")], dtype=object)
    with pytest.raises(InferenceError, match=r"needs more detector work than allowed: use min_face_size \d+") as info:
        client.infer("detect_faces", {"IMAGE": image}, ["SCORES"], parameters={"min_face_size": 12})
    assert info.value.is_invalid_argument
    size = int(info.value.message.split("use min_face_size ")[1].split()[0])
    fits = client.infer("detect_faces", {"IMAGE": image}, ["SCORES"], parameters={"min_face_size": size})
    assert len(fits["SCORES"]) == 0  # a grey square: answered, with no face
