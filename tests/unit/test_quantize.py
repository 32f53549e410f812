"""int8 static quantization: `NAME-int8` beside the float32 model, same interface, close outputs."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from export import cli, convert, quantize, repository  # noqa: E402
from export.train import to_pixels  # noqa: E402
from service.runtime import ModelRuntime, RuntimeOptions  # noqa: E402

MODEL = "lenet5"  # convolutions, pooling and fully connected layers, and quick to run
CALIBRATION_IMAGES = 128
COMPARE_IMAGES = 256
# On the tiny lenet5, every output's mean error is under 1% of the output's standard deviation
# and its largest error about 10% of its range (test images outside the calibrated range are
# clipped). Quantizing with ranges calibrated on blank images, or without reduce_range where
# the int8 sums saturate (AVX2 without VNNI), gives 7-35% and 30-99%.
MEAN_ERROR_PER_STD = 0.03
MAX_ERROR_PER_RANGE = 0.25


def _folder(root: Path, name: str) -> Path:
    return root / name / str(repository.versions(root, name)[-1])


def _config(root: Path, name: str) -> dict:
    return json.loads((_folder(root, name) / repository.CONFIG_FILE).read_text())


def _session(root: Path, name: str) -> ort.InferenceSession:
    path = _folder(root, name) / repository.MODEL_FILE
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def root(tiny_repository: Path, fmnist, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of a few tiny models (the session's repository stays as it was), one quantized."""
    root = tmp_path_factory.mktemp("int8")
    for name in ("logreg", "mlp", MODEL, "kirsch"):
        shutil.copytree(tiny_repository / name, root / name)
    quantize.quantize_int8(root, MODEL, fmnist, calibration_images=CALIBRATION_IMAGES, seed=3)
    return root


@pytest.fixture(scope="module")
def test_pixels(fmnist) -> np.ndarray:
    return to_pixels(torch.tensor(fmnist.test_images[:COMPARE_IMAGES])).numpy()


def test_int8_version_is_written_beside_an_untouched_float32(
    root: Path, tiny_repository: Path
) -> None:
    int8_name = f"{MODEL}{quantize.SUFFIX}"
    assert repository.versions(root, int8_name) == [1]
    assert repository.versions(root, MODEL) == repository.versions(tiny_repository, MODEL)
    for file in (repository.MODEL_FILE, repository.CONFIG_FILE):
        original = (_folder(tiny_repository, MODEL) / file).read_bytes()
        assert (_folder(root, MODEL) / file).read_bytes() == original, file

    base, config = _config(root, MODEL), _config(root, int8_name)
    assert config["name"] == int8_name and config["version"] == 1 and config["model"] == MODEL
    for key in ("kind", "labels", "input", "outputs", "features", "default_outputs", "batching"):
        assert config[key] == base[key], key
    quantization = config["quantization"]
    assert quantization["base"] == {
        "name": MODEL,
        "version": base["version"],
        "sha256": base["file"]["sha256"],
        "accuracy": quantization["base"]["accuracy"],  # measured again, on every test image
    }
    assert quantization["test_images"] == 10_000
    assert quantization["calibration"] == {
        "images": CALIBRATION_IMAGES,
        "source": "training set",
        "seed": 3,
        "method": "minmax",
    }
    assert (quantization["scheme"], quantization["format"]) == ("int8", "QDQ")
    assert quantization["weights"]["dtype"] == "int8"
    assert quantization["activations"]["dtype"] == "uint8"
    accuracy = config["accuracy"]
    assert accuracy["pytorch"] is None and 0.0 < accuracy["onnxruntime"] <= 1.0
    assert quantization["accuracy_drop"] == pytest.approx(
        quantization["base"]["accuracy"] - accuracy["onnxruntime"], abs=1e-9
    )
    assert 0.9 <= quantization["argmax_agreement"] <= 1.0
    # The ONNX file carries the same metadata as model.json (less what writing it added).
    proto = onnx.load(str(_folder(root, int8_name) / repository.MODEL_FILE))
    embedded = json.loads({p.key: p.value for p in proto.metadata_props}[convert.METADATA_KEY])
    assert embedded == {k: v for k, v in config.items() if k not in ("name", "version", "file")}
    data = (_folder(root, int8_name) / repository.MODEL_FILE).read_bytes()
    assert config["file"]["sha256"] == hashlib.sha256(data).hexdigest()


