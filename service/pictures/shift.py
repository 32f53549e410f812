"""Shift equivariance, measured and drawn: a layer's maps of an image and of the image shifted.

A convolution is shift *equivariant*: shift the input and its maps shift by the same amount
(for a whole number of map pixels). So the maps of the shifted image, shifted back, should
equal the original's; what is left, relative to the original, is the measure printed:
||back - original|| / ||original||. It is 0 (up to float rounding) for a stride-1 conv with
wrap padding and a rolled image, small where borders or zero padding intrude, and larger after
pooling or striding, where a shift that is not a whole number of map pixels can only be
tolerated, not followed exactly. A vector stage has no positions to shift back: its difference
measures invariance.

Two ways to shift (`--shift`): `roll` (np.roll: what leaves one side comes back on the other;
exact equivariance is then possible) and `pad` (what leaves is lost and the dark ground, 0,
fills in; the lost band is left out of the measure).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.pictures import render

MODES = {
    "roll": "what leaves one side comes back on the other, np.roll",
    "pad": "what leaves is lost, the dark ground fills in",
}


def _move(array: np.ndarray, dx: int, dy: int, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """Shift the last two axes by (dy, dx); also the mask of positions that hold shifted data."""
    if mode == "roll":
        return np.roll(array, (dy, dx), axis=(-2, -1)), np.ones(array.shape[-2:], dtype=bool)
    if mode not in MODES:
        raise ValueError(f"shift mode must be one of {', '.join(MODES)}; got {mode!r}")
    height, width = array.shape[-2:]
    moved = np.zeros_like(array)
    valid = np.zeros((height, width), dtype=bool)
    rows = slice(max(dy, 0), height + min(dy, 0)), slice(max(-dy, 0), height - max(dy, 0))
    cols = slice(max(dx, 0), width + min(dx, 0)), slice(max(-dx, 0), width - max(dx, 0))
    if abs(dy) < height and abs(dx) < width:
        moved[..., rows[0], cols[0]] = array[..., rows[1], cols[1]]
        valid[rows[0], cols[0]] = True
    return moved, valid


def stride_of(size: int, input_size: int) -> int:
    """A layer's total stride, from its map size: the power of two nearest input/size.

    The family downsamples by twos, with or without padding (LeNet-5's c3 is 10 wide for an
    input of 28 at stride 2, its s4 5 wide at stride 4), so the nearest power of two is exact
    where the plain ratio is not.
    """
    return 2 ** max(0, round(math.log2(input_size / size))) if size > 0 else 1


def shift(image: np.ndarray, dx: int, dy: int, mode: str = "roll") -> np.ndarray:
    """The image moved dx pixels right and dy down."""
    return _move(image, dx, dy, mode)[0]


@dataclass(frozen=True)
class Comparison:
    original: np.ndarray  # the layer's output for the image
    shifted: np.ndarray  # ... for the shifted image
    difference: np.ndarray  # the shifted one shifted back, minus the original (0 where unknown)
    relative: float  # ||difference|| / ||original|| over the compared positions
    note: str  # how the maps were shifted back


def compare(
    original: np.ndarray,
    shifted: np.ndarray,
    dx: int,
    dy: int,
    mode: str,
    input_shape: tuple[int, ...] = (28, 28),
) -> Comparison:
    """Shift the second maps back by the input's shift in map pixels (rounded when the layer
    has pooled or strided it to a fraction) and compare them with the first."""
    if original.ndim == 3 and original.shape[1] * original.shape[2] > 1:
        height, width = original.shape[1:]
        exact_x = dx / stride_of(width, input_shape[-1])
        exact_y = dy / stride_of(height, input_shape[-2])
        map_dx, map_dy = round(exact_x), round(exact_y)
        back, valid = _move(shifted, -map_dx, -map_dy, mode)
        if mode == "pad":  # what the shifted image lost cannot be compared either
            valid &= _move(np.ones((height, width)), -map_dx, -map_dy, "pad")[1]
        note = f"shifted back by dx={map_dx}, dy={map_dy} map pixels"
        if (map_dx, map_dy) != (exact_x, exact_y):
            note += f"; the input's shift is dx={exact_x:g}, dy={exact_y:g} here, not whole"
    else:
        back, valid = shifted, np.ones(original.shape[-2:] if original.ndim > 1 else 1, bool)
        note = "a vector has no positions to shift back: the difference measures invariance"
    difference = np.where(valid, back - original, 0.0).astype(np.float32)
    reference = float(np.linalg.norm(np.where(valid, original, 0.0)))
    change = float(np.linalg.norm(difference))
    if reference > 0:
        relative = change / reference
    else:
        relative = 0.0 if change == 0 else math.inf
    return Comparison(original, shifted, difference, relative, note)


def picture(
    title: str,
    subtitle: list[str],
    info: dict[str, Any],
    image: np.ndarray,
    moved: np.ndarray,
    result: Comparison,
    max_channels: int = 16,
    scale_spec: str | float = "max",
) -> render.Picture:
    """Three rows: the image and its maps, the shifted image and its maps, the difference."""
    scale = render.choose_scale(scale_spec, result.original, result.shifted)
    spatial = result.original.ndim == 3 and result.original.shape[1] * result.original.shape[2] > 1
    caption = "shifted back - original" if spatial else "shifted - original"
    captions = ("original", "shifted", f"{caption}: relative difference {result.relative:.3g}")
    if spatial:
        count = min(max_channels, len(result.original))
        arrays = [result.original[:count], result.shifted[:count], result.difference[:count]]
        height, width = arrays[0].shape[1:]
        factor = render.zoom_for(height, width, 3 * count)
        size = factor * max(height, width)
        blank = [""] * count
        cells = [
            render.map_cells(a, scale, None if i == 0 else blank, factor)
            for i, a in enumerate(arrays)
        ]
        if count < len(result.original):
            subtitle = [*subtitle, f"channels 0 to {count - 1} of {len(result.original)} drawn"]
    else:
        size = 112
        cells = [
            [render.bar_chart(a.reshape(-1), scale)]
            for a in (result.original, result.shifted, result.difference)
        ]
    firsts = [render.input_cell(image, "", size), render.input_cell(moved, "", size), None]
    rows = [
        render.Row([first, *row], caption)
        for first, row, caption in zip(firsts, cells, captions, strict=True)
    ]
    subtitle = [
        *subtitle,
        result.note,
        render.describe_scale(scale_spec, scale) + " of both maps, the same for all rows",
    ]
    return render.sheet(title, rows, subtitle=subtitle, scale=scale, info=info)
