"""Property-based fuzzing of request decoding on both APIs, against one real server.

Hypothesis draws hostile requests (fuzz_requests.py): mutated PNG/JPEG/GIF/BMP/WebP (truncated,
flipped, corrupt headers, sizes declared far over the pixel limit), raw pixels and tensors of
random shapes, dtypes and values (NaN, infinity), empty and oversized batches, hostile model
names and versions, unknown feature names, and messages over the receive limit. Every case must
end in a status its category allows, never UNKNOWN, INTERNAL or a timeout, with a short message
that names the field and shows no path of the server's. After every case a known-good request
must still get the probabilities it got before fuzzing began, so a case that breaks the server
or corrupts shared state fails at once, not in some later test.

CNNSERVE_FUZZ_EXAMPLES sets the examples per property (default 60, sized for CI);
CNNSERVE_FUZZ_REPORT names a JSON file for the cases run per category and final status. Runs
are derandomized (a fixed seed per property) and keep no example database.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, currently_in_test_context, given, note, settings
from hypothesis import strategies as st

from service.proto import cnnserve_pb2 as pb
from service.proto import grpc_service_pb2 as oip
from service.proto import grpc_service_pb2_grpc as oip_grpc
from tests.integration.conftest import RunningServer, start_server
from tests.integration.fuzz_requests import (
    BOMBS,
    HOSTILE,
    HOSTILE_VERSIONS,
    MAX_IMAGES,
    MAX_PIXELS,
    MODELS,
    MUTATIONS,
    OIP_FLAWS,
    OK,
    PIXEL_FLAWS,
    RECEIVE_LIMIT,
    RECEIVE_MB,
    TENSOR_FLAWS,
    Expect,
    NativeCase,
    Seeds,
    batch_case,
    encoded_seeds,
    expect,
    feature_case,
    good_image,
    image_case,
    infer_request,
    lookup_expect,
    models_for,
    name_and_version,
    named_case,
    oip_case,
)
from tests.integration.test_service import png, reference

EXAMPLES = int(os.environ.get("CNNSERVE_FUZZ_EXAMPLES", "60"))
REPORT = os.environ.get("CNNSERVE_FUZZ_REPORT")
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,  # each call carries its own gRPC deadline instead
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
CALL_TIMEOUT = 30.0  # seconds: a hang ends as DEADLINE_EXCEEDED, which no category allows
MAX_DETAILS = 1000  # characters: a refusal says what to fix; it does not echo the request back
CODES = {code.value[0]: code for code in grpc.StatusCode}

TALLY: defaultdict[str, Counter[str]] = defaultdict(Counter)
# Pillow warns (and our limit then refuses) for declared sizes between 1x and 2x its own guard.
pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")


class Target:
    """The server under fuzzing, its stubs, and the known-good request it must keep answering."""

    def __init__(self, running: RunningServer, repository: Path, pixels: np.ndarray) -> None:
        self.running = running
        self.repository = repository
        self.native = running.stub
        self.oip = oip_grpc.GRPCInferenceServiceStub(running.channel)
        self.known = pb.ClassifyRequest(model="lenet5", images=[pb.Image(encoded=png(pixels))])
        self.baseline = self.probabilities()
        (want,) = reference(repository, "lenet5", pixels, ["probabilities"])
        np.testing.assert_allclose(self.baseline, want[0], atol=1e-6)
        self.checks = 0
        infos = {m: self.native.GetModel(pb.GetModelRequest(model=m)) for m in MODELS}
        self.versions = {m: {v.version for v in info.versions} for m, info in infos.items()}
        self.features = {m: [f.name for f in info.features] for m, info in infos.items()}
        assert all(self.features.values()), "FeatureMaps cases assume every model has features"
        # What no message may show unless the client sent it: the server's paths and internals.
        self.secrets = (str(repository), os.getcwd(), "model.onnx", "model.json", "Traceback")

    def probabilities(self) -> np.ndarray:
        reply = self.native.Classify(self.known, timeout=CALL_TIMEOUT)
        return np.array(reply.results[0].probabilities, dtype=np.float32)

    def check(self) -> None:
        """The server is up and the known-good request still gets the very same answer."""
        assert self.running.thread.is_alive(), "the server's event loop thread died"
        np.testing.assert_array_equal(self.probabilities(), self.baseline)
        self.checks += 1

    def judge(self, case: Expect, code: grpc.StatusCode, details: str) -> None:
        """Count the case, then hold it to its category's codes and message rules."""
        TALLY[case.category][code.name] += 1
        if currently_in_test_context():
            note(f"{case.category}: {code.name} {details[:300]!r}")
        assert code in case.codes, f"{case.category}: {code.name} {details[:300]!r}"
        if code is OK:
            return
        assert details.strip(), f"{case.category}: {code.name} with an empty message"
        for part in case.says:
            assert part in details, f"{case.category}: {part!r} not in {details[:300]!r}"
        assert len(details) <= MAX_DETAILS, f"{case.category}: a {len(details)}-character message"
        for secret in self.secrets:
            if secret in details:
                assert any(secret in s for s in case.sent), f"{secret!r} leaked: {details!r}"


