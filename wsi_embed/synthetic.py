"""Synthetic pyramidal slides with known content, for tests, benchmarks and set-up checks.

Written with tifffile as JPEG-tiled TIFFs: Aperio-style (OpenSlide vendor `aperio`) or
generic tiled TIFF with resolution tags (vendor `generic-tiff`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

BACKGROUND = (242, 242, 242)
EOSIN = (226, 140, 190)
NUCLEUS = (105, 60, 150)
FAINT = (236, 219, 229)
BLUE_INK = (35, 60, 190)
GREEN_INK = (40, 150, 70)


def write_slide(path: Path, width: int, height: int, mpp: float,
                tile_fn: Callable[[int, int, int, int], np.ndarray], *, tile: int = 256,
                downsamples: tuple[int, ...] = (1, 4, 16), aperio: bool = True,
                quality: int = 90) -> Path:
    """Write a pyramid whose level-0 pixels come from tile_fn(x, y, w, h) -> (h, w, 3) uint8.

    Coarser levels are made by reading level 0 through tile_fn at the needed footprint and
    area-resizing, one tile at a time, so memory stays small whatever the slide size.
    """
    import tifffile

    path.parent.mkdir(parents=True, exist_ok=True)
    with tifffile.TiffWriter(path, bigtiff=width * height > 2**31) as tw:
        for i, d in enumerate(downsamples):
            lw, lh = -(-width // d), -(-height // d)
            kw = {}
            if aperio and i == 0:
                kw["description"] = (f"Aperio Image Library v12.0.15\r\n{width}x{height} "
                                     f"({tile}x{tile}) JPEG/RGB Q={quality}|AppMag = "
                                     f"{round(10 / mpp)}|MPP = {mpp}")
            elif not aperio:
                kw["resolution"] = (1e4 / (mpp * d), 1e4 / (mpp * d))
                kw["resolutionunit"] = "CENTIMETER"
            tw.write(_level_tiles(tile_fn, width, height, lw, lh, d, tile), shape=(lh, lw, 3),
                     dtype=np.uint8, tile=(tile, tile), compression="jpeg",
                     compressionargs={"level": quality},
                     photometric="rgb", subfiletype=0 if i == 0 else 1, metadata=None, **kw)
    return path


def _level_tiles(tile_fn, width, height, lw, lh, d, tile) -> Iterator[np.ndarray]:
    for ty in range(0, lh, tile):
        for tx in range(0, lw, tile):
            w, h = min(tile, lw - tx), min(tile, lh - ty)
            x0, y0 = tx * d, ty * d
            w0, h0 = min(w * d, width - x0), min(h * d, height - y0)
            region = tile_fn(x0, y0, w0, h0)
            if d > 1:
                region = cv2.resize(region, (max(1, w0 // d), max(1, h0 // d)),
                                    interpolation=cv2.INTER_AREA)
            out = np.full((tile, tile, 3), 255, np.uint8)
            out[: region.shape[0], : region.shape[1]] = region[:h, :w]
            yield out


def array_tile_fn(img: np.ndarray) -> Callable[[int, int, int, int], np.ndarray]:
    return lambda x, y, w, h: img[y : y + h, x : x + w]


@dataclass
class Phantom:
    """A tissue phantom: the level-0 image and its ground-truth masks."""

    image: np.ndarray
    tissue: np.ndarray  # bool, tissue not covered by ink
    ink: np.ndarray  # bool
    faint: np.ndarray  # bool, the faint tissue region


def tissue_phantom(width: int = 8000, height: int = 6000, seed: int = 0) -> Phantom:
    """Two H&E-like regions, a faint pale-pink region, blue and green pen strokes crossing
    background and tissue, and a noisy white background with dust specks."""
    rng = np.random.default_rng(seed)
    strong = np.zeros((height, width), np.uint8)
    faint = np.zeros((height, width), np.uint8)
    s = width / 8000
    cv2.ellipse(strong, (int(2000 * s), int(2000 * s)), (int(1400 * s), int(1150 * s)), 20, 0,
                360, 1, -1)
    cv2.ellipse(strong, (int(5900 * s), int(2100 * s)), (int(1500 * s), int(950 * s)), -10, 0,
                360, 1, -1)
    cv2.ellipse(faint, (int(4000 * s), int(4700 * s)), (int(1900 * s), int(800 * s)), 0, 0,
                360, 1, -1)
    faint &= 1 - strong
    palette = np.array([BACKGROUND, EOSIN, FAINT], np.uint8)
    img = palette[strong + 2 * faint]
    eroded = cv2.erode(strong, np.ones((17, 17), np.uint8))  # nuclei stay inside the tissue
    ys, xs = np.nonzero(eroded[::16, ::16])
    pick = rng.choice(len(xs), size=min(len(xs), 30000), replace=False)
    for x, y in zip(xs[pick] * 16, ys[pick] * 16, strict=True):
        cv2.circle(img, (int(x), int(y)), int(rng.integers(4, 8)), NUCLEUS, -1)
    for _ in range(40):  # dust specks on the glass: tiny, must not count as tissue
        cv2.circle(img, (int(rng.integers(width)), int(rng.integers(height))),
                   int(rng.integers(3, 10)), (120, 110, 115), -1)
    ink = np.zeros((height, width), np.uint8)
    for (p0, p1), colour in (
        (((int(300 * s), int(3900 * s)), (int(3600 * s), int(300 * s))), BLUE_INK),
        (((int(5200 * s), int(5800 * s)), (int(7700 * s), int(800 * s))), GREEN_INK),
    ):
        cv2.line(img, p0, p1, colour, int(260 * s))
        cv2.line(ink, p0, p1, 1, int(260 * s))
    noise = rng.integers(0, 13, img.shape, dtype=np.uint8)
    img = cv2.subtract(cv2.add(img, noise), np.full_like(img, 6))
    tissue = ((strong | faint) == 1) & (ink == 0)
    return Phantom(img, tissue, ink.astype(bool), faint.astype(bool) & (ink == 0))


def blob_slide(path: Path, width: int, height: int, mpp: float = 0.25) -> Path:
    """Blobs of tissue drawn on a coarse label map, upsampled per tile with texture."""
    scale = 64
    lw, lh = -(-width // scale), -(-height // scale)
    labels = np.zeros((lh, lw), np.uint8)
    rng = np.random.default_rng(0)
    for _ in range(6):
        c = (int(rng.integers(lw // 8, 7 * lw // 8)), int(rng.integers(lh // 8, 7 * lh // 8)))
        axes = (int(rng.integers(lw // 12, lw // 5)), int(rng.integers(lh // 12, lh // 5)))
        cv2.ellipse(labels, c, axes, float(rng.integers(180)), 0, 360, 1, -1)
    bg = np.full((256 * 4, 256 * 4, 3), BACKGROUND, np.uint8)
    bg = cv2.subtract(cv2.add(bg, rng.integers(0, 9, bg.shape, dtype=np.uint8)), 4)
    tissue = np.full_like(bg, EOSIN)
    for _ in range(3000):
        cv2.circle(tissue, (int(rng.integers(1024)), int(rng.integers(1024))), 5, NUCLEUS, -1)

    def tile_fn(x: int, y: int, w: int, h: int) -> np.ndarray:
        lab = labels[y // scale : -(-(y + h) // scale), x // scale : -(-(x + w) // scale)]
        if not lab.any():
            return bg[:h, :w] if h <= 1024 and w <= 1024 else np.full((h, w, 3), 242, np.uint8)
        m = cv2.resize(lab, (lab.shape[1] * scale, lab.shape[0] * scale),
                       interpolation=cv2.INTER_NEAREST)
        m = m[y % scale : y % scale + h, x % scale : x % scale + w, None].astype(bool)
        reps = (-(-h // 1024), -(-w // 1024), 1)
        return np.where(m, np.tile(tissue, reps)[:h, :w], np.tile(bg, reps)[:h, :w])

    return write_slide(path, width, height, mpp, tile_fn, downsamples=(1, 4, 16, 64),
                       quality=80)


@dataclass
class WitnessBags:
    """Synthetic MIL data: which slides have which label and which patches are witnesses."""

    labels_csv: Path
    labels: dict[str, str]
    witnesses: dict[str, np.ndarray]  # boolean per patch


def write_witness_bags(folder: Path, n_slides: int, n_classes: int = 2, dim: int = 768,
                       patches: tuple[int, int] = (300, 600), witness_frac=(0.02, 0.05),
                       shift: float = 8.0, seed: int = 0, dtype=np.float16,
                       encoder: str = "synthetic", weights: str = "random") -> WitnessBags:
    """Features files of Gaussian patches; class c > 0 bags hold 2–5 % "witness" patches
    shifted by `shift` along a class-specific random direction. Slides come in patients of
    one or two slides. Writes `folder/<slide_id>.h5` and `folder/labels.csv`."""
    from .h5io import write_features_file

    rng = np.random.default_rng(seed)
    dirs = rng.standard_normal((n_classes, dim))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    folder.mkdir(parents=True, exist_ok=True)
    labels, witnesses, rows = {}, {}, []
    for i in range(n_slides):
        sid, c = f"slide_{i:04d}", i % n_classes
        n = int(rng.integers(*patches))
        x = rng.standard_normal((n, dim)).astype(np.float32)
        w = np.zeros(n, bool)
        if c > 0:
            k = max(1, round(n * rng.uniform(*witness_frac)))
            w[rng.choice(n, k, replace=False)] = True
            x[w] += shift * dirs[c]
        side = int(np.ceil(np.sqrt(n)))
        coords = np.stack([np.arange(n) % side, np.arange(n) // side], 1) * 512
        write_features_file(folder / f"{sid}.h5", x.astype(dtype), coords,
                            {"patch_size": 256, "patch_size_level0": 512},
                            {"encoder": encoder, "weights": weights, "embed_dim": dim})
        labels[sid], witnesses[sid] = str(c), w
        rows.append(f"{sid},{c},patient_{i // (2 * n_classes):04d}_{c}")  # two slides each
    csv_path = folder / "labels.csv"
    csv_path.write_text("slide_id,label,patient_id\n" + "\n".join(rows) + "\n")
    return WitnessBags(csv_path, labels, witnesses)


@dataclass
class OutcomeBags:
    """Synthetic bags whose witness fraction sets a survival hazard and a continuous score."""

    labels_csv: Path
    fraction: dict[str, float]  # witness fraction per slide: the planted signal
    rows: list[dict[str, str]]
    witnesses: dict[str, np.ndarray]  # per patch: a witness of the risk/score direction


def write_outcome_bags(folder: Path, n_slides: int, dim: int = 32,
                       patches: tuple[int, int] = (30, 60), shift: float = 6.0, seed: int = 0,
                       log_hazard_per_fraction: float = 30.0, censoring: float = 0.3,
                       second_fraction: float = 0.1) -> OutcomeBags:
    """Features files of Gaussian patches where a fraction f ~ U(0, 0.4) of each slide's
    patches are witnesses along one direction, and, in every other slide, `second_fraction` along a
    second one. The labels CSV holds per slide: `time`/`event` (exponential times with
    log-hazard `log_hazard_per_fraction` × f; a `censoring` share of them censored at a
    uniform fraction of their time), `score`
    (10 f + noise: regression), `high` (f > 0.2) and `second` (the second direction present):
    two independent classification targets. Patients hold one slide each."""
    from .h5io import write_features_file

    rng = np.random.default_rng(seed)
    dirs = np.linalg.qr(rng.standard_normal((dim, 2)))[0].T
    folder.mkdir(parents=True, exist_ok=True)
    fraction, rows, witnesses = {}, [], {}
    for i in range(n_slides):
        sid = f"case_{i:04d}"
        n = int(rng.integers(*patches))
        f = float(rng.uniform(0.0, 0.4))
        x = rng.standard_normal((n, dim)).astype(np.float32)
        w = np.zeros(n, bool)
        w[rng.choice(n, round(f * n), replace=False)] = True
        x[w] += shift * dirs[0]
        witnesses[sid] = w
        second = i % 2
        if second:
            k = max(1, int(second_fraction * n + 1e-9))
            x[rng.choice(n, k, replace=False)] += shift * dirs[1]
        coords = np.stack([np.arange(n) % 8, np.arange(n) // 8], 1) * 512
        write_features_file(folder / f"{sid}.h5", x.astype(np.float16), coords,
                            {"patch_size": 256, "patch_size_level0": 512},
                            {"encoder": "synthetic", "weights": "random", "embed_dim": dim})
        t = rng.exponential(1.0 / np.exp(log_hazard_per_fraction * f))
        c = t * rng.uniform() if rng.uniform() < censoring else np.inf  # lost to follow-up
        fraction[sid] = f
        rows.append({"slide_id": sid, "patient_id": f"p{i:04d}",
                     "time": f"{min(t, c):.5f}", "event": str(int(t <= c)),
                     "score": f"{10 * f + rng.normal(0, 0.2):.4f}",
                     "high": str(int(f > 0.2)), "second": str(second)})
    path = folder / "labels.csv"
    with open(path, "w") as fh:
        fh.write(",".join(rows[0]) + "\n")
        fh.writelines(",".join(r.values()) + "\n" for r in rows)
    return OutcomeBags(path, fraction, rows, witnesses)
