"""A reply's size, checked before inference: over the send limit, the request is refused.

Feature maps make replies large (a batch of 1,024 images with cnn's conv1 map is 100 MiB).
Without this check the server would run the batch and then fail to send the answer, wasting
the inference and giving the client gRPC's generic error; with it the client learns at once,
by field, what to ask for instead.
"""

from __future__ import annotations

from collections.abc import Sequence

from service.errors import InvalidArgument
from service.repository import ModelVersion

MiB = 1024 * 1024
PER_IMAGE_OVERHEAD = 512  # protobuf framing, labels and scores: generous, so the limit holds


def per_image_bytes(entry: ModelVersion, names: Sequence[str], feature_itemsize: int) -> int:
    """Bytes one image's reply carries for the named outputs (features at `feature_itemsize`)."""
    sizes = entry.output_sizes
    total = PER_IMAGE_OVERHEAD
    for name in dict.fromkeys(names):
        values, feature = sizes.get(name, (1, False))
        total += values * (feature_itemsize if feature else 4)
    return total


def check_reply_size(
    entry: ModelVersion,
    names: Sequence[str],
    images: int,
    feature_itemsize: int,
    limit_bytes: int,
    field: str,
) -> None:
    """Refuse a request whose reply would exceed the server's send limit, naming the field."""
    one = per_image_bytes(entry, names, feature_itemsize)
    total = one * images
    if total > limit_bytes:
        raise InvalidArgument(
            f"{field}: the reply would be about {total / MiB:.1f} MiB ({images} images x "
            f"{one / MiB:.2f} MiB), over the server's send limit of {limit_bytes / MiB:.0f} MiB "
            "(--max-send-message-mb); ask for fewer images or features, or float16 maps"
        )