def outcome(call: Any, request: Any) -> tuple[grpc.StatusCode, str, Any]:
    try:
        return OK, "", call(request, timeout=CALL_TIMEOUT)
    except grpc.RpcError as error:
        return error.code(), error.details() or "", None


@pytest.fixture(scope="module")
def target(tiny_repository: Path, fmnist) -> Iterator[Target]:
    started = time.perf_counter()
    running = start_server(
        tiny_repository,
        models=MODELS,
        max_images_per_request=MAX_IMAGES,
        max_pixels=MAX_PIXELS,
        max_receive_message_mb=RECEIVE_MB,
    )
    fuzzed: Target | None = None
    try:
        fuzzed = Target(running, tiny_repository, fmnist.test_images[0])
        yield fuzzed
        fuzzed.check()  # once more at the end
    finally:
        running.stop()
        report(fuzzed.checks if fuzzed else 0, time.perf_counter() - started)


def report(checks: int, seconds: float) -> None:
    """Print the case counts, and write them as JSON where CNNSERVE_FUZZ_REPORT says."""
    statuses: Counter[str] = Counter()
    for counts in TALLY.values():
        statuses.update(counts)
    summary = {
        "examples_per_property": EXAMPLES,
        "cases": sum(statuses.values()),
        "known_good_checks": checks,
        "seconds": round(seconds, 1),
        "status": dict(sorted(statuses.items())),
        "categories": {
            category: {"cases": sum(counts.values()), "status": dict(sorted(counts.items()))}
            for category, counts in sorted(TALLY.items())
        },
    }
    print(f"\nfuzz: {summary['cases']} cases, {checks} known-good checks, {summary['status']}")
    if REPORT:
        Path(REPORT).write_text(json.dumps(summary, indent=2) + "\n")


@pytest.fixture(scope="module")
def seeds(fmnist) -> Seeds:
    return encoded_seeds(fmnist.test_images)


def run_native(target: Target, method: str, case: NativeCase) -> None:
    request_type = pb.ClassifyRequest if method == "Classify" else pb.FeatureMapsRequest
    code, details, reply = outcome(getattr(target.native, method), request_type(**case.fields))
    target.judge(case.expect, code, details)
    if reply is not None:
        assert len(reply.results) == len(case.fields["images"])
        for result in reply.results:
            if method == "Classify":
                probabilities = np.array(result.probabilities)
                assert probabilities.shape == (10,) and np.isfinite(probabilities).all()
                assert abs(probabilities.sum() - 1) < 1e-3
            else:
                assert result.features
    target.check()


methods = st.sampled_from(["Classify", "FeatureMaps"])


# cnnserve.v1 --------------------------------------------------------------------------------


@pytest.mark.parametrize("how", MUTATIONS)
@FUZZ
@given(data=st.data())
def test_encoded_images_end_in_the_right_status(target: Target, seeds: Seeds, how, data) -> None:
    """Intact files succeed; broken ones may still decode, or are refused naming the image."""
    method = data.draw(methods)
    run_native(target, method, data.draw(image_case(seeds, method, "encoded", how)))


