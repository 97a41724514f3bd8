"""Tokens → images → PNG grids."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cascade_sd.io import atomic_write_bytes


def image_grid(images: torch.Tensor | np.ndarray, nrow: int, pad: int = 2, scale: int = 2) -> Image.Image:
    """Tile uint8 images [N, C, H, W] (C = 1 or 3) into a grid of ``nrow`` images per row."""
    arr = images.cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    n, c, h, w = arr.shape
    ncol_rows = (n + nrow - 1) // nrow
    canvas = np.full((c, ncol_rows * (h + pad) + pad, nrow * (w + pad) + pad), 255, dtype=np.uint8)
    for i in range(n):
        r, k = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + k * (w + pad)
        canvas[:, y : y + h, x : x + w] = arr[i]
    img = Image.fromarray(canvas[0] if c == 1 else canvas.transpose(1, 2, 0))
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST) if scale > 1 else img


def save_grid(images: torch.Tensor | np.ndarray, path: str | os.PathLike, nrow: int) -> Path:
    """Write an image grid as PNG atomically."""
    buf = io.BytesIO()
    image_grid(images, nrow).save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())
