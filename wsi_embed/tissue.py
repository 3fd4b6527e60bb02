"""Tissue detection on a low-resolution thumbnail: classical, weight-free, seconds per slide.

Sizes are physical (µm, µm²) so the same parameters work whatever the thumbnail resolution.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from .slides import SlideError

#: A thumbnail whose median brightness is below this is a dark-background (fluorescence) slide.
DARK_BACKGROUND_V = 60
#: Warn when detected tissue covers nearly the whole slide: usually a detection failure.
WHOLE_SLIDE_WARNING = 0.95
#: share of the tissue-coloured area classed as pen ink above which a slide is flagged: ink
#: rarely covers most of a section, but brown DAB or blue stains can look like it
PEN_WARNING = 0.5


@dataclass(frozen=True)
class TissueParams:
    close_um: float = 48.0  # morphological closing diameter
    blur_um: float = 24.0  # median blur diameter
    min_area_um2: float = 20_000.0  # drop tissue specks smaller than this
    max_hole_um2: float = 20_000.0  # fill holes smaller than this
    pen_filter: bool = True
    min_pen_area_um2: float = 20_000.0  # ink strokes are large; nuclei clusters are not
    nuclei_window_um: float = 96.0  # dark mode: window over which nuclei density is taken


@dataclass
class TissueMask:
    """Boolean tissue (and pen-ink) masks on a grid of `downsample` level-0 px per pixel."""

    tissue: np.ndarray
    pen: np.ndarray
    downsample: float
    mode: str
    warning: str = ""

    def area_mm2(self, level0_mpp: float) -> float:
        px_um = self.downsample * level0_mpp
        return float(self.tissue.sum()) * px_um * px_um / 1e6


def _odd(n: float) -> int:
    k = max(1, int(round(n)))
    return k if k % 2 else k + 1


def pen_mask(rgb: np.ndarray) -> np.ndarray:
    """Blue, green and black marker ink: hues and darkness that H&E and IHC tissue lack."""
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    blue = (h >= 95) & (h <= 127) & (s >= 90) & (v >= 30)
    green = (h >= 35) & (h < 95) & (s >= 50) & (v >= 30)
    black = rgb.max(axis=2) < 50
    return blue | green | black


def _pen(rgb: np.ndarray, k: int, px_um: float, p: TissueParams) -> np.ndarray:
    """Ink on a blurred thumbnail (so dark nuclei do not count), marker-sized parts only."""
    ink = pen_mask(cv2.medianBlur(rgb, k)).astype(np.uint8)
    n, lab, stats, _ = cv2.connectedComponentsWithStats(ink, connectivity=8)
    keep = np.zeros(n, bool)
    keep[1:] = stats[1:, cv2.CC_STAT_AREA] * px_um * px_um >= p.min_pen_area_um2
    ink = keep[lab].astype(np.uint8)
    return cv2.dilate(ink, np.ones((3, 3), np.uint8)).astype(bool) if ink.any() else keep[lab]


def _threshold(channel: np.ndarray, floor: int) -> int:
    """The lower of Otsu and triangle thresholds: the triangle finds faint tissue at the foot
    of the background peak, Otsu guards against slides that are mostly tissue."""
    otsu, _ = cv2.threshold(channel, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    tri, _ = cv2.threshold(channel, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_TRIANGLE)
    return int(max(min(otsu, tri), floor))


def _clean(mask: np.ndarray, px_um: float, p: TissueParams) -> np.ndarray:
    """Close gaps, fill small holes, drop small components; areas given in µm²."""
    k = _odd(p.close_um / px_um)
    m = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_CLOSE,
                         cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))
    px_area = px_um * px_um
    # holes = background components not touching the border, small enough to fill
    inv = (1 - m).astype(np.uint8)
    n, lab, stats, _ = cv2.connectedComponentsWithStats(inv, connectivity=4)
    h, w = m.shape
    for i in range(1, n):
        x, y, bw, bh, area = stats[i]
        touches = x == 0 or y == 0 or x + bw == w or y + bh == h
        if not touches and area * px_area < p.max_hole_um2:
            m[lab == i] = 1
    n, lab, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=8)
    keep = np.zeros(n, bool)
    keep[1:] = stats[1:, cv2.CC_STAT_AREA] * px_area >= p.min_area_um2
    return keep[lab]


def detect_tissue(rgb: np.ndarray, downsample: float, level0_mpp: float,
                  params: TissueParams | None = None) -> TissueMask:
    """Segment tissue in a thumbnail taken at `downsample` of a slide with `level0_mpp`."""
    p = params or TissueParams()
    px_um = downsample * level0_mpp
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    k = _odd(p.blur_um / px_um)
    warning = ""
    if float(np.median(hsv[..., 2])) < DARK_BACKGROUND_V:
        mode = "darkfield"
        # fluorescent nuclei are bright dots on black, and so is the tissue between them:
        # tissue is where bright dots are dense, not the dots themselves
        bright = rgb.max(axis=2).astype(np.uint8)
        dots = (bright > _threshold(bright, floor=20)).astype(np.float32)
        w = _odd(p.nuclei_window_um / px_um)
        raw = cv2.blur(dots, (w, w)) > 0.05
        pen = np.zeros(raw.shape, bool)
        warning = ("dark background: treated as fluorescence/darkfield, tissue = bright "
                   "regions; check the thumbnail")
    else:
        mode = "brightfield"
        sat = cv2.medianBlur(hsv[..., 1], k)
        val = cv2.medianBlur(hsv[..., 2], k)
        bg_v = float(np.percentile(val, 95))
        raw = (sat > _threshold(sat, floor=8)) | (val < bg_v - 40)
        pen = _pen(rgb, k, px_um, p) if p.pen_filter else np.zeros(raw.shape, bool)
        inked = float((raw & pen).sum()) / max(float(raw.sum()), 1.0)
        if inked > PEN_WARNING:
            warning = (f"the pen-ink filter removed {inked:.0%} of the tissue-coloured area: if "
                       "the slide has no ink (IHC, special stains), check the thumbnail and "
                       "use --no-pen-filter, --tissue none or a --tissue-mask")
        raw &= ~pen
    tissue = _clean(raw, px_um, p) & ~pen
    if tissue.mean() > WHOLE_SLIDE_WARNING:
        warning = (warning + "; " if warning else "") + (
            f"tissue covers {tissue.mean():.0%} of the slide: detection may have failed "
            "(check the thumbnail, or use --tissue none / --tissue-mask)")
    return TissueMask(tissue, pen, downsample, mode, warning)


def mask_from_file(path: Path, shape: tuple[int, int], downsample: float) -> TissueMask:
    """An external tissue mask: a PNG covering the whole slide (non-zero = tissue), or GeoJSON
    polygons in level-0 pixels (e.g. exported from QuPath), rasterised to `shape`."""
    h, w = shape
    suffix = path.suffix.lower()
    if suffix in (".geojson", ".json"):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise SlideError(f"{path}: cannot read GeoJSON tissue mask ({e})") from e
        m = np.zeros((h, w), np.uint8)
        size0 = (w * downsample, h * downsample)
        for k, rings in enumerate(_polygons(data, path)):
            rings = [_checked_ring(r, path, k, size0) for r in rings]
            outer, holes = rings[0], rings[1:]
            cv2.fillPoly(m, [_ring_px(outer, downsample)], 1)
            for hole in holes:
                cv2.fillPoly(m, [_ring_px(hole, downsample)], 0)
        tissue = m.astype(bool)
    else:
        img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        if img is None:
            raise SlideError(f"{path}: cannot read tissue mask image")
        tissue = cv2.resize(img, (w, h), interpolation=cv2.INTER_NEAREST) > 0
    return TissueMask(tissue, np.zeros_like(tissue), downsample, f"mask:{path.name}")


#: how far (as a fraction of the slide's size) a mask polygon may reach past the slide's edge
MASK_MARGIN = 0.1


def _checked_ring(ring, path: Path, k: int, size0: tuple[float, float]) -> np.ndarray:
    """A polygon ring as (n, 2) level-0 px, or SlideError naming the mask file and why: a
    ring must have 3 or more finite vertices enclosing an area, within MASK_MARGIN of the
    slide (coordinates far outside mean another slide's mask, or µm instead of px)."""
    where = f"{path}: polygon {k}"
    try:
        a = np.asarray(ring, np.float64)
    except (TypeError, ValueError):
        raise SlideError(f"{where}: coordinates are not numbers") from None
    if a.ndim != 2 or a.shape[1] < 2 or len(a) < 3:
        raise SlideError(f"{where}: a ring needs at least 3 [x, y] vertices")
    a = a[:, :2]
    if not np.isfinite(a).all():
        raise SlideError(f"{where}: a vertex is not finite (NaN or infinite)")
    w, h = size0
    mx, my = MASK_MARGIN * w, MASK_MARGIN * h
    if (a[:, 0].min() < -mx or a[:, 0].max() > w + mx or a[:, 1].min() < -my
            or a[:, 1].max() > h + my):
        raise SlideError(f"{where}: vertices span x {a[:, 0].min():.4g}..{a[:, 0].max():.4g}, "
                         f"y {a[:, 1].min():.4g}..{a[:, 1].max():.4g}, outside the slide "
                         f"({w:.0f} x {h:.0f} level-0 px); is it another slide's mask, or in "
                         "µm instead of level-0 pixels?")
    x, y = a[:, 0], a[:, 1]
    if abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))) < 1e-9:
        raise SlideError(f"{where}: the ring encloses no area")
    return a