def test_int8_graph_has_qdq_nodes_and_the_float32_interface(root: Path) -> None:
    proto = onnx.load(str(_folder(root, f"{MODEL}-int8") / repository.MODEL_FILE))
    ops = {node.op_type for node in proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert any(t.data_type == onnx.TensorProto.INT8 for t in proto.graph.initializer)
    float32, int8 = _session(root, MODEL), _session(root, f"{MODEL}-int8")
    for part in ("get_inputs", "get_outputs"):
        want = [(v.name, v.type) for v in getattr(float32, part)()]
        assert [(v.name, v.type) for v in getattr(int8, part)()] == want, part
        assert all(dtype == "tensor(float)" for _, dtype in want)


def test_int8_outputs_are_close_to_float32(root: Path, test_pixels: np.ndarray) -> None:
    float32, int8 = _session(root, MODEL), _session(root, f"{MODEL}-int8")
    names = [o.name for o in float32.get_outputs()]
    want = dict(zip(names, float32.run(names, {"image": test_pixels}), strict=True))
    got = dict(zip(names, int8.run(names, {"image": test_pixels}), strict=True))
    for name in names:
        error = np.abs(got[name] - want[name])
        std, spread = float(want[name].std()), float(np.ptp(want[name]))
        assert error.mean() <= MEAN_ERROR_PER_STD * std, (
            f"{name}: {error.mean():.3g}, std {std:.3g}"
        )
        assert error.max() <= MAX_ERROR_PER_RANGE * spread, (
            f"{name}: {error.max():.3g} of {spread:.3g}"
        )
    agreement = np.mean(got["logits"].argmax(1) == want["logits"].argmax(1))
    assert agreement >= 0.9
    # Softmax stays float32, so the probabilities still sum to one.
    np.testing.assert_allclose(got["probabilities"].sum(1), 1.0, atol=1e-5)


def test_the_service_runtime_serves_the_int8_model(root: Path, test_pixels: np.ndarray) -> None:
    config = _config(root, f"{MODEL}-int8")
    options = RuntimeOptions(device="cpu", intra_op_threads=1)
    runtime = ModelRuntime(_folder(root, f"{MODEL}-int8") / repository.MODEL_FILE, options)
    runtime.warm_up(config["batching"]["max_batch_size"])
    assert runtime.output_names == [o["name"] for o in config["outputs"] + config["features"]]
    float32 = ModelRuntime(_folder(root, MODEL) / repository.MODEL_FILE, options)
    image = test_pixels[:1]
    got = runtime.run(image, ["probabilities"])["probabilities"]
    want = float32.run(image, ["probabilities"])["probabilities"]
    assert got.shape == (1, len(config["labels"])) and got.dtype == np.float32
    assert got.argmax() == want.argmax()  # the same class as float32
    assert float(np.abs(got - want).max()) <= MAX_ERROR_PER_RANGE * float(np.ptp(want))


def test_feature_extractors_are_refused(root: Path, fmnist) -> None:
    with pytest.raises(ValueError, match="kirsch is a feature extractor, not a classifier"):
        quantize.quantize_int8(root, "kirsch", fmnist, calibration_images=16)
    assert repository.versions(root, "kirsch-int8") == []


def test_quantize_command_adds_a_version(root: Path, capsys) -> None:
    before = repository.versions(root, f"{MODEL}-int8")
    argv = ["quantize", MODEL, "--model-repository", str(root), "--calibration-images", "32"]
    assert cli.main(argv) == 0
    assert repository.versions(root, f"{MODEL}-int8") == [*before, before[-1] + 1]
    out = capsys.readouterr().out
    assert "int8 accuracy" in out and "float32" in out and "drop" in out
    assert _config(root, f"{MODEL}-int8")["quantization"]["calibration"]["images"] == 32

    assert cli.main(["quantize", "kirsch", "--model-repository", str(root)]) == 1
    assert "not a classifier" in capsys.readouterr().err


def test_all_skip_existing_quantizes_without_retraining(root: Path, monkeypatch, capsys) -> None:
    def no_training(*_args, **_kwargs):
        raise AssertionError("every float32 model exists: nothing should be trained")

    monkeypatch.setattr(cli, "export_model", no_training)
    int8_before = repository.versions(root, f"{MODEL}-int8")
    argv = ["all", "--quick", "--skip-existing", "--quantize", "int8"]
    argv += ["--model-repository", str(root), "--calibration-images", "32"]
    threads = torch.get_num_threads()
    try:
        assert cli.main([*argv, "--threads", str(threads)]) == 0
    finally:
        torch.set_num_threads(threads)  # the command sets it for the whole process
    out = capsys.readouterr().out
    assert repository.versions(root, "logreg-int8") == [1]
    assert repository.versions(root, "mlp-int8") == [1]
    assert repository.versions(root, f"{MODEL}-int8") == int8_before  # already there: skipped
    assert repository.versions(root, "kirsch-int8") == []
    assert "skip kirsch-int8: kirsch is a feature extractor" in out


def _fixed_speeds(int8_faster: bool):
    """A stand-in for speed.measure: int8 twice as fast as float32, or twice as slow."""
    from export.speed import Speed

    def measure(path: Path, *_args, **_kwargs) -> Speed:
        fast = (quantize.SUFFIX in str(path)) == int8_faster
        return Speed(
            latency_ms=1.0 if fast else 2.0,
            latency_p90_ms=3.0,
            throughput=2000.0 if fast else 1000.0,
            threads=1,
        )

    return measure


@pytest.mark.parametrize("int8_faster", [True, False])
def test_auto_serves_only_a_faster_variant(
    tiny_repository: Path, fmnist, tmp_path: Path, monkeypatch, int8_faster: bool
) -> None:
    shutil.copytree(tiny_repository / "mlp", tmp_path / "mlp")
    monkeypatch.setattr(quantize.speed, "measure", _fixed_speeds(int8_faster))
    folder, reasons = quantize.quantize_auto(tmp_path, "mlp", fmnist, CALIBRATION_IMAGES)
    config = json.loads((folder / repository.CONFIG_FILE).read_text())
    served = repository.versions(tmp_path, "mlp-int8")
    rejected = repository.versions(tmp_path / repository.REJECTED, "mlp-int8")
    if int8_faster:
        assert reasons == [] and served == [1] and rejected == []
    else:
        assert reasons == ["not 5% faster at batch 256", "not 5% faster at batch 1"]
        assert served == [] and rejected == [1]
    assert config["selection"]["served"] is int8_faster
    assert config["selection"]["int8"]["throughput"] == (2000.0 if int8_faster else 1000.0)
    assert not (tmp_path / repository.CANDIDATES).exists()  # nothing half-done is left behind
    # The service never sees a rejected variant: hidden folders are not models.
    from concurrent.futures import ThreadPoolExecutor

    from service.repository import BatchOverrides, ModelRepository

    with ThreadPoolExecutor(1) as executor:
        found = ModelRepository(tmp_path, RuntimeOptions(), BatchOverrides(), executor)
        found.scan()
    assert ("mlp-int8" in found.models) is int8_faster


def test_report_shows_why_a_variant_is_not_served(
    tiny_repository: Path, fmnist, tmp_path: Path, monkeypatch
) -> None:
    from export import report

    shutil.copytree(tiny_repository / "mlp", tmp_path / "mlp")
    with monkeypatch.context() as patch:
        patch.setattr(quantize.speed, "measure", _fixed_speeds(False))
        quantize.quantize_auto(tmp_path, "mlp", fmnist, CALIBRATION_IMAGES)
    text = report.write_report(tmp_path, tmp_path / "docs", seconds=0.02).read_text()
    assert "Not in this repository yet: `logreg`, `kirsch`, `cnn`" in text  # only mlp is here
    row = next(line for line in text.splitlines() if line.startswith("| mlp-int8 |"))
    assert row.endswith(
        "| no: not 5% faster at batch 256, not 5% faster at batch 1, "
        "measured then: x0.50 at batch 1, x0.50 at batch 256 |"
    )


def test_verdict_names_every_reason() -> None:
    from export.speed import Speed

    fast = Speed(latency_ms=1.0, latency_p90_ms=1.0, throughput=10.0, threads=1)
    slow = Speed(latency_ms=2.0, latency_p90_ms=2.0, throughput=5.0, threads=1)
    assert quantize.verdict(0.005, fast, slow) == []
    assert quantize.verdict(0.02, fast, slow) == ["loses more than 1 point"]
    slower = ["not 5% faster at batch 256", "not 5% faster at batch 1"]
    assert quantize.verdict(0.0, slow, fast) == slower
    # Faster by less than the margin is a tie, not a win: such verdicts flipped between runs.
    near = Speed(latency_ms=0.97, latency_p90_ms=1.0, throughput=10.3, threads=1)
    assert quantize.verdict(0.0, near, fast) == slower
    clear = Speed(latency_ms=0.95, latency_p90_ms=1.0, throughput=10.5, threads=1)
    assert quantize.verdict(0.0, clear, fast) == []
