"""The PIL drawings of isda_viz.outputs.figures: pixels where they should be, and one font for every caption."""

from __future__ import annotations

import numpy as np
import torch
from PIL import ImageFont

from isda_viz.outputs.figures import font, sample_grid


def test_sample_grid_places_each_image_enlarged_in_its_cell_with_white_padding():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(6, 1, 5, 5, generator=g)  # 2 rows of 3
    scale, cell = 3, 5 + 2
    picture = np.asarray(sample_grid(images, 3, None, scale))
    assert picture.shape == ((2 * cell + 2) * scale, (3 * cell + 2) * scale, 3)
    expected = (images * 255).round().to(torch.uint8).numpy()
    for n in range(6):
        r, c = divmod(n, 3)
        top, left = (2 + r * cell) * scale, (2 + c * cell) * scale
        drawn = picture[top:top + 5 * scale, left:left + 5 * scale]
        want = np.repeat(np.repeat(expected[n, 0], scale, 0), scale, 1)
        for channel in range(3):
            np.testing.assert_array_equal(drawn[..., channel], want)
    assert np.all(picture[:2 * scale] == 255)  # the top padding is white

    labelled = np.asarray(sample_grid(images, 3, ["first", "second"], scale))
    assert labelled.shape == (picture.shape[0], picture.shape[1] + 90, 3)
    np.testing.assert_array_equal(labelled[:, 90:], picture)
    for r in range(2):  # each row's name is written in its own band of the margin
        band = labelled[(2 + r * cell) * scale:(2 + r * cell + 5) * scale, :90]
        assert (band < 128).any()


def test_font_is_scalable():
    small, large = font(10), font(30)
    assert isinstance(large, ImageFont.FreeTypeFont)
    assert large.getbbox("Ankle boot")[2] > 2.5 * small.getbbox("Ankle boot")[2]
