"""On CUDA a batch is padded to one of a few sizes, so cuDNN never searches while serving."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from service.runtime import ModelRuntime, RuntimeOptions, padded_sizes


def test_padded_sizes_are_powers_of_two_then_the_limit() -> None:
    assert padded_sizes(64) == (1, 2, 4, 8, 16, 32, 64)
    assert padded_sizes(48) == (1, 2, 4, 8, 16, 32, 48)
    assert padded_sizes(1) == (1,)
    assert padded_sizes(0) == (1,)


def test_a_padded_batch_gives_the_unpadded_answers(tiny_repository: Path, fmnist) -> None:
    # The CPU session stands in for a CUDA one: the padding is the same code either way.
    path = tiny_repository / "resnet" / "1" / "model.onnx"
    runtime = ModelRuntime(path, RuntimeOptions(device="cpu", small_batch_session=False))
    outputs = runtime.output_names
    images = (fmnist.test_images[:5, None] / 255.0).astype(np.float32)
    plain = runtime.run(images, outputs)
    runtime.pad_batches_to(padded_sizes(8))
    padded = runtime.run(images, outputs)  # runs as 8 images, answers for 5
    for name in outputs:
        assert padded[name].shape == plain[name].shape, name
        np.testing.assert_allclose(padded[name], plain[name], rtol=1e-5, atol=1e-6)
    # over the largest size (one request over the batch limit): chunks of known sizes only
    bigger = (fmnist.test_images[:19, None] / 255.0).astype(np.float32)
    chunked = runtime.run(bigger, outputs)
    runtime.pad_batches_to(())
    whole = runtime.run(bigger, outputs)
    for name in outputs:
        assert chunked[name].shape == whole[name].shape, name
        np.testing.assert_allclose(chunked[name], whole[name], rtol=1e-5, atol=1e-6)


class ShapeSpy:
    """A session stand-in that records the batch sizes it ran."""

    def __init__(self, session) -> None:
        self.session, self.sizes = session, set()

    def run(self, outputs, feeds):
        self.sizes.add(len(next(iter(feeds.values()))))
        return self.session.run(outputs, feeds)


def test_every_padded_size_has_a_session_that_sees_no_other(tiny_repository: Path) -> None:
    # a CUDA session whose batch size changes sets its convolutions up again at every change
    path = tiny_repository / "lenet5" / "1" / "model.onnx"
    runtime = ModelRuntime(path, RuntimeOptions(device="cpu", small_batch_session=False))
    runtime.pad_batches_to(padded_sizes(8))
    # none may retry on the CPU after a CUDA error (onnxruntime's flag: no public getter)
    assert not any(session._enable_fallback for session in runtime._sized.values())
    spies = {size: ShapeSpy(session) for size, session in runtime._sized.items()}
    runtime._sized = dict(spies)
    images = np.zeros((19, 1, 28, 28), np.float32)
    for count in [1, 3, 2, 5, 8, 1, 19, 4]:
        assert len(runtime.run(images[:count], ["probabilities"])["probabilities"]) == count
    assert {size: spy.sizes for size, spy in spies.items()} == {1: {1}, 2: {2}, 4: {4}, 8: {8}}
    assert len({id(spy.session) for spy in spies.values()}) == 4


def test_a_cpu_session_is_never_padded(tiny_repository: Path) -> None:
    path = tiny_repository / "lenet5" / "1" / "model.onnx"
    runtime = ModelRuntime(path, RuntimeOptions(device="cpu"))
    runtime.warm_up(64)
    assert runtime.padded_sizes == ()
