"""Every picture isda-viz draws, with PIL: the figure grid, the GAN sample grid and the audit pages.

One font helper (`font`) serves them all, so every caption is set in the same face.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torchvision.utils as vutils
from PIL import Image, ImageDraw, ImageFont

from isda_viz.outputs.audit_report import AuditQuery, split_query_source

AUDIT_MAX_SIDE = 2000   # px: an audit page is at most this wide and this tall
AUDIT_TEXT_PX = 15      # audit captions: readable at 100% zoom
FLAGGED = (200, 0, 0)   # colour of a likely copy
GREY = (60, 60, 60)


def font(size: int):
    """A scalable font of `size` px (Pillow's own, else DejaVu Sans), or Pillow's fixed bitmap font as a last resort."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow < 10.1, or built without FreeType
        try:
            return ImageFont.truetype("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", size)
        except OSError:
            return ImageFont.load_default()


def to_pil(image: torch.Tensor, scale: int = 1) -> Image.Image:
    """`(C, H, W)` in [0, 1] (C = 1 or 3) → PIL image, enlarged `scale` times with nearest pixels."""
    array = (image.detach().float().clamp(0, 1) * 255).round().byte().cpu()
    if array.shape[0] == 1:
        pil = Image.fromarray(array[0].numpy(), mode="L")
    else:
        pil = Image.fromarray(array.permute(1, 2, 0).numpy(), mode="RGB")
    if scale != 1:
        pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
    return pil


def labelled_grid(rows: list[list[torch.Tensor]], headers: list[str], row_labels: list[str],
                  cell: int = 96, captions: list[list[str]] | None = None) -> Image.Image:
    """A figure: one row per entry of `rows` (images `(C, H, W)` in [0, 1]), headers above the
    columns, a label left of each row and an optional caption under each image. Cells are
    `cell` px squares; small images are enlarged with nearest pixels so their pixels stay visible."""
    large, small = font(max(11, cell // 8)), font(max(10, cell // 10))
    n_cols = max(len(r) for r in rows)
    label_w = int(cell * 1.2)
    header_h = cell // 4 + 6
    caption_h = (cell // 7 + 4) if captions else 0
    row_h = cell + caption_h + 4
    canvas = Image.new("RGB", (label_w + n_cols * (cell + 4), header_h + len(rows) * row_h), "white")
    draw = ImageDraw.Draw(canvas)
    for j, text in enumerate(headers[:n_cols]):
        draw.text((label_w + j * (cell + 4) + cell // 2, header_h // 2), text, fill="black", font=large, anchor="mm")
    for i, row in enumerate(rows):
        top = header_h + i * row_h
        draw.text((label_w - 6, top + cell // 2), row_labels[i], fill="black", font=large, anchor="rm")
        for j, image in enumerate(row):
            scale = max(1, cell // max(image.shape[-2:]))
            pil = to_pil(image, scale).convert("RGB")
            if pil.size != (cell, cell):
                pil = pil.resize((cell, cell), Image.BILINEAR)
            left = label_w + j * (cell + 4)
            canvas.paste(pil, (left, top))
            if captions and captions[i][j]:
                draw.text((left + cell // 2, top + cell + 2), captions[i][j], fill=GREY, font=small, anchor="ma")
    return canvas


def sample_grid(images: torch.Tensor, columns: int, row_labels: list[str] | None = None,
                scale: int = 2) -> Image.Image:
    """GAN samples `(N, C, H, W)` in [0, 1] (C = 1 or 3) as rows of `columns`, enlarged `scale` times.

    Images are separated by 2 px of white; with `row_labels` (one per row, e.g. class
    names) a 90 px margin on the left names each row.
    """

    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    grid = vutils.make_grid(images.detach().float().cpu(), nrow=columns, padding=2, pad_value=1.0)
    picture = to_pil(grid, scale)
    if not row_labels:
        return picture
    margin = 90
    canvas = Image.new("RGB", (picture.width + margin, picture.height), "white")
    canvas.paste(picture, (margin, 0))
    draw = ImageDraw.Draw(canvas)
    cell = (images.shape[-2] + 2) * scale
    face = font(12)
    for i, name in enumerate(row_labels):
        draw.text((4, 2 * scale + i * cell + (cell - 2 * scale) // 2), _fit(draw, name, face, margin - 6), fill="black",
                  font=face, anchor="lm")
    return canvas


# ---------------------------------------------------------------------------------------------- audit pages


def _fit(draw: ImageDraw.ImageDraw, text: str, face, width: int) -> str:
    """`text`, cut with an ellipsis so that it is at most `width` px wide in `face`."""
    if draw.textlength(text, font=face) <= width:
        return text
    while text and draw.textlength(text + "…", font=face) > width:
        text = text[:-1]
    return text + "…"


def _tile(image: torch.Tensor, side: int) -> Image.Image:
    """uint8 `(C, H, W)` → a PIL RGB tile of `side` px (small images upscaled with visible pixels)."""
    array = image.permute(1, 2, 0).numpy()
    pil = Image.fromarray(array[..., 0] if array.shape[2] == 1 else array).convert("RGB")
    resample = Image.Resampling.NEAREST if pil.width < side else Image.Resampling.BICUBIC
    return pil.resize((side, side), resample)


def _query_title(number: int, source: str) -> str:
    """'#3 aug_0_1.png (augmented from test:9100)': the file name, not its folders, and what it came from."""
    path, origin = split_query_source(source)
    return f"#{number} {Path(path).name}" + (f" ({origin})" if origin else "")


def audit_page(images: list[torch.Tensor], records: list[AuditQuery], neighbours: list[list[torch.Tensor]],
               class_names: list[str], heading: list[str], first: int = 0, tile: int | None = None,
               max_side: int = AUDIT_MAX_SIDE) -> Image.Image:
    """One page of the audit figure: each query with its k nearest training images, in one or two columns.

    `images`: the queries, uint8 `(C, H, W)`; `records`: their audit.json entries (`source`,
    `copy_score`, `flagged`, `neighbors` with `distance` and `label`, see `outputs.audit_report`); `neighbours`: per query the
    neighbours' uint8 images `(C, H, W)`; `heading`: lines printed above; `first`: the 0-based
    number of the page's first query in the audit. Each query is titled with its number and file,
    its copy score under it (red, framed, "likely copy" when flagged), then its neighbours with
    distance and class. Tiles are about 112 px (small images enlarged by a whole factor, pixels
    kept visible) and shrink only as much as the page needs to stay within `max_side` px on
    each side. Returns a PIL RGB image.
    """
    text, pad, gap = font(AUDIT_TEXT_PX), 6, 24
    line = AUDIT_TEXT_PX + 5
    n, k = len(records), max(len(row) for row in neighbours)
    size = images[0].shape[-1]

    def page_size(columns: int, side: int) -> tuple[int, int]:
        block_w = (k + 1) * (side + pad) + pad          # the query, a gap of `pad`, then k neighbours
        block_h = line + side + 2 * line + 2 * pad      # title, tiles, two caption lines
        width = 2 * pad + columns * block_w + (columns - 1) * gap
        return width, (len(heading) + 1) * line + math.ceil(n / columns) * block_h

    def largest_tile(columns: int) -> int:
        side = tile or (size * max(1, round(112 / size)) if size < 112 else 112)
        while side > 8 and max(page_size(columns, side)) > max_side:
            side -= 1
        if tile is None and size < side:
            side = size * (side // size)              # a whole enlargement: every pixel the same size
        return side

    # two columns only when that allows larger tiles than one (a long page of many queries)
    columns, side = max(((c, largest_tile(c)) for c in (1, 2) if c <= n), key=lambda cs: (cs[1], -cs[0]))
    width, height = page_size(columns, side)
    block_w = (k + 1) * (side + pad) + pad
    block_h = line + side + 2 * line + 2 * pad
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for i, words in enumerate(heading):
        draw.text((pad, pad + i * line), _fit(draw, words, text, width - 2 * pad), fill="black", font=text)
    top = (len(heading) + 1) * line

    def name(label: int) -> str:
        return class_names[label] if 0 <= label < len(class_names) else str(label)

    for i, (image, rec, row) in enumerate(zip(images, records, neighbours)):
        x0 = pad + (i // math.ceil(n / columns)) * (block_w + gap)
        y0 = top + (i % math.ceil(n / columns)) * block_h
        colour = FLAGGED if rec.flagged else (0, 0, 0)
        draw.text((x0, y0), _fit(draw, _query_title(first + i + 1, rec.source), text, block_w - pad),
                  fill=colour, font=text)
        y = y0 + line
        canvas.paste(_tile(image, side), (x0, y))
        if rec.flagged:
            draw.rectangle([x0 - 3, y - 3, x0 + side + 2, y + side + 2], outline=FLAGGED, width=3)
        draw.text((x0, y + side + 3), _fit(draw, f"score {rec.copy_score:.2f}", text, side + pad),
                  fill=colour, font=text)
        if rec.flagged:
            draw.text((x0, y + side + 3 + line), _fit(draw, "likely copy", text, side + pad), fill=FLAGGED, font=text)
        for j, (neighbour, nb) in enumerate(zip(row, rec.neighbors)):
            x = x0 + (j + 1) * (side + pad) + pad
            canvas.paste(_tile(neighbour, side), (x, y))
            draw.text((x, y + side + 3), _fit(draw, f"d={nb.distance:.3g}", text, side + pad - 2),
                      fill=(0, 0, 0), font=text)
            draw.text((x, y + side + 3 + line), _fit(draw, name(nb.label), text, side + pad - 2),
                      fill=GREY, font=text)
    return canvas
