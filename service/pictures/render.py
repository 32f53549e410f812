"""Drawing for `cnnserve show`: values to colours, and sheets of labelled tiles, as PNGs.

Pillow and numpy alone, so the serving install stays small. Every picture is a *sheet*: a title
strip (an optional thumbnail of the input, the title, a subtitle, and a colour key) over rows
of tiles. A tile is one 2-D array drawn in the diverging colours below, upscaled by a whole
factor with nearest-neighbour (every value stays a crisp square), framed in grey, labelled
underneath.

Colours follow the article's weight pictures: **green positive, red negative, black zero**,
linear in the value, on a scale symmetric about zero and shared by every tile of a sheet (the
largest |value| of the layer, shown in the key), so tiles compare with each other and a
darker square is a weaker response, never a different sign. Black zero suits activations,
which are mostly zero after ReLU: what a map detects lights up on a dark ground, like the
light-on-dark Fashion-MNIST items themselves. Input images are drawn in grey, as they are.

Each saved PNG carries a `cnnserve` text chunk (JSON): model, layer, shape, scale and the box
and label of every tile, so scripts and tests can find the tiles without knowing the layout.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

POSITIVE = np.array([40, 230, 70], dtype=np.float64)  # the colour of +scale
NEGATIVE = np.array([240, 50, 40], dtype=np.float64)  # the colour of -scale
WHITE, DARK, GREY, FRAME = (255, 255, 255), (33, 33, 33), (110, 110, 110), (170, 170, 170)
MARGIN, GAP = 16, 10
THUMBNAIL = 56  # the input in the title strip: 28 x 28 at twice the size
KEY_WIDTH, KEY_HEIGHT = 180, 12
TEXT_KEY = "cnnserve"  # the PNG text chunk holding the sheet's JSON description


# Colours -------------------------------------------------------------------------------------


def symmetric_scale(*arrays: np.ndarray) -> float:
    """The largest |value| over all arrays: one scale for a whole layer (0 when all are 0)."""
    return max((float(np.max(np.abs(a))) for a in arrays if a.size), default=0.0)


def parse_scale(text: str) -> str | float:
    """`--scale`: "max" (the largest |value|), "pNN" (the NNth percentile of |value|, brighter
    pictures where a few values dominate; larger ones saturate) or a positive number (a fixed
    scale, so several pictures compare)."""
    text = text.strip().lower()
    if text == "max":
        return text
    try:
        if text.startswith("p") and 0 < float(text[1:]) <= 100:
            return text
        number = float(text)
    except ValueError:
        number = math.nan
    if not (number > 0 and math.isfinite(number)):
        raise ValueError(
            f"scale must be max, pNN (0 < NN <= 100) or a positive number; got {text!r}"
        )
    return number


def choose_scale(spec: str | float, *arrays: np.ndarray) -> float:
    """The scale `spec` (from `parse_scale`) gives for these arrays taken together."""
    if isinstance(spec, float | int):
        return float(spec)
    if spec == "max":
        return symmetric_scale(*arrays)
    values = np.concatenate([np.abs(np.asarray(a, dtype=np.float64)).ravel() for a in arrays])
    return float(np.percentile(values, float(spec[1:]))) if values.size else 0.0


def describe_scale(spec: str | float, scale: float) -> str:
    """How the scale was chosen, for a subtitle."""
    value = f"colour scale ±{format_value(scale)}"
    if spec == "max":
        return f"{value}: the largest |value|"
    if isinstance(spec, str):
        return f"{value}: the {spec[1:]}th percentile of |value|, larger ones saturate"
    return f"{value}, as given"


def colorize(values: np.ndarray, scale: float) -> np.ndarray:
    """Values to RGB uint8: black at 0, linearly to green at +scale and to red at -scale.

    Values beyond the scale saturate; a zero scale (an all-zero layer) draws black.
    """
    values = np.asarray(values, dtype=np.float64)
    if scale > 0 and math.isfinite(scale):
        v = np.clip(np.nan_to_num(values / scale), -1.0, 1.0)[..., None]
    else:
        v = np.zeros((*values.shape, 1))
    rgb = np.where(v >= 0, v * POSITIVE, -v * NEGATIVE)
    return np.rint(rgb).astype(np.uint8)


def grayscale(image: np.ndarray) -> np.ndarray:
    """An input image with values in [0, 1] as RGB uint8 grey levels."""
    grey = np.rint(np.clip(np.asarray(image, dtype=np.float64), 0, 1) * 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)


def zoom(rgb: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour upscaling by a whole factor: each value becomes a factor^2 square."""
    return np.repeat(np.repeat(rgb, factor, axis=0), factor, axis=1)


