"""The metrics helpers against the series they promise, read back from the default registry.

Each test uses its own model label, so tests (and other modules' metrics) never collide in the
process-wide registry. The exposition is parsed line by line here, not with prometheus_client's
parser, because that parser renames counters to `..._total` and would hide the one thing the
Triton names must not have.
"""

from __future__ import annotations

import re
import uuid

import pytest
from prometheus_client import REGISTRY, generate_latest

from service import metrics

VERSION = "1"
SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})? (?P<value>\S+)$")
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def finished_call(model: str, version: str, method: str, code: str, seconds: float) -> None:
    """A call as the servicers report one: started, then ended with its status and time."""
    metrics.request_started(model, version)
    metrics.request_ended(model, version, method, code, seconds)


@pytest.fixture
def model() -> str:
    return f"test-{uuid.uuid4().hex[:10]}"


def value(name: str, model: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, {"model": model, "version": VERSION, **labels})


def parse(text: str) -> tuple[dict[str, str], list[tuple[str, dict[str, str], float]]]:
    """The TYPE of each family and every sample line, exactly as written."""
    types: dict[str, str] = {}
    samples = []
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            types[name] = kind
        elif line and not line.startswith("#"):
            match = SAMPLE.match(line)
            assert match, f"unparseable exposition line {line!r}"
            labels = dict(LABEL.findall(match["labels"] or ""))
            samples.append((match["name"], labels, float(match["value"])))
    return types, samples


def test_finished_calls_count_by_code_and_time_by_method(model: str) -> None:
    finished_call(model, VERSION, "Classify", "OK", 0.002)
    finished_call(model, VERSION, "Classify", "OK", 0.004)
    finished_call(model, VERSION, "ModelInfer", "INVALID_ARGUMENT", 0.001)

    ok = {"method": "Classify", "code": "OK"}
    assert value("cnnserve_requests_total", model, **ok) == 2
    bad = {"method": "ModelInfer", "code": "INVALID_ARGUMENT"}
    assert value("cnnserve_requests_total", model, **bad) == 1
    assert value("cnnserve_request_duration_seconds_count", model, method="Classify") == 2
    assert value("cnnserve_request_duration_seconds_sum", model, method="Classify") == 0.006
    le = {"method": "Classify", "le": "0.0025"}
    assert value("cnnserve_request_duration_seconds_bucket", model, **le) == 1
    assert value("nv_inference_request_success", model) == 2
    assert value("nv_inference_request_failure", model) == 1
    # Triton's request duration sums the successful requests only.
    assert value("nv_inference_request_duration_us", model) == pytest.approx(6000)


def test_observe_batch_records_size_waits_and_run_time(model: str) -> None:
    metrics.observe_batch(model, VERSION, 5, [0.001, 0.003], 0.010)
    metrics.observe_batch(model, VERSION, 1, [0.002], 0.004)

    assert value("cnnserve_images_total", model) == 6
    assert value("cnnserve_batch_size_bucket", model, le="1.0") == 1
    assert value("cnnserve_batch_size_bucket", model, le="4.0") == 1
    assert value("cnnserve_batch_size_bucket", model, le="8.0") == 2
    assert value("cnnserve_batch_size_sum", model) == 6
    assert value("cnnserve_queue_duration_seconds_count", model) == 3
    assert value("cnnserve_queue_duration_seconds_sum", model) == pytest.approx(0.006)
    assert value("cnnserve_inference_duration_seconds_count", model) == 2
    assert value("cnnserve_inference_duration_seconds_sum", model) == pytest.approx(0.014)
    assert value("nv_inference_count", model) == 6
    assert value("nv_inference_exec_count", model) == 2
    assert value("nv_inference_queue_duration_us", model) == pytest.approx(6000)
    # As in Triton, each request of a batch is charged the batch's compute time.
    assert value("nv_inference_compute_infer_duration_us", model) == pytest.approx(24000)


def test_queue_depth_and_inflight_gauges(model: str) -> None:
    metrics.set_queue_depth(model, VERSION, 7)
    assert value("cnnserve_queue_depth", model) == 7
    metrics.set_queue_depth(model, VERSION, 0)
    assert value("cnnserve_queue_depth", model) == 0

    metrics.request_started(model, VERSION)
    metrics.request_started(model, VERSION)
    assert value("cnnserve_inflight_requests", model) == 2
    metrics.request_ended(model, VERSION, "Classify", "OK", 0.001)
    assert value("cnnserve_inflight_requests", model) == 1
    metrics.request_ended(model, VERSION, "Classify", "INTERNAL", 0.001)
    assert value("cnnserve_inflight_requests", model) == 0
    assert value("cnnserve_requests_total", model, method="Classify", code="INTERNAL") == 1


def test_model_state_switches_exclusively(model: str) -> None:
    for state in ("loading", "ready", "failed", "loading", "ready", "unloaded"):
        metrics.set_model_state(model, VERSION, state)
        readings = {s: value("cnnserve_model_state", model, state=s) for s in metrics.MODEL_STATES}
        assert readings == {s: (1.0 if s == state else 0.0) for s in metrics.MODEL_STATES}
    with pytest.raises(ValueError, match="sleeping"):
        metrics.set_model_state(model, VERSION, "sleeping")


