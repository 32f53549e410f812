"""Every family member exports to ONNX with its feature outputs and behaves like PyTorch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from export import cli, convert, repository  # noqa: E402
from export.pipeline import ExportRequest, export_model  # noqa: E402
from export.registry import create_model, list_models  # noqa: E402
from export.train import to_pixels  # noqa: E402


def _latest(root: Path, name: str) -> Path:
    return root / name / str(repository.versions(root, name)[-1])


@pytest.mark.parametrize("name", list_models())
def test_repository_entry_is_complete(tiny_repository: Path, name: str) -> None:
    folder = _latest(tiny_repository, name)
    config = json.loads((folder / "model.json").read_text())
    model = create_model(name)
    assert config["name"] == name and config["model"] == name
    assert [f["stage"] for f in config["features"]] == model.stage_names
    assert config["kind"] == model.kind
    assert config["params"] == sum(p.numel() for p in model.parameters())
    assert config["mflops"] > 0
    if model.kind == "classifier":
        assert len(config["labels"]) == 10
        assert config["default_outputs"] == ["logits", "probabilities"]
        assert config["accuracy"]["onnxruntime"] == pytest.approx(
            config["accuracy"]["pytorch"], abs=1e-3
        )
    else:
        assert config["labels"] is None and config["accuracy"]["onnxruntime"] is None
    # The ONNX file carries the same metadata as model.json (less what writing it added).
    proto = onnx.load(str(folder / "model.onnx"))
    embedded = json.loads({p.key: p.value for p in proto.metadata_props}[convert.METADATA_KEY])
    assert embedded == {k: v for k, v in config.items() if k not in ("name", "version", "file")}


@pytest.mark.parametrize("name", list_models())
def test_onnx_outputs_have_declared_shapes(tiny_repository: Path, fmnist, name: str) -> None:
    folder = _latest(tiny_repository, name)
    config = json.loads((folder / "model.json").read_text())
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    declared = {o["name"]: o["shape"] for o in config["outputs"] + config["features"]}
    assert [o.name for o in session.get_outputs()] == list(declared)
    batch = to_pixels(torch.tensor(fmnist.test_images[:5])).numpy()
    results = dict(zip(declared, session.run(list(declared), {"image": batch}), strict=True))
    for output, shape in declared.items():
        assert results[output].shape == (5, *shape), output
        assert np.isfinite(results[output]).all(), output
    if "probabilities" in results:
        np.testing.assert_allclose(results["probabilities"].sum(1), 1.0, atol=1e-5)


def test_validation_rejects_a_graph_that_differs_from_pytorch(fmnist) -> None:
    model = create_model("lenet5").eval()
    proto = convert.to_onnx(model)
    convert.validate(model, proto, fmnist)  # the faithful graph passes
    weights = max(proto.graph.initializer, key=lambda t: len(t.raw_data) or len(t.float_data))
    array = onnx.numpy_helper.to_array(weights).copy()
    array += 0.05
    weights.CopyFrom(onnx.numpy_helper.from_array(array, weights.name))
    with pytest.raises(convert.ValidationError, match="does not match PyTorch"):
        convert.validate(model, proto, fmnist)


def test_failed_validation_writes_nothing(tmp_path: Path, fmnist, monkeypatch) -> None:
    def reject(*_args, **_kwargs):
        raise convert.ValidationError("logreg: rejected for the test")

    monkeypatch.setattr(convert, "validate", reject)
    with pytest.raises(convert.ValidationError):
        export_model(ExportRequest("logreg", max_steps=1, progress=False), fmnist, tmp_path)
    assert repository.versions(tmp_path, "logreg") == []
    assert not list(tmp_path.rglob("model.onnx")) and not list(tmp_path.rglob(".incoming*"))


def test_new_export_adds_a_version_and_list_shows_it(tmp_path: Path, fmnist, capsys) -> None:
    for _ in range(2):
        export_model(ExportRequest("kirsch", progress=False), fmnist, tmp_path)
    export_model(
        ExportRequest("kirsch", name="kirsch-wrap-s2", options={"padding": "wrap", "stride": 2}),
        fmnist,
        tmp_path,
    )
    assert repository.versions(tmp_path, "kirsch") == [1, 2]
    wrap = json.loads((tmp_path / "kirsch-wrap-s2" / "1" / "model.json").read_text())
    assert wrap["options"] == {"padding": "wrap", "stride": 2}
    assert wrap["features"][0]["shape"] == [8, 14, 14]
    assert cli.main(["list", "--model-repository", str(tmp_path)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["name", "versions", "kind"]
    assert any(line.split()[:3] == ["kirsch", "1,2", "feature_extractor"] for line in table)


@pytest.mark.parametrize("bad", ["../escape", "/abs", "Upper", "", "a" * 65, "x/../y", "ü"])
def test_repository_names_cannot_leave_the_repository(bad: str) -> None:
    with pytest.raises(ValueError, match="must be 1-64 characters"):
        repository.check_name(bad)


def test_unknown_option_is_a_clear_error() -> None:
    with pytest.raises(TypeError, match="takes options: padding, stride"):
        create_model("kirsch", colour="red")
