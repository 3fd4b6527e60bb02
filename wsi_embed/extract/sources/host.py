"""Ways of reading patches on the host (in reader processes, or inline): one class each,
registered in `HOST_SOURCES` under its `SourceKind`. A class is built from a `SourceSpec` and
gives the region of `read_size` px at the spec's level for a level-0 top-left; resizing to
the patch size is shared (`read_patches`).

Adding a way of reading is one class here, one row in `HOST_SOURCES` and one rule in
`choose_source`.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Protocol

import cv2
import numpy as np

from ...slides import crop_padded, open_slide, read_plain_image
from .spec import ReadTask, SourceKind, SourceSpec
from .tiff_tiles import TiffTileReader


class HostSource(Protocol):
    """Regions of one slide at one level, as OpenSlide's read_region gives them (RGB uint8,
    white outside the slide)."""

    def __init__(self, spec: SourceSpec) -> None: ...

    def region(self, x: int, y: int, out: np.ndarray | None) -> np.ndarray:
        """(read_size, read_size, 3) at top-left (x, y) in level-0 px; written into `out`
        when given."""
        ...

    def close(self) -> None: ...


class OpenSlideSource:
    """Any format OpenSlide reads (NDPI, MIRAX, DICOM, ...): one read_region per patch."""

    def __init__(self, spec: SourceSpec):
        self.spec = spec
        self.slide = open_slide(spec.path)

    def region(self, x: int, y: int, out: np.ndarray | None) -> np.ndarray:
        s = self.spec
        r = self.slide.read_region(x, y, s.level, s.read_size, s.read_size)
        if out is None:
            return r
        out[:] = r
        return out

    def close(self) -> None:
        self.slide.close()


class TiffTileSource:
    """A plain tiled TIFF level: compressed tiles read and decoded once each (`tiff_tiles`)."""

    def __init__(self, spec: SourceSpec):
        self.spec = spec
        self.reader = TiffTileReader(spec.path, spec.page, spec.level)

    def region(self, x: int, y: int, out: np.ndarray | None) -> np.ndarray:
        s = self.spec
        return self.reader.read_level0(x, y, s.downsample, s.read_size, s.read_size, out)

    def close(self) -> None:
        self.reader.close()


class PlainImageSource:
    """A non-pyramidal image (a TIFF in strips, PNG, JPEG): decoded whole once per reader,
    then cropped without copies."""

    def __init__(self, spec: SourceSpec):
        self.spec = spec
        self.pixels = read_plain_image(spec.path, max_pixels=None)[0]  # the plan checked it

    def region(self, x: int, y: int, out: np.ndarray | None) -> np.ndarray:
        n = self.spec.read_size
        return crop_padded(self.pixels, x, y, n, n, out)

    def close(self) -> None:
        self.pixels = None


HOST_SOURCES: dict[SourceKind, type[HostSource]] = {
    SourceKind.OPENSLIDE: OpenSlideSource,
    SourceKind.TIFF_TILES: TiffTileSource,
    SourceKind.PLAIN_IMAGE: PlainImageSource,
}


def read_patches(source: HostSource, spec: SourceSpec, coords: np.ndarray,
                 out: np.ndarray) -> None:
    """Patches at `coords` into `out` (n, P, P, 3): straight into it when read at the patch
    size, else area-resized into it."""
    native = spec.read_size == spec.patch_size
    p = spec.patch_size
    for i, (x, y) in enumerate(coords):
        region = source.region(int(x), int(y), out[i] if native else None)
        if not native:
            cv2.resize(region, (p, p), dst=out[i], interpolation=cv2.INTER_AREA)


class SourceCache:
    """The host sources of a reader, a few slides kept open."""

    def __init__(self, max_open: int = 4):
        self._open: OrderedDict[SourceSpec, HostSource] = OrderedDict()
        self.max_open = max_open

    def source(self, spec: SourceSpec) -> HostSource:
        if spec in self._open:
            self._open.move_to_end(spec)
            return self._open[spec]
        src = self._open[spec] = HOST_SOURCES[spec.kind](spec)
        while len(self._open) > self.max_open:
            self._open.popitem(last=False)[1].close()
        return src

    def read_into(self, task: ReadTask, out: np.ndarray) -> None:
        read_patches(self.source(task.spec), task.spec, task.coords, out)

    def close(self) -> None:
        for s in self._open.values():
            s.close()
        self._open.clear()
