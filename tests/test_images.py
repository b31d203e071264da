"""rdt_lib.images: grids against a reshape written out here, PNG round trip to 8 bits."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from rdt_lib.images import image_grid, write_png


def test_grid_without_padding_is_the_row_major_tiling():
    images = torch.rand(6, 3, 4, 5, generator=torch.Generator().manual_seed(0))
    expected = images.reshape(2, 3, 3, 4, 5).permute(2, 0, 3, 1, 4).reshape(3, 8, 15)
    assert torch.equal(image_grid(images, 2, 3), expected)


def test_grid_padding_is_white_and_missing_cells_stay_white():
    images = torch.zeros(3, 3, 2, 2)
    grid = image_grid(images, 2, 2, pad=1)
    assert grid.shape == (3, 5, 5)
    assert grid[:, 0:2, 0:2].eq(0).all() and grid[:, 0:2, 3:5].eq(0).all() and grid[:, 3:5, 0:2].eq(0).all()
    assert grid[:, 2, :].eq(1).all() and grid[:, :, 2].eq(1).all() and grid[:, 3:5, 3:5].eq(1).all()


def test_png_round_trip_is_within_half_a_level(tmp_path):
    image = torch.rand(3, 7, 9, generator=torch.Generator().manual_seed(1))
    path = write_png(tmp_path / "sub" / "a.png", image)
    with Image.open(path) as img:
        back = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)
    assert back.shape == image.shape
    assert (back - image).abs().max() <= 0.5 / 255 + 1e-6
