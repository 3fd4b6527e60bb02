"""`choose_source`: the one place a way of reading a slide's patches is picked."""

from __future__ import annotations

import torch

from ...errors import SlideError
from ...slides import Slide
from .device_jpeg import choose_decode
from .spec import Decode, Reader, SourceKind, SourceSpec
from .tiff_tiles import TiffTileReader, level_page, strict_decode_problem


def choose_source(slide: Slide, level: int, read_size: int, patch_size: int,
                  reader: Reader = Reader.AUTO, decode: Decode = Decode.AUTO,
                  device: torch.device | None = None) -> SourceSpec:
    """How to read `slide`'s patches at `level`. Rules, in order:
    1. `--reader openslide`: OpenSlide;
    2. a non-pyramidal image (our own fallback, vendor "plain-image"): decoded whole once;
    3. a plain tiled TIFF page whose tiles decode strictly: raw tiles, decoded on the device
       with `--decode gpu` where nvJPEG reads them right, else by the reader processes;
    4. anything else: OpenSlide under `auto`; an error under `--reader fast`."""
    base = {"path": str(slide.path), "level": level, "read_size": read_size,
            "patch_size": patch_size, "downsample": float(slide.level_downsamples[level])}
    if reader == Reader.OPENSLIDE:
        return SourceSpec(SourceKind.OPENSLIDE, **base, reason="--reader openslide")
    if slide.vendor == "plain-image":
        if reader == Reader.FAST:
            raise SlideError(f"--reader fast cannot read {slide.path.name}: vendor "
                             "'plain-image' is not a tiled TIFF; use --reader auto")
        return SourceSpec(SourceKind.PLAIN_IMAGE, **base, reason="vendor 'plain-image': "
                          "not pyramidal, decoded whole once per reader")
    page = level_page(slide, level)
    if isinstance(page, int):
        with TiffTileReader(slide.path, page, level) as tiles:
            why_not = strict_decode_problem(tiles)
        if why_not is None:
            on_device, why = choose_decode(str(slide.path), page, decode,
                                           device or torch.device("cpu"))
            kind = SourceKind.DEVICE_JPEG if on_device else SourceKind.TIFF_TILES
            return SourceSpec(kind, **base, page=page, reason=f"tiled TIFF page {page}; {why}")
        page = why_not
    if reader == Reader.FAST:
        raise SlideError(f"--reader fast cannot read {slide.path.name}: {page}; use "
                         "--reader auto to fall back to OpenSlide")
    return SourceSpec(SourceKind.OPENSLIDE, **base, reason=page)
