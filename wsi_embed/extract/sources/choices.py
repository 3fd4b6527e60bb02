"""The user's choices of how to read (torch-free: the CLI lists them without importing torch)."""

from __future__ import annotations

from enum import StrEnum


class Reader(StrEnum):
    """`--reader`: how patches are read from the slide file."""

    AUTO = "auto"  # raw TIFF tiles where the level is a plain tiled TIFF page, else OpenSlide
    FAST = "fast"  # raw TIFF tiles, or an error
    OPENSLIDE = "openslide"


class Decode(StrEnum):
    """`--decode`: where the fast reader's JPEG tiles are decoded."""

    AUTO = "auto"  # the CPU reader processes (faster on the machines measured)
    CPU = "cpu"
    GPU = "gpu"  # batched nvJPEG on the device (libjpeg-turbo on a CPU device, for tests)
