"""Images: tensors <-> PIL / PNG, and labelled grids.

pgot's images are float tensors ``(B, 3, H, W)`` (or one ``(3, H, W)``) in ``[0, 1]``. Conversion to 8 bits
rounds ``x * 255`` to the nearest integer after clamping to ``[0, 1]``, so a PNG written by
:func:`save_png` and read back by :func:`load_image` differs from the tensor by at most 1/510 per pixel.
"""

from __future__ import annotations

import io
import json
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from pgot.files import atomic_write

__all__ = ["font", "labelled_grid", "load_image", "png_bytes", "save_png", "to_pil", "to_uint8"]


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``(B, 3, H, W)`` or ``(3, H, W)`` floats in [0, 1] -> ``(B, H, W, 3)`` or ``(H, W, 3)`` uint8 (clamped, rounded)."""
    if images.ndim not in (3, 4) or images.shape[-3] != 3:
        raise ValueError(f"images must be (B, 3, H, W) or (3, H, W) RGB tensors, got shape {tuple(images.shape)}.")
    x = images.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).cpu()
    return x.permute(*range(x.ndim - 3), -2, -1, -3).numpy()


def to_pil(image: torch.Tensor, max_side: int | None = None) -> Image.Image:
    """One ``(3, H, W)`` image in [0, 1] as an RGB PIL image, downscaled (bicubic) so its longer side is at most
    ``max_side`` pixels (never upscaled)."""
    pil = Image.fromarray(to_uint8(image), "RGB")
    if max_side and max(pil.size) > max_side:
        scale = max_side / max(pil.size)
        size = (max(1, round(pil.width * scale)), max(1, round(pil.height * scale)))
        pil = pil.resize(size, Image.Resampling.BICUBIC)
    return pil


def load_image(source: str | Path | bytes) -> torch.Tensor:
    """An image file (or its encoded bytes) as a ``(3, H, W)`` float tensor in ``[0, 1]`` (converted to RGB).

    Raises:
        FileNotFoundError: the file does not exist.
        PIL.UnidentifiedImageError: the data is not an image.
    """
    with Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    return torch.from_numpy(arr).permute(2, 0, 1).float() / 255.0


def save_png(image: torch.Tensor | Image.Image, path: str | Path) -> Path:
    """Write one image (``(3, H, W)`` tensor in [0, 1], or a PIL image) as a PNG, atomically; returns ``path``."""
    pil = image if isinstance(image, Image.Image) else to_pil(image)
    return atomic_write(path, lambda tmp: tmp.write_bytes(png_bytes(pil)), fsync=False)


def font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's default font at ``size`` px (a fixed bitmap font on Pillow builds without FreeType)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):
        return ImageFont.load_default()


def _text_size(f: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> int:
    return int(getattr(f, "size", 11))


def labelled_grid(
    images: torch.Tensor,
    columns: int,
    *,
    row_labels: Sequence[str] = (),
    column_labels: Sequence[str] = (),
    title: str = "",
    tile: int = 256,
) -> Image.Image:
    """Images laid out in rows of ``columns`` tiles, with a label left of each row, above each column and a title.

    Args:
        images: ``(B, 3, H, W)`` in [0, 1], row-major (image ``i`` goes to row ``i // columns``).
        columns: tiles per row.
        row_labels: one label per row (wrapped to the label column; may be empty).
        column_labels: one label per column (may be empty).
        title: a line above the grid (wrapped; may be empty).
        tile: longest side of each tile in pixels; larger images are downscaled (never upscaled).

    Returns:
        An RGB PIL image on a white background. ``image.info["tiles"]`` holds the tiles' boxes as JSON,
        ``[[x, y, width, height], ...]`` in image order (:func:`save_png` keeps it as a PNG text chunk).

    Raises:
        ValueError: bad shapes, ``columns < 1`` or more labels than rows / columns.
    """
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[0] == 0:
        raise ValueError(f"images must be a non-empty (B, 3, H, W) batch, got shape {tuple(images.shape)}.")
    if columns < 1:
        raise ValueError(f"columns must be >= 1, got {columns}.")
    b = images.shape[0]
    rows = -(-b // columns)
    if len(row_labels) > rows or len(column_labels) > columns:
        raise ValueError(
            f"{len(row_labels)} row labels and {len(column_labels)} column labels for a grid of {rows} x {columns}."
        )
    tiles = [to_pil(images[i], tile) for i in range(b)]
    tw, th = tiles[0].size
    small = font(max(10, min(16, th // 8 + 6)))
    line_h = _text_size(small) + 4
    pad = 4
    label_w = 0
    wrapped_rows: list[list[str]] = []
    if any(row_labels):
        label_w = max(90, min(220, 2 * tw))
        chars = max(8, int(label_w / (0.55 * _text_size(small))))
        max_lines = max(1, th // line_h)
        wrapped_rows = [textwrap.wrap(t, chars, max_lines=max_lines, placeholder=" ...") or [""] for t in row_labels]
    width = label_w + columns * (tw + pad) + pad
    title_lines = textwrap.wrap(title, max(20, int(width / (0.55 * _text_size(small)))), max_lines=3) if title else []
    top = pad + line_h * len(title_lines) + (line_h if any(column_labels) else 0)
    height = top + rows * (th + pad) + pad
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for k, line in enumerate(title_lines):
        draw.text((pad, pad + k * line_h), line, fill="black", font=small)
    for c, text in enumerate(column_labels):
        draw.text((label_w + pad + c * (tw + pad), top - line_h), str(text), fill="black", font=small)
    for r, lines in enumerate(wrapped_rows):
        y = top + r * (th + pad)
        for k, line in enumerate(lines):
            draw.text((pad, y + k * line_h), line, fill="black", font=small)
    boxes = []
    for i, t in enumerate(tiles):
        r, c = divmod(i, columns)
        x, y = label_w + pad + c * (tw + pad), top + r * (th + pad)
        canvas.paste(t, (x, y))
        boxes.append([x, y, t.width, t.height])
    canvas.info["tiles"] = json.dumps(boxes)
    return canvas


def png_bytes(image: Image.Image) -> bytes:
    """``image`` encoded as PNG, with its ``info["tiles"]`` (if any) as a text chunk."""
    meta = PngInfo()
    if "tiles" in image.info:
        meta.add_text("tiles", str(image.info["tiles"]))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=meta)
    return buffer.getvalue()
