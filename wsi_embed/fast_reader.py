"""Patches straight from a TIFF pyramid's compressed tiles, without OpenSlide's per-patch cost.

For Aperio SVS and generic tiled TIFF slides, the level OpenSlide reads is a plain tiled TIFF
page: tifffile gives its tile offsets, byte counts and shared JPEG tables. Each needed tile is
read and decoded once (tifffile's decoder: JPEG with the JPEGTables spliced in, in YCbCr or
RGB photometric alike, JPEG 2000, LZW, Deflate, raw) and patches are cut and stitched across
tile borders. Anything else (NDPI, MIRAX, DICOM, ...) stays with OpenSlide.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import tifffile

from .slides import Slide

READERS = ("auto", "fast", "openslide")
#: OpenSlide vendors whose pyramid levels are plain tiled TIFF pages
FAST_VENDORS = {"aperio", "generic-tiff"}
#: TIFF compressions tifffile decodes here: none, LZW, JPEG, Deflate, Aperio JPEG 2000
FAST_COMPRESSIONS = {1, 5, 7, 8, 32946, 33003, 33005, 34712}


@dataclass(frozen=True)
class ReaderChoice:
    kind: str  # "fast" or "openslide"
    reason: str  # why, for the report
    page: int = -1  # the TIFF page of the level, for "fast"


def level_page(slide: Slide, level: int) -> int | str:
    """The TIFF page index holding `level`, or the reason there is none."""
    if slide.vendor not in FAST_VENDORS:
        return f"vendor {slide.vendor!r} is read by OpenSlide"
    w, h = slide.level_dims[level]
    try:
        with tifffile.TiffFile(slide.path) as tf:
            for i, page in enumerate(tf.pages):
                if page.imagewidth == w and page.imagelength == h and page.is_tiled:
                    if page.compression not in FAST_COMPRESSIONS:
                        return f"TIFF compression {int(page.compression)} is not supported"
                    if page.samplesperpixel < 3 or page.bitspersample != 8:
                        return "not 8-bit RGB"
                    if page.planarconfig != 1:
                        return "planar TIFF"
                    return i
    except (tifffile.TiffFileError, OSError) as e:
        return f"tifffile cannot open it ({e})"
    return f"level {level} is not a tiled TIFF page"


def choose_reader(slide: Slide, level: int, mode: str) -> ReaderChoice:
    """The reader for one slide. `fast` insists (an error when it cannot), `auto` falls back."""
    if mode == "openslide":
        return ReaderChoice("openslide", "--reader openslide")
    page = level_page(slide, level)
    if isinstance(page, int):
        return ReaderChoice("fast", f"tiled TIFF page {page}", page)
    if mode == "fast":
        raise ValueError(f"--reader fast cannot read {slide.path.name}: {page}; use "
                         "--reader auto to fall back to OpenSlide")
    return ReaderChoice("openslide", page)


#: a level-0 corner closer than this (in the level's pixels) to a pixel is read unshifted
SUBPIXEL = 1e-3


@dataclass
class TileGrid:
    """Where one TIFF page's tiles lie in the file and how they tile the level; shared by
    the CPU reader here and the device decoder (`gpu_decode`)."""

    offsets: np.ndarray
    counts: np.ndarray  # 0: a tile never written (glass), read as white
    tables: bytes | None  # shared JPEGTables of abbreviated JPEG tiles
    width: int
    height: int
    tw: int
    th: int

    @classmethod
    def read(cls, path: str | Path, page: int) -> TileGrid:
        with tifffile.TiffFile(path) as tf:
            return cls.of(tf.pages[page])

    @classmethod
    def of(cls, page: tifffile.TiffPage) -> TileGrid:
        return cls(np.asarray(page.dataoffsets, np.int64),
                   np.asarray(page.databytecounts, np.int64), page.jpegtables,
                   page.imagewidth, page.imagelength, page.tilewidth, page.tilelength)

    @property
    def ntx(self) -> int:
        return -(-self.width // self.tw)

    @property
    def nty(self) -> int:
        return -(-self.height // self.th)


class TiffTileReader:
    """Reads RGB regions of one level of a tiled TIFF, decoding each tile at most once while
    it stays in a small LRU cache (a grid of patches reuses its tiles)."""

    def __init__(self, path: str | Path, page: int, cache_tiles: int = 96):
        self.path = Path(path)
        self._tf = tifffile.TiffFile(path)
        self.page = self._tf.pages[page]
        self.grid = TileGrid.of(self.page)
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self.cache_tiles = cache_tiles
        self.decoded = 0  # tiles decoded so far (tests check tiles are not decoded twice)

    def tile(self, i: int) -> np.ndarray:
        """Tile `i` (row-major in the grid) as (th, tw, 3), decoded once while cached."""
        g = self.grid
        t = self._cache.get(i)
        if t is not None:
            self._cache.move_to_end(i)
            return t
        if g.counts[i] == 0:  # a tile never written: no scanned data, glass
            t = np.full((g.th, g.tw, 3), 255, np.uint8)
        else:
            decode = self.page.decode  # first access reads from the file: before our seek
            fh = self._tf.filehandle
            fh.seek(int(g.offsets[i]))
            seg = decode(fh.read(int(g.counts[i])), i, jpegtables=g.tables)[0]
            t = np.asarray(seg).reshape(g.th, g.tw, -1)[..., :3]
            self.decoded += 1
        self._cache[i] = t
        while len(self._cache) > self.cache_tiles:
            self._cache.popitem(last=False)
        return t

    def read(self, x: int, y: int, w: int, h: int, out: np.ndarray | None = None
             ) -> np.ndarray:
        """RGB (h, w, 3) with top-left (x, y) in this level's pixels; outside is white.
        Written into `out` when given (a reader's shared-memory slot: no copy)."""
        g = self.grid
        if out is None:
            out = np.empty((h, w, 3), np.uint8)
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + w, g.width), min(y + h, g.height)
        if (x0, y0, x1, y1) != (x, y, x + w, y + h):
            out[:] = 255  # part of it lies outside the level
        for ty in range(y0 // g.th, (y1 - 1) // g.th + 1 if y1 > y0 else 0):
            for tx in range(x0 // g.tw, (x1 - 1) // g.tw + 1 if x1 > x0 else 0):
                t = self.tile(ty * g.ntx + tx)
                ax, ay = max(x0, tx * g.tw), max(y0, ty * g.th)
                bx, by = min(x1, (tx + 1) * g.tw), min(y1, (ty + 1) * g.th)
                out[ay - y:by - y, ax - x:bx - x] = t[ay - ty * g.th:by - ty * g.th,
                                                      ax - tx * g.tw:bx - tx * g.tw]
        return out

    def read_level0(self, x0: int, y0: int, downsample: float, w: int, h: int,
                    out: np.ndarray | None = None) -> np.ndarray:
        """Like OpenSlide's read_region: top-left (x0, y0) in level-0 px. Where that falls
        between this level's pixels (levels whose downsample is not a whole number, such as
        2.0004), the region is shifted by the fraction with bilinear interpolation, as
        OpenSlide does. Written into `out` when given."""
        fx, fy = x0 / downsample, y0 / downsample
        ix, iy = math.floor(fx), math.floor(fy)
        dx, dy = fx - ix, fy - iy
        if dx < SUBPIXEL and dy < SUBPIXEL:
            return self.read(ix, iy, w, h, out)
        big = self.read(ix, iy, w + 1, h + 1)
        m = np.float32([[1, 0, -dx], [0, 1, -dy]])
        return cv2.warpAffine(big, m, (w, h), dst=out, flags=cv2.INTER_LINEAR,
                              borderMode=cv2.BORDER_REPLICATE)

    def close(self) -> None:
        self._tf.close()

    def __enter__(self) -> TiffTileReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
