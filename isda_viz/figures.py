"""Image grids with column headers and row labels, drawn with PIL."""

from __future__ import annotations

import torch
from PIL import Image, ImageDraw, ImageFont


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


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        return ImageFont.load_default()


def labelled_grid(rows: list[list[torch.Tensor]], headers: list[str], row_labels: list[str],
                  cell: int = 96, captions: list[list[str]] | None = None) -> Image.Image:
    """A figure: one row per entry of `rows` (images `(C, H, W)` in [0, 1]), headers above the
    columns, a label left of each row and an optional caption under each image. Cells are
    `cell` px squares; small images are enlarged with nearest pixels so their pixels stay visible."""
    font, small = _font(max(11, cell // 8)), _font(max(10, cell // 10))
    n_cols = max(len(r) for r in rows)
    label_w = int(cell * 1.2)
    header_h = cell // 4 + 6
    caption_h = (cell // 7 + 4) if captions else 0
    row_h = cell + caption_h + 4
    canvas = Image.new("RGB", (label_w + n_cols * (cell + 4), header_h + len(rows) * row_h), "white")
    draw = ImageDraw.Draw(canvas)
    for j, text in enumerate(headers[:n_cols]):
        draw.text((label_w + j * (cell + 4) + cell // 2, header_h // 2), text, fill="black", font=font, anchor="mm")
    for i, row in enumerate(rows):
        top = header_h + i * row_h
        draw.text((label_w - 6, top + cell // 2), row_labels[i], fill="black", font=font, anchor="rm")
        for j, image in enumerate(row):
            scale = max(1, cell // max(image.shape[-2:]))
            pil = to_pil(image, scale).convert("RGB")
            if pil.size != (cell, cell):
                pil = pil.resize((cell, cell), Image.BILINEAR)
            left = label_w + j * (cell + 4)
            canvas.paste(pil, (left, top))
            if captions and captions[i][j]:
                draw.text((left + cell // 2, top + cell + 2), captions[i][j], fill=(60, 60, 60), font=small, anchor="ma")
    return canvas