def _ring_px(ring: np.ndarray, downsample: float) -> np.ndarray:
    return np.round(ring / downsample).astype(np.int32)


def _polygons(data: dict, path: Path) -> list[list]:
    """Polygon ring lists from a GeoJSON FeatureCollection / Feature / geometry."""
    if isinstance(data, list):
        feats = data
    elif data.get("type") == "FeatureCollection":
        feats = data.get("features", [])
    else:
        feats = [data]
    out = []
    for f in feats:
        g = f.get("geometry", f) if isinstance(f, dict) else None
        if not g:
            continue
        if g.get("type") == "Polygon":
            out.append(g["coordinates"])
        elif g.get("type") == "MultiPolygon":
            out.extend(g["coordinates"])
    if not out:
        raise SlideError(f"{path}: GeoJSON tissue mask holds no Polygon or MultiPolygon")
    return out


def full_mask(shape: tuple[int, int], downsample: float) -> TissueMask:
    """`--tissue none`: every patch counts as tissue."""
    t = np.ones(shape, bool)
    return TissueMask(t, np.zeros_like(t), downsample, "none")


def thumbnail_downsample(width: int, height: int, level0_mpp: float,
                         thumb_mpp: float = 8.0, min_side: int = 1024) -> float:
    """Level-0 px per thumbnail px: about `thumb_mpp`, finer for small slides so the overlay
    stays legible, never finer than level 0."""
    d = thumb_mpp / level0_mpp
    d = min(d, max(width, height) / min_side)
    return max(1.0, d) if math.isfinite(d) else 1.0