@pytest.mark.parametrize("kind", BOMBS)
@FUZZ
@given(data=st.data())
def test_declared_sizes_over_the_pixel_limit_are_refused(target, seeds, kind, data) -> None:
    """Refused by the pixel limit, not decoded: decoding the patched headers would fail with
    another message, and decoding the real bomb would take 16 M pixels of memory."""
    method = data.draw(methods)
    run_native(target, method, data.draw(image_case(seeds, method, "bomb", kind)))


@pytest.mark.parametrize("flaw", PIXEL_FLAWS)
@FUZZ
@given(data=st.data())
def test_raw_pixels_end_in_the_right_status(target: Target, flaw: str, data) -> None:
    method = data.draw(methods)
    run_native(target, method, data.draw(image_case([], method, "pixels", flaw)))


@pytest.mark.parametrize("flaw", TENSOR_FLAWS)
@FUZZ
@given(data=st.data())
def test_tensors_end_in_the_right_status(target: Target, flaw: str, data) -> None:
    method = data.draw(methods)
    run_native(target, method, data.draw(image_case([], method, "tensor", flaw)))


@FUZZ
@given(data=st.data())
def test_batches_are_limited(target: Target, data) -> None:
    method = data.draw(methods)
    run_native(target, method, data.draw(batch_case(method)))


@FUZZ
@given(data=st.data())
def test_feature_names_are_checked(target: Target, data) -> None:
    method = data.draw(methods)
    run_native(target, method, data.draw(feature_case(target.features, method)))


@FUZZ
@given(data=st.data())
def test_stream_items_each_end_in_the_right_status(target: Target, seeds: Seeds, data) -> None:
    """A bad item answers inline with its own status; the stream goes on and ends OK."""
    item = (
        image_case(seeds, "Classify")
        | batch_case("Classify")
        | feature_case(target.features, "Classify")
        | name_and_version(target.versions, models_for("Classify")).map(named_case)
    )
    cases = data.draw(st.lists(item, min_size=1, max_size=6))
    items = [
        pb.ClassifyStreamRequest(id=f"item-{i}", request=pb.ClassifyRequest(**case.fields))
        for i, case in enumerate(cases)
    ]
    replies = list(target.native.ClassifyStream(iter(items), timeout=CALL_TIMEOUT))
    assert [r.id for r in replies] == [item.id for item in items]
    for case, reply in zip(cases, replies, strict=True):
        inline = dataclasses.replace(case.expect, category=f"stream/{case.expect.category}")
        if reply.WhichOneof("result") == "response":
            target.judge(inline, OK, "")
            assert len(reply.response.results) == len(case.fields["images"])
        else:
            target.judge(inline, CODES[reply.error.code], reply.error.message)
    target.check()


# Both APIs ----------------------------------------------------------------------------------

LOOKUPS = ["Classify", "FeatureMaps", "GetModel", "ModelInfer", "ModelMetadata", "ModelReady"]


def lookup_request(method: str, name: str, version: str) -> Any:
    if method == "Classify":
        return pb.ClassifyRequest(model=name, version=version, images=[good_image()])
    if method == "FeatureMaps":
        return pb.FeatureMapsRequest(model=name, version=version, images=[good_image()])
    if method == "GetModel":
        return pb.GetModelRequest(model=name, version=version)
    if method == "ModelInfer":
        return infer_request(name, version)
    if method == "ModelMetadata":
        return oip.ModelMetadataRequest(name=name, version=version)
    return oip.ModelReadyRequest(name=name, version=version)


def look_up(target: Target, method: str, name: str, version: str) -> None:
    """One lookup by name and version through `method`, judged and followed by the check."""
    case = lookup_expect(name, version, target.versions, models_for(method))
    case = dataclasses.replace(case, category=f"{case.category}/{method}")
    stub = target.oip if method.startswith("Model") else target.native
    code, details, reply = outcome(getattr(stub, method), lookup_request(method, name, version))
    if method == "ModelReady":  # never an error, as in Triton: the answer says not ready
        target.judge(dataclasses.replace(case, codes=frozenset({OK})), code, details)
        assert reply.ready == (OK in case.codes), (name[:80], version[:80])
    else:
        target.judge(case, code, details)
    if method == "GetModel" and reply is not None:
        assert reply.name == name
    target.check()


