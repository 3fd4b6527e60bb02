"""Pictures a person checks a run with: tiling overlays, attention heatmaps, top/bottom
patches, and QuPath GeoJSON."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import cv2
import numpy as np

from .h5io import atomic_file
from .layout import OutputLayout

log = logging.getLogger(__name__)

TISSUE_BGR = (0, 200, 0)
PEN_BGR = (0, 0, 255)
#: patch outlines: blue, unless the slide's own colour would hide it (then the farthest)
PATCH_BGR = ((255, 80, 0), (0, 220, 255), (255, 0, 255))  # blue, yellow, magenta
#: how far (sum of BGR differences) blue must be from the tissue's mean colour to be kept
PATCH_CONTRAST = 300


def patch_colour(thumb_rgb: np.ndarray, tissue: np.ndarray) -> tuple[int, int, int]:
    """An outline colour that shows on this slide: blue on H&E, yellow on blue-stained
    fluorescence (DAPI), whose tissue is itself blue."""
    px = thumb_rgb[tissue] if tissue.shape == thumb_rgb.shape[:2] and tissue.any() else thumb_rgb
    mean_bgr = px.reshape(-1, 3).mean(0)[::-1]

    def dist(c) -> float:
        return float(np.abs(np.subtract(c, mean_bgr)).sum())

    return PATCH_BGR[0] if dist(PATCH_BGR[0]) >= PATCH_CONTRAST else max(PATCH_BGR, key=dist)


def write_png(path: Path, rgb: np.ndarray) -> None:
    """Write an RGB image atomically (temporary name, then rename)."""
    with atomic_file(path, ".png") as tmp:
        if not cv2.imwrite(str(tmp), np.ascontiguousarray(rgb[..., ::-1])):
            raise OSError(f"cannot write {path}")


def save_tiling_overlay(path: Path, res) -> None:
    """Thumbnail with the tissue outline (green), pen ink (red) and kept patches (blue, or
    a colour that shows on the slide)."""
    img = np.ascontiguousarray(res.thumbnail[..., ::-1])
    d = res.mask.downsample
    ps = max(1, round(res.geometry.patch_size_level0 / d))
    colour = patch_colour(res.thumbnail, res.mask.tissue)
    for x, y in np.round(res.coords / d).astype(int):
        cv2.rectangle(img, (int(x), int(y)), (int(x) + ps - 1, int(y) + ps - 1), colour, 1)
    for m, colour in ((res.mask.tissue, TISSUE_BGR), (res.mask.pen, PEN_BGR)):
        contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_CCOMP,
                                       cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(img, contours, -1, colour, 2 if max(img.shape) > 1500 else 1)
    write_png(path, img[..., ::-1])


# -- slide-level results: heatmap, top/bottom patches, QuPath GeoJSON ----------------------
HEATMAP_MAX_SIDE = 2048
GRID_PX = 160


def patch_scores(attn, patch_probs, probs, attn_name: str = "attention"
                 ) -> tuple[np.ndarray, str]:
    """The per-patch score to map: attention (or what stands for it, named `attn_name`),
    else (heads without it) the patch-level probability of the predicted class."""
    if attn is not None:
        return attn, attn_name
    return patch_probs[:, int(np.argmax(probs))], "patch probability"


def rank_normalise(x: np.ndarray) -> np.ndarray:
    """Ranks scaled to [0, 1]: attention is heavy-tailed, ranks make every map readable."""
    r = np.empty(len(x))
    r[np.argsort(x, kind="stable")] = np.arange(len(x))
    return r / max(len(x) - 1, 1)


def patch_size_level0(coords: np.ndarray, attrs: dict) -> int:
    """From the coords attrs; for files without them, the smallest grid step."""
    if "patch_size_level0" in attrs:
        return int(attrs["patch_size_level0"])
    steps = [np.diff(np.unique(coords[:, i])) for i in (0, 1)]
    steps = np.concatenate([s[s > 0] for s in steps])
    return int(steps.min()) if len(steps) else 256


def heatmap(thumb: np.ndarray, d: float, coords: np.ndarray, size0: int, score: np.ndarray,
            legend: list[str]) -> np.ndarray:
    """Thumbnail (RGB) with rank-normalised scores blended on each patch, a colour bar and a
    legend strip."""
    h, w = thumb.shape[:2]
    val = np.full((h, w), -1.0, np.float32)
    s = max(1, round(size0 / d))
    for (x, y), v in zip(np.round(coords / d).astype(int), score, strict=True):
        val[max(y, 0):y + s, max(x, 0):x + s] = v
    colour = cv2.applyColorMap((np.clip(val, 0, 1) * 255).astype(np.uint8),
                               cv2.COLORMAP_JET)[..., ::-1]
    img = thumb.copy()
    on = val >= 0
    img[on] = (0.5 * thumb[on] + 0.5 * colour[on]).astype(np.uint8)
    bar_h = max(h, 200)
    bar = np.full((bar_h, 90, 3), 255, np.uint8)
    grad = np.linspace(255, 0, bar_h - 40).astype(np.uint8)[:, None].repeat(24, 1)
    bar[20:bar_h - 20, 10:34] = cv2.applyColorMap(grad, cv2.COLORMAP_JET)[..., ::-1]
    cv2.putText(bar, "high", (38, 30), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1)
    cv2.putText(bar, "low", (38, bar_h - 20), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1)
    canvas = np.full((max(h, bar_h), w + 90, 3), 255, np.uint8)
    canvas[:h, :w], canvas[:bar_h, w:] = img, bar
    strip = np.full((22 * len(legend) + 10, canvas.shape[1], 3), 255, np.uint8)
    for i, line in enumerate(legend):
        cv2.putText(strip, line, (8, 22 * (i + 1)), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (0, 0, 0), 1)
    return np.concatenate([canvas, strip])


def patch_grid(slide, coords: np.ndarray, size0: int, rows: list[tuple[str, np.ndarray]]
               ) -> np.ndarray:
    """One labelled row of patches (read from level 0) per (label, indices)."""
    lines = []
    for label, idx in rows:
        tiles = [cv2.resize(slide.read_region(int(coords[i, 0]), int(coords[i, 1]), 0,
                                              size0, size0), (GRID_PX, GRID_PX),
                            interpolation=cv2.INTER_AREA) for i in idx]
        line = np.full((GRID_PX + 24, max(1, len(rows[0][1])) * (GRID_PX + 4), 3), 255,
                       np.uint8)
        cv2.putText(line, label, (4, 17), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1)
        for j, t in enumerate(tiles):
            line[24:, j * (GRID_PX + 4):j * (GRID_PX + 4) + GRID_PX] = t
        lines.append(line)
    return np.concatenate(lines)


def write_geojson(path: Path, coords: np.ndarray, size0: int, measurements: dict[str, np.ndarray],
                  name: str) -> None:
    """QuPath-importable tiles: one square polygon per patch (level-0 px) with measurements."""
    import json

    keys = list(measurements)
    cols = np.stack([measurements[k] for k in keys], 1).astype(float)
    feats = []
    for i, (x, y) in enumerate(coords.tolist()):
        ring = [[x, y], [x + size0, y], [x + size0, y + size0], [x, y + size0], [x, y]]
        feats.append({"type": "Feature", "id": f"{name}-{i}",
                      "geometry": {"type": "Polygon", "coordinates": [ring]},
                      "properties": {"objectType": "tile", "name": f"{name} patch {i}",
                                     "measurements": dict(zip(keys, cols[i].round(6).tolist(),
                                                              strict=True))}})
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))


def slide_figures(layout: OutputLayout, sid: str, slide_path: Path, coords: np.ndarray,
                  coords_attrs: dict, attn, patch_probs, probs: np.ndarray, classes: list[str],
                  top_k: int, attn_name: str = "attention",
                  headline: list[str] | None = None) -> str | None:
    """Heatmap PNG, top/bottom-k patch grid and GeoJSON for one slide; returns a warning
    instead of raising when the slide cannot be read (the prediction still stands)."""
    from .slides import SlideError, open_slide, read_thumbnail

    score, what = patch_scores(attn, patch_probs, probs, attn_name)
    size0 = patch_size_level0(coords, coords_attrs)
    key = re.sub(r"[^0-9A-Za-z]+", "_", what).strip("_")
    measurements = {key: score, "rank": rank_normalise(score)}
    if patch_probs is not None:
        measurements |= {f"prob_{c}": patch_probs[:, i] for i, c in enumerate(classes)}
    write_geojson(layout.classify_output("geojson", sid), coords, size0, measurements, sid)
    try:
        with open_slide(slide_path) as slide:
            d = max(1.0, max(slide.width, slide.height) / HEATMAP_MAX_SIDE)
            pred = int(np.argmax(probs))
            legend = headline or [
                f"{sid}: predicted {classes[pred]} (p = {probs[pred]:.3f}); colour = {what} rank",
                "  ".join(f"{c}: {p:.3f}" for c, p in zip(classes, probs, strict=True))]
            write_png(layout.classify_output("heatmaps", sid),
                      heatmap(read_thumbnail(slide, d), d, coords, size0,
                              rank_normalise(score), legend))
            order = np.argsort(-score, kind="stable")
            k = min(top_k, len(order))
            write_png(layout.classify_output("patches", sid),
                      patch_grid(slide, coords, size0,
                                 [(f"top {k} by {what}", order[:k]),
                                  (f"bottom {k} by {what}", order[::-1][:k])]))
    except (SlideError, OSError) as e:
        log.warning("%s: no heatmap (%s)", sid, e)
        return f"no heatmap: {e}"
    return None
