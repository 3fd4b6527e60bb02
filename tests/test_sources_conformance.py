"""Every way of reading patches gives OpenSlide's patches (in the style of tiffslide's
compatibility tests): each source × each real slide and synthetic pyramid it accepts × levels
and read sizes, against OpenSlide's `read_region` (+ area resize): mean absolute difference
≤ 1 grey level per patch, and the channel-mean encoder's features equal per patch (to that
grey level). Patches cross tile borders and overhang the slide's edges; synthetic level 1 has
a fractional downsample, so patches fall between its pixels."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from wsi_embed.extract.device import DeviceRunner
from wsi_embed.extract.sources import HOST_SOURCES, SourceKind, SourceSpec, read_patches
from wsi_embed.extract.sources.device_jpeg import JpegTileDecoder, gpu_unsupported
from wsi_embed.extract.sources.tiff_tiles import TiffTileReader, level_page
from wsi_embed.slides import open_slide

from .conftest import CMU, DICOM, KIDNEY, MEANS_PRESET, NDPI, TCGA, small_slide

REAL = {"cmu": (CMU, (0,)), "tcga": (TCGA, (0, 1)), "ndpi": (NDPI, (0, 1)),
        "kidney": (KIDNEY, (0,)), "dicom": (DICOM, (0,))}
#: synthetic pyramids: (tile px, Aperio or generic TIFF); 2101 x 1501 px, levels 1 and 4
SYNTHETIC = {f"{'aperio' if a else 'generic'}-{t}": (t, a) for t in (240, 256)
             for a in (True, False)}
SIZES = [(256, 256), (256, 128), (300, 224)]  # pixels read at the level → patch size
#: the device decoder runs on the GPU where there is one (nvJPEG upsamples chroma otherwise
#: than libjpeg-turbo: the bound is then the per-slide canary's), else the same code on CPU
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DEVICE_TOL = 5.0 if DEVICE.type == "cuda" else 1.0


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> dict[str, tuple[Path, tuple[int, ...]]]:
    folder = tmp_path_factory.mktemp("conformance")
    out = dict(REAL)
    for name, (tile, aperio) in SYNTHETIC.items():
        path = small_slide(folder / f"{name}.{'svs' if aperio else 'tif'}", 2101, 1501, 0.25,
                           aperio, seed=1, tile=tile, blur=1.5)
        out[name] = (path, (0, 1))
    return out


def accepts(kind: SourceKind, path: Path, level: int) -> int | None:
    """The TIFF page the source reads (-1 where none is needed), or None: not for it."""
    with open_slide(path) as s:
        page = level_page(s, level)
        plain = s.vendor == "plain-image"
    if kind is SourceKind.OPENSLIDE:
        return -1
    if kind is SourceKind.PLAIN_IMAGE:
        return -1 if plain else None
    if not isinstance(page, int):
        return None
    if kind is SourceKind.DEVICE_JPEG:
        with TiffTileReader(path, page) as r:
            return None if gpu_unsupported(r) else page
    return page


def coords_for(path: Path, level: int, read: int, n: int = 10, seed: int = 0) -> np.ndarray:
    """Random level-0 top-lefts, some overhanging the right and bottom edges, and the
    corners (the first patch, and one hanging over both far edges)."""
    rng = np.random.default_rng(seed)
    with open_slide(path) as s:
        span = int(read * s.level_downsamples[level])
        pts = np.stack([rng.integers(0, s.width - span // 2, n),
                        rng.integers(0, s.height - span // 2, n)], 1)
        corners = [(0, 0), (s.width - span // 3, s.height - span // 3)]
    return np.concatenate([pts, np.array(corners)]).astype(np.int64)


def openslide_patches(path: Path, level: int, coords: np.ndarray, read: int,
                      patch: int) -> np.ndarray:
    with open_slide(path) as s:
        out = []
        for x, y in coords:
            r = s.read_region(int(x), int(y), level, read, read)
            out.append(r if read == patch else
                       cv2.resize(r, (patch, patch), interpolation=cv2.INTER_AREA))
    return np.stack(out)


def source_patches(kind: SourceKind, path: Path, level: int, page: int, coords: np.ndarray,
                   read: int, patch: int) -> np.ndarray:
    with open_slide(path) as s:
        spec = SourceSpec(kind, str(path), level, read, patch,
                          float(s.level_downsamples[level]), page)
    if kind is SourceKind.DEVICE_JPEG:  # the device decoder, here on the CPU
        dec = JpegTileDecoder(DEVICE)
        try:
            return dec.read(spec.path, page, coords, spec.downsample, read, patch,
                            level).cpu().numpy()
        finally:
            dec.close()
    src = HOST_SOURCES[kind](spec)
    try:
        out = np.empty((len(coords), patch, patch, 3), np.uint8)
        read_patches(src, spec, coords, out)
        return out
    finally:
        src.close()


def channel_means(patches: np.ndarray) -> np.ndarray:
    runner = DeviceRunner(MEANS_PRESET.arch(), MEANS_PRESET, torch.device("cpu"),
                          torch.float32, 64, False)
    with torch.inference_mode():
        return runner(runner.preprocess(torch.from_numpy(patches))).numpy()


K = SourceKind
#: which sources read which slide: YCbCr JPEG tiles (the synthetic pyramids) every one;
#: RGB JPEG (CMU) and JPEG 2000 (TCGA) no device decoder; formats other than plain tiled TIFF
#: only OpenSlide, and a TIFF in strips also the plain-image reader
READS = {"cmu": {K.OPENSLIDE, K.TIFF_TILES}, "tcga": {K.OPENSLIDE, K.TIFF_TILES},
         "ndpi": {K.OPENSLIDE}, "kidney": {K.OPENSLIDE, K.PLAIN_IMAGE}, "dicom": {K.OPENSLIDE},
         **{name: {K.OPENSLIDE, K.TIFF_TILES, K.DEVICE_JPEG} for name in SYNTHETIC}}
LEVELS = {**{name: levels for name, (_, levels) in REAL.items()},
          **dict.fromkeys(SYNTHETIC, (0, 1))}
CASES = [(k, name, level, read, patch)
         for name, kinds in READS.items() for k in sorted(kinds)
         for level in LEVELS[name] for read, patch in SIZES]


@pytest.mark.parametrize("kind,name,level,read,patch", CASES,
                         ids=[f"{k}-{n}-L{lv}-{r}to{p}" for k, n, lv, r, p in CASES])
def test_source_gives_openslide_patches(slides, kind, name, level, read, patch):
    path, _ = slides[name]
    page = accepts(kind, path, level)
    assert page is not None, f"{kind} no longer reads {name} level {level}"
    coords = coords_for(path, level, read)
    want = openslide_patches(path, level, coords, read, patch)
    got = source_patches(kind, path, level, page, coords, read, patch)
    assert got.shape == want.shape
    tol = DEVICE_TOL if kind is SourceKind.DEVICE_JPEG else 1.0
    mad = np.abs(got.astype(np.int16) - want.astype(np.int16)).mean(axis=(1, 2, 3))
    assert mad.max() <= tol, (mad.round(3), coords[mad.argmax()])
    diff = np.abs(channel_means(got) - channel_means(want))
    assert diff.max() <= tol / 255 + 1e-6, diff.max()


def test_no_source_takes_a_slide_it_cannot_read(slides):
    """The other half of READS: each source refuses what it does not read (and the table
    names every source)."""
    assert set().union(*READS.values()) == set(SourceKind)
    for name, kinds in READS.items():
        path, _ = slides[name]
        for kind in set(SourceKind) - kinds:
            for level in LEVELS[name]:
                assert accepts(kind, path, level) is None, (kind, name, level)
