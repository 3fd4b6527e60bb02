"""Patches straight from a TIFF pyramid's compressed tiles, without OpenSlide's per-patch cost.

For Aperio SVS and generic tiled TIFF slides, the level OpenSlide reads is a plain tiled TIFF
page: tifffile gives its tile offsets, byte counts and shared JPEG tables. Each needed tile is
read and decoded once and patches are cut and stitched across tile borders.

Decoding is as strict as OpenSlide's: a damaged tile must fail its slide, never pass as grey
or garbage tissue. tifffile's JPEG decoder (and torchvision's) accept most corrupt streams
silently, so JPEG tiles are decoded by libjpeg-turbo through simplejpeg, which raises on every
libjpeg warning ("Corrupt JPEG data: premature end of data segment", as OpenSlide does).
RGB-photometric JPEG (Aperio's "JPEG/RGB") carries no colour-space marker, so an Adobe APP14
marker saying "no transform" is spliced in: libjpeg then keeps the colours as stored. Other
compressions (JPEG 2000, LZW, Deflate, raw) decode with tifffile; a short read or a tile of
the wrong size fails too. A tile with no bytes was never written (glass): white, as OpenSlide
reads it transparent.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import tifffile

from ...errors import TileDecodeError
from ...slides import Slide

#: OpenSlide vendors whose pyramid levels are plain tiled TIFF pages
FAST_VENDORS = {"aperio", "generic-tiff"}
#: TIFF compressions read here: none, LZW, JPEG, Deflate, Aperio JPEG 2000
FAST_COMPRESSIONS = {1, 5, 7, 8, 32946, 33003, 33005, 34712}
JPEG = 7
RGB_PHOTOMETRIC = 2
YCBCR_PHOTOMETRIC = 6
#: APP14 "Adobe", version 100, no flags, transform 0: the components are RGB, not YCbCr
ADOBE_RGB = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"
#: a level-0 corner closer than this (in the level's pixels) to a pixel is read unshifted
SUBPIXEL = 1e-3


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


@dataclass
class TileGrid:
    """Where one TIFF page's tiles lie in the file and how they tile the level; shared by
    the CPU reader here and the device decoder."""

    offsets: np.ndarray
    counts: np.ndarray  # 0: a tile never written (glass), read as white
    tables: bytes | None  # shared JPEGTables of abbreviated JPEG tiles
    width: int
    height: int
    tw: int
    th: int
    photometric: int = YCBCR_PHOTOMETRIC

    @classmethod
    def read(cls, path: str | Path, page: int) -> TileGrid:
        with tifffile.TiffFile(path) as tf:
            return cls.of(tf.pages[page])

    @classmethod
    def of(cls, page: tifffile.TiffPage) -> TileGrid:
        return cls(np.asarray(page.dataoffsets, np.int64),
                   np.asarray(page.databytecounts, np.int64), page.jpegtables,
                   page.imagewidth, page.imagelength, page.tilewidth, page.tilelength,
                   int(page.photometric))

    @property
    def ntx(self) -> int:
        return -(-self.width // self.tw)

    @property
    def nty(self) -> int:
        return -(-self.height // self.th)

    def jpeg_stream(self, data: bytes, mark_rgb: bool = True) -> bytes:
        """A complete JPEG stream of a tile: the shared tables spliced in (abbreviated
        streams), and for RGB-photometric tiles (`mark_rgb`) the marker that keeps libjpeg
        from converting them as YCbCr."""
        if self.tables:  # tables (without EOI) + tile (without SOI)
            data = self.tables[:-2] + data[2:]
        if mark_rgb and self.photometric == RGB_PHOTOMETRIC:
            data = data[:2] + ADOBE_RGB + data[2:]
        return data


class TileFile:
    """Raw tile bytes of one page, read with pread (no shared file position), each checked
    to be all there."""

    def __init__(self, path: str | Path, grid: TileGrid, level: int):
        self.path, self.grid, self.level = Path(path), grid, level
        self.fd = os.open(path, os.O_RDONLY)
        self.size = os.fstat(self.fd).st_size

    def where(self, i: int) -> str:
        return (f"{self.path}: level {self.level}, tile {i} (byte offset "
                f"{int(self.grid.offsets[i])})")

    def raw(self, i: int) -> bytes:
        off, n = int(self.grid.offsets[i]), int(self.grid.counts[i])
        data = os.pread(self.fd, n, off)
        if len(data) < n:
            raise TileDecodeError(f"{self.where(i)}: {n} bytes declared, the file ends after "
                                  f"{max(0, self.size - off)} (truncated or damaged file)")
        return data

    def close(self) -> None:
        os.close(self.fd)


def decode_tile(file: TileFile, compression: int, tiff_decode, i: int) -> np.ndarray:
    """Tile `i` as (th, tw, 3) uint8, or TileDecodeError when it does not decode cleanly.
    `tiff_decode` is tifffile's decoder of the page, for compressions other than JPEG."""
    import simplejpeg

    g = file.grid
    data = file.raw(i)
    try:
        if compression == JPEG:
            t = simplejpeg.decode_jpeg(g.jpeg_stream(data), colorspace="RGB", strict=True)
        else:
            t = np.asarray(tiff_decode(data, i, jpegtables=g.tables)[0])
            t = t.reshape(g.th, g.tw, -1)[..., :3]
    except Exception as e:  # noqa: BLE001 - every decoder complaint fails the slide
        raise TileDecodeError(f"{file.where(i)}: {' '.join(str(e).split())}") from None
    if t.shape != (g.th, g.tw, 3):
        raise TileDecodeError(f"{file.where(i)}: decodes to {t.shape[1]}x{t.shape[0]} px, "
                              f"the TIFF says {g.tw}x{g.th}")
    return t


class TiffTileReader:
    """Reads RGB regions of one level of a tiled TIFF, decoding each tile at most once while
    it stays in a small LRU cache (a grid of patches reuses its tiles)."""

    def __init__(self, path: str | Path, page: int, level: int | None = None,
                 cache_tiles: int = 96):
        self.path = Path(path)
        with tifffile.TiffFile(path) as tf:
            p = tf.pages[page]
            self.compression = int(p.compression)
            self.tiff_decode = p.decode  # built while the file is open (it reads tags)
            self.grid = TileGrid.of(p)
        self.file = TileFile(path, self.grid, page if level is None else level)
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
            t = decode_tile(self.file, self.compression, self.tiff_decode, i)
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

    def first_written_tile(self) -> int | None:
        written = np.flatnonzero(self.grid.counts)
        return int(written[0]) if len(written) else None

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> TiffTileReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def strict_decode_problem(reader: TiffTileReader) -> str | None:
    """The strict JPEG decoder checked against tifffile's on the page's first written tile:
    None when they agree (to 1 grey level), else why this slide must go to OpenSlide (a
    JPEG whose colour space a marker in the file would override, a tile that fails)."""
    i = reader.first_written_tile()
    if i is None or reader.compression != JPEG:
        return None
    try:
        ours = reader.tile(i)
    except TileDecodeError as e:
        return f"its first tile does not decode ({e})"
    data = reader.file.raw(i)
    ref = np.asarray(reader.tiff_decode(data, i, jpegtables=reader.grid.tables)[0])
    ref = ref.reshape(ours.shape[0], ours.shape[1], -1)[..., :3]
    mad = float(np.abs(ours.astype(np.int16) - ref.astype(np.int16)).mean())
    if mad > 1.0:
        return f"strict JPEG decode differs from tifffile by {mad:.1f} grey levels"
    return None