def zoom_for(height: int, width: int, count: int = 1) -> int:
    """The whole factor that brings a tile near a size readable for `count` tiles on a sheet."""
    target = 112 if count <= 16 else 84 if count <= 64 else 56
    return max(1, target // max(height, width, 1))


def grid_columns(count: int) -> int:
    """Columns for `count` tiles: one row up to 6, two rows up to 10, else about square."""
    if count <= 6:
        return max(count, 1)
    if count <= 10:
        return math.ceil(count / 2)
    return math.ceil(math.sqrt(count))


# Text ----------------------------------------------------------------------------------------


def font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


TITLE_FONT, TEXT_FONT, LABEL_FONT = font(16), font(13), font(12)
_MEASURE = ImageDraw.Draw(Image.new("RGB", (1, 1)))


def text_size(text: str, which: ImageFont.ImageFont) -> tuple[int, int]:
    left, top, right, bottom = _MEASURE.textbbox((0, 0), text or " ", font=which)
    return int(math.ceil(right - min(left, 0))), int(math.ceil(bottom - min(top, 0)))


def format_value(value: float) -> str:
    return f"{value:.3g}"


# Sheets --------------------------------------------------------------------------------------


@dataclass
class Cell:
    """One tile: an RGB array at its final size, its label, and what it shows.

    `kind` "map" cells are the sheet's tiles (listed in the PNG's description); "input" cells
    show an image. `parts` are sub-boxes (x, y, w, h, label) inside the cell, e.g. the bars of a
    bar chart, listed as tiles instead of the cell itself.
    """

    rgb: np.ndarray
    label: str = ""
    kind: str = "map"
    parts: list[tuple[int, int, int, int, str]] = field(default_factory=list)


@dataclass
class Row:
    cells: list[Cell | None]
    caption: str = ""


@dataclass
class Picture:
    image: Image.Image
    info: dict[str, Any]

    @property
    def tiles(self) -> list[dict[str, Any]]:
        return self.info["tiles"]

    def save(self, path: Path) -> None:
        text = PngInfo()
        text.add_text(TEXT_KEY, json.dumps(self.info))
        self.image.save(path, pnginfo=text)


def read_info(path: Path) -> dict[str, Any]:
    """The JSON description a saved sheet carries (tile boxes and labels, scale, layer)."""
    with Image.open(path) as image:
        return json.loads(image.info[TEXT_KEY])


def colour_key(scale: float) -> Image.Image:
    """A horizontal bar from -scale (red) through 0 (black) to +scale (green), with values."""
    ramp = colorize(np.linspace(-scale or -1, scale or 1, KEY_WIDTH), scale or 1)
    bar = np.repeat(ramp[None], KEY_HEIGHT, axis=0)
    label_height = text_size("0", LABEL_FONT)[1]
    key = Image.new("RGB", (KEY_WIDTH + 40, KEY_HEIGHT + label_height + 8), WHITE)
    key.paste(Image.fromarray(bar), (20, 0))
    draw = ImageDraw.Draw(key)
    draw.rectangle([19, -1, 20 + KEY_WIDTH, KEY_HEIGHT], outline=FRAME)
    y = KEY_HEIGHT + 4
    for x, text in (
        (20, f"-{format_value(scale)}"),
        (20 + KEY_WIDTH // 2, "0"),
        (20 + KEY_WIDTH, f"+{format_value(scale)}"),
    ):
        draw.line([(x, KEY_HEIGHT), (x, KEY_HEIGHT + 3)], fill=DARK)
        draw.text((x, y), text, font=LABEL_FONT, fill=DARK, anchor="mt")
    return key


def _header(
    title: str, subtitle: list[str], scale: float | None, thumbnail: np.ndarray | None
) -> Image.Image:
    """The title strip: thumbnail, title and subtitle lines, colour key at the right."""
    left = MARGIN
    parts_height = []
    if thumbnail is not None:
        left += THUMBNAIL + GAP
        parts_height.append(THUMBNAIL)
    lines = [(title, TITLE_FONT)] + [(line, TEXT_FONT) for line in subtitle]
    line_sizes = [text_size(text, which) for text, which in lines]
    text_height = sum(h for _, h in line_sizes) + 4 * (len(lines) - 1)
    parts_height.append(text_height)
    key = colour_key(scale) if scale is not None else None
    if key is not None:
        parts_height.append(key.height)
    width = left + max(w for w, _ in line_sizes) + MARGIN
    if key is not None:
        width += 2 * GAP + key.width
    height = max(parts_height) + 2 * MARGIN - 4
    strip = Image.new("RGB", (width, height), WHITE)
    if thumbnail is not None:
        factor = max(1, THUMBNAIL // thumbnail.shape[0])
        picture = Image.fromarray(zoom(grayscale(thumbnail), factor))
        strip.paste(picture, (MARGIN, MARGIN))
        ImageDraw.Draw(strip).rectangle(
            [MARGIN - 1, MARGIN - 1, MARGIN + picture.width, MARGIN + picture.height], outline=FRAME
        )
    draw = ImageDraw.Draw(strip)
    y = MARGIN
    for (text, which), (_, h) in zip(lines, line_sizes, strict=True):
        draw.text((left, y), text, font=which, fill=DARK if which is TITLE_FONT else GREY)
        y += h + 4
    if key is not None:
        strip.paste(key, (width - MARGIN - key.width, MARGIN))
    return strip


def sheet(
    title: str,
    rows: list[Row],
    *,
    subtitle: list[str] | None = None,
    scale: float | None = None,
    thumbnail: np.ndarray | None = None,
    info: dict[str, Any] | None = None,
) -> Picture:
    """Title strip over rows of framed, labelled cells; each cell centred in its slot, slots
    as wide as their column's widest cell (or label) and as tall as their row's tallest."""
    columns = max((len(row.cells) for row in rows), default=1)
    widths = [1] * columns
    heights = [1] * len(rows)
    for r, row in enumerate(rows):
        for column, cell in enumerate(row.cells):
            if cell is not None:
                label_w = text_size(cell.label, LABEL_FONT)[0] + 4 if cell.label else 0
                widths[column] = max(widths[column], cell.rgb.shape[1], label_w)
                heights[r] = max(heights[r], cell.rgb.shape[0])
    lefts = [MARGIN + sum(widths[:c]) + c * GAP for c in range(columns)]
    label_h = text_size("Ag", LABEL_FONT)[1] + 6
    caption_h = text_size("Ag", TEXT_FONT)[1] + 6

    header = _header(title, subtitle or [], scale, thumbnail)
    body_w = lefts[-1] + widths[-1] + MARGIN
    body_w = max(
        body_w, max((text_size(r.caption, TEXT_FONT)[0] + 2 * MARGIN for r in rows), default=0)
    )
    row_heights = [
        (caption_h if row.caption else 0)
        + slot_h
        + (label_h if any(c is not None and c.label for c in row.cells) else 0)
        for row, slot_h in zip(rows, heights, strict=True)
    ]
    width = max(header.width, body_w)
    height = header.height + sum(row_heights) + GAP * max(len(rows) - 1, 0) + MARGIN
    image = Image.new("RGB", (width, height), WHITE)
    image.paste(header, (0, 0))
    draw = ImageDraw.Draw(image)
    draw.line([(MARGIN, header.height - 6), (width - MARGIN, header.height - 6)], fill=FRAME)

    tiles: list[dict[str, Any]] = []
    inputs: list[dict[str, Any]] = []
    y = header.height + 4
    for row, row_height, slot_h in zip(rows, row_heights, heights, strict=True):
        top = y
        if row.caption:
            draw.text((MARGIN, y), row.caption, font=TEXT_FONT, fill=DARK)
            top += caption_h
        for column, cell in enumerate(row.cells):
            if cell is None:
                continue
            h, w = cell.rgb.shape[:2]
            x0 = lefts[column] + (widths[column] - w) // 2
            y0 = top + (slot_h - h) // 2
            image.paste(Image.fromarray(np.ascontiguousarray(cell.rgb)), (x0, y0))
            draw.rectangle([x0 - 1, y0 - 1, x0 + w, y0 + h], outline=FRAME)
            if cell.label:
                centre = lefts[column] + widths[column] // 2
                draw.text(
                    (centre, top + slot_h + 4), cell.label, font=LABEL_FONT, fill=DARK, anchor="mt"
                )
            entry = {"box": [x0, y0, w, h], "label": cell.label}
            if cell.kind == "input":
                inputs.append(entry)
            elif cell.parts:
                tiles += [
                    {"box": [x0 + px, y0 + py, pw, ph], "label": text}
                    for px, py, pw, ph, text in cell.parts
                ]
            else:
                tiles.append(entry)
        y += row_height + GAP

    description = dict(info or {})
    description.update(title=title, scale=scale, tiles=tiles, inputs=inputs)
    return Picture(image, description)


# Building blocks for the modes ---------------------------------------------------------------


def map_cells(
    maps: np.ndarray, scale: float, labels: list[str] | None = None, factor: int | None = None
) -> list[Cell]:
    """One cell per channel of C x H x W maps, in the diverging colours at a shared scale."""
    count, height, width = maps.shape
    factor = factor or zoom_for(height, width, count)
    labels = labels if labels is not None else [str(i) for i in range(count)]
    return [
        Cell(zoom(colorize(m, scale), factor), label) for m, label in zip(maps, labels, strict=True)
    ]


def input_cell(image: np.ndarray, label: str = "input", size: int = 112) -> Cell:
    """The input image (H x W in [0, 1]) in grey, upscaled to about `size` pixels."""
    factor = max(1, size // max(image.shape))
    return Cell(zoom(grayscale(image), factor), label, kind="input")


def grid_rows(cells: list[Cell], columns: int | None = None) -> list[Row]:
    columns = columns or grid_columns(len(cells))
    return [Row(list(cells[i : i + columns])) for i in range(0, len(cells), columns)]


def bar_chart(values: np.ndarray, scale: float, per_row: int = 64) -> Cell:
    """A vector (hidden units, a fully connected stage) as bars, one per unit, in rows.

    Bars rise for positive values and fall for negative ones (the zero line sits at the bottom
    when nothing is negative), coloured like the maps; every eighth unit is numbered.
    """
    values = np.asarray(values, dtype=np.float64).ravel()
    count = len(values)
    per_row = min(per_row, count) or 1
    bar_w = max(4, min(24, 640 // per_row))
    plot_h = 90
    tick_h = text_size("0", LABEL_FONT)[1] + 6
    negative = bool((values < 0).any())
    rows = math.ceil(count / per_row)
    width = per_row * bar_w + 1
    band = plot_h + tick_h + 6
    canvas = Image.new("RGB", (width, rows * band - 6), WHITE)
    draw = ImageDraw.Draw(canvas)
    parts: list[tuple[int, int, int, int, str]] = []
    half = plot_h // 2 if negative else plot_h
    for r in range(rows):
        top = r * band
        zero_y = top + half
        draw.rectangle([0, top, width - 1, top + plot_h], fill=(246, 246, 246))
        draw.line([(0, zero_y), (width - 1, zero_y)], fill=FRAME)
        for k in range(per_row):
            unit = r * per_row + k
            if unit >= count:
                break
            x = k * bar_w
            parts.append((x, top, bar_w, plot_h, str(unit)))
            value = values[unit] / scale if scale > 0 else 0.0
            length = round(min(abs(value), 1.0) * half)
            if length:
                colour = tuple(int(c) for c in colorize(np.array(values[unit]), scale))
                y0, y1 = (zero_y - length, zero_y) if value > 0 else (zero_y, zero_y + length)
                draw.rectangle([x + 1, y0, x + bar_w - 1, y1], fill=colour)
            if unit % 8 == 0:
                draw.line([(x, top + plot_h), (x, top + plot_h + 3)], fill=DARK)
                draw.text((x, top + plot_h + 4), str(unit), font=LABEL_FONT, fill=DARK, anchor="lt")
    return Cell(np.asarray(canvas), "", parts=parts)