def test_model_info_and_load_time_follow_the_loaded_session(model: str) -> None:
    cpu = {"provider": "CPUExecutionProvider", "kind": "classifier"}
    cuda = {"provider": "CUDAExecutionProvider", "kind": "classifier"}
    metrics.set_model_state(model, VERSION, "ready", load_seconds=1.5, **cpu)
    assert value("cnnserve_model_info", model, **cpu) == 1
    assert value("cnnserve_model_load_duration_seconds", model) == 1.5

    metrics.set_model_state(model, VERSION, "ready", load_seconds=0.5, **cuda)
    assert value("cnnserve_model_info", model, **cuda) == 1
    assert value("cnnserve_model_info", model, **cpu) is None, "a stale provider series remains"
    assert value("cnnserve_model_load_duration_seconds", model) == 0.5

    metrics.set_model_state(model, VERSION, "unloaded")
    assert value("cnnserve_model_info", model, **cuda) is None


def test_exposition_uses_triton_names_exactly(model: str) -> None:
    metrics.set_model_state(model, VERSION, "ready", provider="CPUExecutionProvider")
    finished_call(model, VERSION, "ModelInfer", "OK", 0.001)
    metrics.observe_batch(model, VERSION, 3, [0.0005], 0.002)

    types, samples = parse(metrics.exposition().decode())
    mine = {name: v for name, labels, v in samples if labels.get("model") == model}
    for name in metrics.TRITON_COUNTERS:
        assert types.get(name) == "counter", f"{name} is not typed counter as in Triton"
        assert name in mine, f"{name} is missing"
        assert f"{name}_total" not in mine and f"{name}_total" not in types
    assert mine["nv_inference_count"] == 3
    assert mine["nv_inference_request_success"] == 1
    assert mine["nv_inference_request_failure"] == 0  # a loaded model shows zeros, as Triton

    # prometheus_client's own exposition keeps the exact sample names too (typed untyped).
    _, plain = parse(generate_latest(REGISTRY).decode())
    plain_names = {name for name, labels, _ in plain if labels.get("model") == model}
    assert set(metrics.TRITON_COUNTERS) <= plain_names
    assert not any(name.startswith("nv_") and name.endswith("_total") for name in plain_names)


def test_every_required_series_is_exposed(model: str) -> None:
    metrics.set_model_state(model, VERSION, "ready", "CPUExecutionProvider", "classifier", 0.1)
    finished_call(model, VERSION, "Classify", "OK", 0.001)
    metrics.observe_batch(model, VERSION, 1, [0.0001], 0.001)
    metrics.set_queue_depth(model, VERSION, 0)
    metrics.request_started(model, VERSION)
    types, samples = parse(metrics.exposition().decode())
    metrics.request_ended(model, VERSION, "Classify", "OK", 0.001)
    mine = {name for name, labels, _ in samples if labels.get("model") == model}
    expected = {
        "cnnserve_requests_total": "counter",
        "cnnserve_request_duration_seconds": "histogram",
        "cnnserve_queue_duration_seconds": "histogram",
        "cnnserve_inference_duration_seconds": "histogram",
        "cnnserve_batch_size": "histogram",
        "cnnserve_queue_depth": "gauge",
        "cnnserve_inflight_requests": "gauge",
        "cnnserve_images_total": "counter",
        "cnnserve_model_load_duration_seconds": "gauge",
        "cnnserve_model_state": "gauge",
        "cnnserve_model_info": "gauge",
    }
    for name, kind in expected.items():
        assert types.get(name) == kind, name
        assert name in mine or f"{name}_count" in mine, f"{name} has no sample for the model"
    assert not any(name.endswith("_created") for name in types), "created series are disabled"


def test_statistics_agree_with_the_metrics(model: str) -> None:
    empty = metrics.statistics(model, VERSION)
    assert empty["success"] == {"count": 0, "ns": 0} and empty["last_inference"] == 0

    finished_call(model, VERSION, "Classify", "OK", 0.0031)
    finished_call(model, VERSION, "Classify", "DEADLINE_EXCEEDED", 0.0107)
    metrics.observe_batch(model, VERSION, 4, [0.0002, 0.0004], 0.0015)
    metrics.observe_batch(model, VERSION, 2, [0.0003], 0.0009)
    stats = metrics.statistics(model, VERSION)

    assert stats["success"]["count"] == value("nv_inference_request_success", model) == 1
    assert stats["fail"]["count"] == value("nv_inference_request_failure", model) == 1
    assert stats["success"]["ns"] == 3_100_000
    assert stats["success"]["ns"] / 1000 == value("nv_inference_request_duration_us", model)
    assert stats["fail"]["ns"] == 10_700_000
    assert stats["inference_count"] == value("nv_inference_count", model) == 6
    assert stats["inference_count"] == value("cnnserve_images_total", model)
    assert stats["execution_count"] == value("nv_inference_exec_count", model) == 2
    assert stats["execution_count"] == value("cnnserve_batch_size_count", model)
    assert stats["queue"]["count"] == value("cnnserve_queue_duration_seconds_count", model) == 3
    assert stats["queue"]["ns"] / 1000 == value("nv_inference_queue_duration_us", model)
    assert stats["compute_infer"]["count"] == 3
    compute_us = value("nv_inference_compute_infer_duration_us", model)
    assert (
        stats["compute_infer"]["ns"] == 3_900_000
        and stats["compute_infer"]["ns"] / 1000 == compute_us
    )
    assert stats["last_inference"] > 0
