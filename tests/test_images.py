"""pgot/images.py: tensors <-> PNG within 8-bit rounding, labelled grids with their tile boxes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from pgot.images import labelled_grid, load_image, png_bytes, save_png, to_pil, to_uint8


def test_png_round_trip_is_within_rounding(tmp_path):
    x = torch.rand(3, 17, 23, generator=torch.Generator().manual_seed(0))
    path = save_png(x, tmp_path / "a" / "b.png")
    assert path.is_file() and not list(path.parent.glob(".*.tmp"))
    y = load_image(path)
    assert y.shape == x.shape and (y - x).abs().max() <= 0.5 / 255 + 1e-6
    assert torch.equal(load_image(path.read_bytes()), y)
    assert to_uint8(torch.tensor([[[1.5]], [[-1.0]], [[0.5]]])).tolist() == [[[255, 0, 128]]]


def test_to_pil_downscales_only():
    x = torch.rand(3, 40, 20)
    assert to_pil(x).size == (20, 40) and to_pil(x, max_side=10).size == (5, 10) and to_pil(x, 100).size == (20, 40)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\) or \(3, H, W\)"):
        to_uint8(torch.rand(4, 8, 8))


def test_grid_tiles_are_exact_and_boxes_survive_png(tmp_path):
    images = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    grid = labelled_grid(images, 2, row_labels=["a", "b", "c"], column_labels=["x", "y"], title="t", tile=16)
    boxes = json.loads(grid.info["tiles"])
    assert len(boxes) == 5 and all(b[2:] == [16, 16] for b in boxes)
    pixels = np.asarray(grid)
    for i, (x, y, w, h) in enumerate(boxes):
        assert np.array_equal(pixels[y : y + h, x : x + w], to_uint8(images[i]))
    assert boxes[0][1] == boxes[1][1] < boxes[2][1] and boxes[0][0] == boxes[2][0] < boxes[1][0]
    path = save_png(grid, tmp_path / "g.png")
    with Image.open(path) as im:
        assert json.loads(im.info["tiles"]) == boxes
    assert png_bytes(grid)[:8] == b"\x89PNG\r\n\x1a\n"


def test_grid_downscales_large_tiles_and_rejects_bad_input():
    grid = labelled_grid(torch.rand(2, 3, 64, 64), 2, tile=32)
    assert all(b[2:] == [32, 32] for b in json.loads(grid.info["tiles"])) and grid.width < 2 * 64
    with pytest.raises(ValueError, match="non-empty"):
        labelled_grid(torch.rand(0, 3, 8, 8), 1)
    with pytest.raises(ValueError, match="row labels"):
        labelled_grid(torch.rand(2, 3, 8, 8), 2, row_labels=["a", "b"])
