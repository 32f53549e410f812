"""Every registered family member against the contract the trainer, exporter and service rely on.

The tests parametrize over `list_models()`, so a new member is covered as soon as it registers:
it builds from its recorded options, classifies a batch, exposes its stages in order with the
shapes it reports, keeps every stage post-activation (the exporter turns each into a graph
output), trains (gradients reach every parameter), rejects unknown options by name, and its
size options change its size. No test measures time.
"""

from __future__ import annotations

import inspect
import re

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from export.complexity import count_params, mflops_per_image
from export.models.base import INPUT_SHAPE, NUM_CLASSES, FamilyModel
from export.registry import create_model, get_entry, list_models

MODELS = list_models()
BATCH = 3
# Sizing for a 2-core CPU: the defaults stay well under this (the largest is about 110).
MAX_MFLOPS = 200

# Modules that do not change the sign of their input: reshapes, dropout, max pooling.
SIGN_KEEPING = (
    nn.Flatten,
    nn.Unflatten,
    nn.Identity,
    nn.Dropout,
    nn.MaxPool2d,
    nn.AdaptiveMaxPool2d,
)
# Modules that only reshape or regularise: a stage's last real op is the one before them.
PASS_THROUGH = (nn.Flatten, nn.Unflatten, nn.Identity, nn.Dropout)
# A stage whose last op is one of these would export a raw, pre-activation output.
PRE_ACTIVATION = (nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d)
# Options that scale a network: doubling one must grow it.
SIZE_OPTIONS = ("width", "hidden")
# Options that choose depth: the shallower setting must have fewer parameters.
SHALLOWER = [
    ("vgg", {"depth": 11}),
    ("resnet", {"blocks": (1, 1, 1, 1)}),
    ("inception_resnet", {"blocks_a": 1, "blocks_b": 1}),
]
STAGE_NAME = re.compile(r"[a-z][a-z0-9_]*")


@pytest.fixture
def images() -> Tensor:
    """A batch of random pixels in [0, 1], the range the service feeds the networks."""
    return torch.rand(BATCH, *INPUT_SHAPE, generator=torch.Generator().manual_seed(0))


def build(name: str, **options: object) -> FamilyModel:
    torch.manual_seed(0)
    return create_model(name, **options)


def defaults(name: str) -> dict[str, object]:
    signature = inspect.signature(get_entry(name).factory)
    return {option: p.default for option, p in signature.parameters.items()}


def leaves(module: nn.Module) -> list[nn.Module]:
    """Submodules without children, in registration order.

    Family modules register their final activation last (see resnet.BasicBlock), so the last
    leaf of a stage is the op that produces its output.
    """
    return [m for m in module.modules() if not any(m.children())]


def last_op(stage: nn.Module) -> nn.Module | None:
    ops = [m for m in leaves(stage) if not isinstance(m, PASS_THROUGH)]
    return ops[-1] if ops else None


def non_negative_by_construction(stage: nn.Module, previous: bool) -> bool:
    """Whether a stage's output is >= 0 because it ends in ReLU, maybe followed by pooling.

    A stage of sign-keeping ops only (a pooling stage) inherits the previous stage's answer.
    Anything else (a raw filter bank, Tanh, ...) is not known to be non-negative.
    """
    for module in reversed(leaves(stage)):
        if not isinstance(module, SIGN_KEEPING):
            return isinstance(module, nn.ReLU | nn.ReLU6)
    return previous


@pytest.mark.parametrize("name", MODELS)
def test_create_model_records_its_options(name: str) -> None:
    model = build(name)
    assert model.name == name
    assert model.init_kwargs == defaults(name)
    # A checkpoint stores init_kwargs; they must rebuild the same network.
    rebuilt = build(name, **model.init_kwargs)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == shapes


@pytest.mark.parametrize("name", MODELS)
def test_forward_returns_logits(name: str, images: Tensor) -> None:
    model = build(name).eval()
    with torch.no_grad():
        out = model(images)
        logits, features = model.forward_features(images)
    if model.kind == "classifier":
        assert out.shape == (BATCH, NUM_CLASSES)
        assert logits is not None
        torch.testing.assert_close(logits, out)
    else:
        assert model.kind == "feature_extractor"
        assert logits is None
        torch.testing.assert_close(out, features[model.stage_names[-1]])
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", MODELS)
def test_features_follow_stage_order_and_reported_shapes(name: str, images: Tensor) -> None:
    model = build(name).eval()
    with torch.no_grad():
        _, features = model.forward_features(images)
    assert list(features) == model.stage_names
    assert len(set(model.stage_names)) == len(model.stage_names)
    for stage in model.stage_names:
        assert STAGE_NAME.fullmatch(stage), f"stage name {stage!r} is not a short identifier"
    actual = {stage: tuple(t.shape[1:]) for stage, t in features.items()}
    assert model.feature_shapes() == actual
    for stage, t in features.items():
        assert t.shape[0] == BATCH
        assert t.dim() in (2, 4), f"{stage}: {tuple(t.shape)} is neither (C, H, W) nor a vector"
        assert torch.isfinite(t).all()


