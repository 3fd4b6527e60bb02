"""Pictures a person checks a run with: tiling overlays (and, later, heatmaps)."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from .h5io import tmp_path

TISSUE_BGR = (0, 200, 0)
PATCH_BGR = (255, 80, 0)
PEN_BGR = (0, 0, 255)


def write_png(path: Path, rgb: np.ndarray) -> None:
    """Write an RGB image atomically (temporary name, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(path).with_suffix(".png")
    if not cv2.imwrite(str(tmp), np.ascontiguousarray(rgb[..., ::-1])):
        raise OSError(f"cannot write {path}")
    os.replace(tmp, path)


def save_tiling_overlay(path: Path, res) -> None:
    """Thumbnail with the tissue outline (green), pen ink (red) and kept patches (blue)."""
    img = np.ascontiguousarray(res.thumbnail[..., ::-1])
    d = res.mask.downsample
    ps = max(1, round(res.geometry.patch_size_level0 / d))
    for x, y in np.round(res.coords / d).astype(int):
        cv2.rectangle(img, (int(x), int(y)), (int(x) + ps - 1, int(y) + ps - 1), PATCH_BGR, 1)
    for m, colour in ((res.mask.tissue, TISSUE_BGR), (res.mask.pen, PEN_BGR)):
        contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_CCOMP,
                                       cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(img, contours, -1, colour, 2 if max(img.shape) > 1500 else 1)
    write_png(path, img[..., ::-1])
