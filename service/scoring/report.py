"""Accuracy, per-class accuracy and the confusion matrix of a scored input with known labels.

Printed as plain tables and drawn as a PNG with Pillow and numpy alone (no plotting library in
the serving install): a grid of counts, rows the true class and columns the predicted one, each
cell coloured by its share of the true class, with a colour scale beside it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# A white-to-dark-blue ramp (the "Blues" of ColorBrewer), sampled at five stops.
RAMP = np.array(
    [[247, 251, 255], [198, 219, 239], [107, 174, 214], [33, 113, 181], [8, 48, 107]], float
)
CELL = 52
MARGIN = 16
DARK, GREY, WHITE = (33, 33, 33), (150, 150, 150), (255, 255, 255)


@dataclass(frozen=True)
class Evaluation:
    labels: list[str]
    confusion: np.ndarray  # counts, rows the true class and columns the predicted class

    @property
    def total(self) -> int:
        return int(self.confusion.sum())

    @property
    def correct(self) -> int:
        return int(np.trace(self.confusion))

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else float("nan")

    def shares(self) -> np.ndarray:
        """Each row divided by its total: what share of a true class went to each prediction."""
        totals = self.confusion.sum(axis=1, keepdims=True)
        return np.divide(
            self.confusion, totals, out=np.zeros(self.confusion.shape), where=totals > 0
        )


def evaluate(pairs: Iterable[tuple[str | None, str]], labels: Sequence[str]) -> Evaluation | None:
    """From (true label, predicted label) names; items with no true label are left out."""
    index = {label: i for i, label in enumerate(labels)}
    confusion = np.zeros((len(labels), len(labels)), dtype=np.int64)
    for true, predicted in pairs:
        if true in index and predicted in index:  # no true label: not counted
            confusion[index[true], index[predicted]] += 1
    return Evaluation(list(labels), confusion) if confusion.sum() else None


def format_report(evaluation: Evaluation, reference: float | None = None) -> str:
    """Accuracy, a per-class table and the confusion matrix, as plain text."""
    e = evaluation
    lines = [f"accuracy {e.accuracy:.4f} ({e.correct} of {e.total} images)"]
    if reference is not None:
        lines[0] += f"; the export measured {reference:.4f}"
    width = max(len(label) for label in e.labels)
    lines += ["", f"{'class':<{width}}  images  correct  accuracy"]
    for i, label in enumerate(e.labels):
        total, correct = int(e.confusion[i].sum()), int(e.confusion[i, i])
        share = f"{correct / total:8.2%}" if total else "       -"
        lines.append(f"{label:<{width}}  {total:6d}  {correct:7d}  {share}")
    cell = max(5, len(str(int(e.confusion.max()))) + 1)
    lines += ["", "confusion matrix: rows are the true class, columns the predicted class"]
    lines.append(" " * (width + 4) + "".join(f"{j:>{cell}d}" for j in range(len(e.labels))))
    for i, label in enumerate(e.labels):
        counts = "".join(f"{int(c):>{cell}d}" for c in e.confusion[i])
        lines.append(f"{i:>2d} {label:<{width}} {counts}")
    return "\n".join(lines)


def colours(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] to RGB along the ramp."""
    position = np.clip(values, 0, 1) * (len(RAMP) - 1)
    low = np.minimum(position.astype(int), len(RAMP) - 2)
    fraction = (position - low)[..., None]
    return (RAMP[low] * (1 - fraction) + RAMP[low + 1] * fraction).round().astype(np.uint8)


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _vertical_text(text: str, font: ImageFont.ImageFont, fill: tuple[int, int, int]) -> Image.Image:
    """`text` turned 90 degrees anticlockwise, on a transparent ground, to paste with itself."""
    left, top, right, bottom = font.getbbox(text)
    strip = Image.new("RGBA", (right - left + 2, bottom - top + 2), (0, 0, 0, 0))
    ImageDraw.Draw(strip).text((1 - left, 1 - top), text, font=font, fill=(*fill, 255))
    return strip.rotate(90, expand=True)


def render_confusion(evaluation: Evaluation, path: Path, title: str) -> None:
    """The matrix as a PNG: counts in each cell, class names on both axes, a colour scale."""
    e, n = evaluation, len(evaluation.labels)
    font, small, bold = _font(13), _font(11), _font(15)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    name_width = int(max(measure.textlength(label, font=font) for label in e.labels)) + 10
    grid = n * CELL
    left = MARGIN + 22 + name_width
    top = MARGIN + 34
    bar_left = left + grid + 28
    width = bar_left + 18 + 72
    height = top + grid + name_width + 34 + MARGIN
    image = Image.new("RGB", (width, height), WHITE)

    shares = e.shares()
    cells = np.repeat(np.repeat(colours(shares), CELL, axis=0), CELL, axis=1)
    image.paste(Image.fromarray(cells), (left, top))
    bar = colours(np.linspace(1, 0, grid))[:, None, :].repeat(18, axis=1)
    image.paste(Image.fromarray(np.ascontiguousarray(bar)), (bar_left, top))

    draw = ImageDraw.Draw(image)
    draw.text((left, MARGIN), title, font=bold, fill=DARK)
    for k in range(n + 1):  # the grid lines
        draw.line([(left + k * CELL, top), (left + k * CELL, top + grid)], fill=WHITE, width=1)
        draw.line([(left, top + k * CELL), (left + grid, top + k * CELL)], fill=WHITE, width=1)
    draw.rectangle([left, top, left + grid, top + grid], outline=GREY)
    for i in range(n):
        for j in range(n):
            count = int(e.confusion[i, j])
            fill = WHITE if shares[i, j] > 0.55 else (DARK if count else GREY)
            centre = (left + j * CELL + CELL // 2, top + i * CELL + CELL // 2)
            draw.text(
                centre, str(count), font=small if count >= 10000 else font, fill=fill, anchor="mm"
            )
        y = top + i * CELL + CELL // 2
        draw.text((left - 8, y), e.labels[i], font=font, fill=DARK, anchor="rm")
        name = _vertical_text(e.labels[i], font, DARK)
        x = left + i * CELL + (CELL - name.width) // 2
        image.paste(name, (x, top + grid + 8), name)

    true_axis = _vertical_text("true class", bold, DARK)
    image.paste(true_axis, (MARGIN, top + (grid - true_axis.height) // 2), true_axis)
    draw.text(
        (left + grid // 2, height - MARGIN), "predicted class", font=bold, fill=DARK, anchor="ms"
    )
    draw.rectangle([bar_left, top, bar_left + 18, top + grid], outline=GREY)
    for share in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = top + round((1 - share) * (grid - 1))
        draw.line([(bar_left + 18, y), (bar_left + 22, y)], fill=DARK)
        draw.text((bar_left + 25, y), f"{share:.0%}", font=small, fill=DARK, anchor="lm")
    caption = _vertical_text("share of the true class", small, DARK)
    image.paste(caption, (width - caption.width - 4, top + (grid - caption.height) // 2), caption)
    image.save(path)