@pytest.mark.parametrize("method", LOOKUPS)
def test_every_listed_hostile_name_and_version(target: Target, method: str) -> None:
    """The fixed lists in full, and the repository's own paths: no name reaches the disk."""
    root = target.repository
    paths = [str(root), str(root / "lenet5"), str(root / "lenet5" / "1" / "model.onnx")]
    paths += [f"../{root.name}/lenet5", f"{root}/../{root.name}/mlp"]
    for name in [*HOSTILE, *paths]:
        look_up(target, method, name, "")
    for version in HOSTILE_VERSIONS:
        look_up(target, method, models_for(method)[0], version)


@pytest.mark.parametrize("method", LOOKUPS)
@FUZZ
@given(data=st.data())
def test_model_names_and_versions_are_only_looked_up(target: Target, method: str, data) -> None:
    """Random and hostile names and versions on every RPC that takes one; no path leaks."""
    name, version, _ = data.draw(name_and_version(target.versions, models_for(method)))
    look_up(target, method, name, version)


# Open Inference Protocol --------------------------------------------------------------------


@pytest.mark.parametrize("flaw", OIP_FLAWS)
@FUZZ
@given(data=st.data())
def test_oip_tensors_end_in_the_right_status(target: Target, flaw: str, data) -> None:
    request, case = data.draw(oip_case(flaw))
    code, details, reply = outcome(target.oip.ModelInfer, request)
    target.judge(case, code, details)
    if reply is not None:
        assert len(reply.raw_output_contents) == len(reply.outputs) >= 1
        assert reply.outputs[0].shape[0] == request.inputs[0].shape[0]
    target.check()


@FUZZ
@given(count=st.integers(0, MAX_IMAGES + 4) | st.integers(MAX_IMAGES + 1, 2**63 - 1))
def test_oip_batches_are_limited(target: Target, count: int) -> None:
    request = infer_request("mlp", count=min(count, MAX_IMAGES + 4))
    request.inputs[0].shape[0] = count
    if count == 0:
        case = expect("oip-batch/empty", False, "input 'image'", "holds no image")
    elif count > MAX_IMAGES:
        case = expect("oip-batch/over-limit", False, f"over the limit of {MAX_IMAGES}")
    else:
        case = expect("oip-batch/within-limit", True)
    code, details, reply = outcome(target.oip.ModelInfer, request)
    target.judge(case, code, details)
    if reply is not None:
        assert reply.outputs[0].shape[0] == count
    target.check()


@FUZZ
@given(
    api=st.sampled_from(["native", "oip"]),
    size=st.integers(RECEIVE_LIMIT + 1, 2 * RECEIVE_LIMIT) | st.integers(1, RECEIVE_LIMIT // 2),
)
def test_messages_over_the_receive_limit_are_refused(target: Target, api: str, size: int) -> None:
    """Refused by gRPC before any decoding; one under the limit is decoded and refused."""
    payload = b"\x89PNG\r\n\x1a\n" + bytes(size)
    if api == "native":
        request = pb.ClassifyRequest(model="lenet5", images=[pb.Image(encoded=payload)])
        code, details, _ = outcome(target.native.Classify, request)
        says = "images[0].encoded"
    else:
        request = infer_request("lenet5")
        request.raw_input_contents[0] = payload
        code, details, _ = outcome(target.oip.ModelInfer, request)
        says = "input 'image'"
    if request.ByteSize() > RECEIVE_LIMIT:
        exhausted = frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED})
        case = Expect(f"oversized/{api}", exhausted, ("larger than max",))
    else:
        case = expect(f"under-limit/{api}", False, says)
    target.judge(case, code, details)
    target.check()