@pytest.mark.parametrize("name", MODELS)
def test_classifier_stages_end_after_their_activation(name: str) -> None:
    model = build(name)
    if model.kind != "classifier":
        pytest.skip("feature extractors may expose raw filter responses by design")
    for stage, module in model.stages.items():
        op = last_op(module)
        assert not isinstance(op, PRE_ACTIVATION), f"{stage} ends in {type(op).__name__}"


@pytest.mark.parametrize("name", MODELS)
def test_relu_stages_are_non_negative(name: str, images: Tensor) -> None:
    model = build(name).eval()
    with torch.no_grad():
        _, features = model.forward_features(images)
    checked = []
    previous = False
    for stage, module in model.stages.items():
        previous = non_negative_by_construction(module, previous)
        if previous:
            assert features[stage].min() >= 0, f"{stage} has negative activations"
            checked.append(stage)
    if model.kind == "classifier" and model.stage_names:
        assert checked, "no stage of this classifier ends in a ReLU"


@pytest.mark.parametrize("name", MODELS)
def test_backward_reaches_every_parameter(name: str, images: Tensor) -> None:
    if not get_entry(name).recipe.trainable:
        pytest.skip("fixed filters are not trained")
    model = build(name).train()
    out = model(images)
    if model.kind == "classifier":
        loss = F.cross_entropy(out, torch.arange(BATCH) % NUM_CLASSES)
    else:
        loss = out.square().mean()
    loss.backward()
    for param_name, param in model.named_parameters():
        assert param.grad is not None, f"{param_name} got no gradient"
        assert torch.isfinite(param.grad).all(), f"{param_name} has a non-finite gradient"
        assert param.grad.abs().sum() > 0, f"{param_name} has an all-zero gradient"


@pytest.mark.parametrize("name", MODELS)
def test_unknown_option_is_rejected_naming_the_valid_ones(name: str) -> None:
    with pytest.raises(TypeError) as info:
        create_model(name, no_such_option=1)
    message = str(info.value)
    assert "no_such_option" in message
    for option in defaults(name):
        assert option in message
    if not defaults(name):
        assert "none" in message


@pytest.mark.parametrize("name", MODELS)
def test_size_options_change_the_parameter_count(name: str) -> None:
    options = [option for option in SIZE_OPTIONS if option in defaults(name)]
    if not options:
        pytest.skip("no width-like size option")
    base = count_params(build(name))
    for option in options:
        default = defaults(name)[option]
        assert isinstance(default, int | float) and not isinstance(default, bool)
        bigger = build(name, **{option: default * 2})
        assert bigger.init_kwargs[option] == default * 2
        assert count_params(bigger) > base, f"doubling {option} did not grow {name}"


@pytest.mark.parametrize(("name", "options"), SHALLOWER, ids=[name for name, _ in SHALLOWER])
def test_depth_options_change_the_parameter_count(name: str, options: dict[str, object]) -> None:
    shallow = build(name, **options)
    assert count_params(shallow) < count_params(build(name))
    assert len(shallow.stage_names) == len(build(name).stage_names)


@pytest.mark.parametrize("name", MODELS)
def test_default_size_fits_a_small_cpu(name: str) -> None:
    model = build(name)
    params = count_params(model)
    if not get_entry(name).recipe.trainable:
        assert params == 0, "an untrained model should have no learned parameters"
    else:
        assert 1e3 <= params <= 5e6
    assert mflops_per_image(model) <= MAX_MFLOPS


def test_resnet_stem_stride_halves_every_layer_and_refuses_other_strides() -> None:
    shapes = create_model("resnet", stem_stride=2).feature_shapes()
    assert shapes["layer1"] == (16, 14, 14) and shapes["layer4"] == (128, 2, 2)
    with pytest.raises(ValueError, match="stem_stride must be 1 or 2; got 3"):
        create_model("resnet", stem_stride=3)
