"""The settings of one `extract` run: keyword-only, with every choice an enum that Typer lists
in `--help`."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import numpy as np

from ..batch import SLIDE_TIMEOUT
from ..layout import OutputLayout
from ..slides import MAX_PLAIN_PIXELS
from .sources.choices import Decode, Reader

__all__ = ["Decode", "ExtractConfig", "FeatureDtype", "Precision", "Reader"]


class Precision(StrEnum):
    """`--precision` of the encoder on CUDA (the CPU always runs fp32)."""

    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"

    @property
    def torch_dtype(self):
        import torch

        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self]


class FeatureDtype(StrEnum):
    """`--dtype` the features are stored in."""

    FLOAT32 = "float32"
    FLOAT16 = "float16"

    @property
    def numpy_dtype(self) -> np.dtype:
        return np.dtype(self.value)


@dataclass(frozen=True, kw_only=True)
class ExtractConfig:
    out: Path
    encoder: str
    weights: str | None = None
    device: str = "auto"
    batch_size: int | None = None
    num_workers: int = 4
    precision: Precision | None = None  # None: the preset's on CUDA, fp32 on CPU
    dtype: FeatureDtype = FeatureDtype.FLOAT32
    compile: bool = False
    overwrite: bool = False
    chunk: int = 64  # patches per read task
    devices: tuple[str, ...] = ()  # several: one process per device
    reader: Reader = Reader.AUTO
    decode: Decode = Decode.AUTO
    slide_timeout: float = SLIDE_TIMEOUT  # seconds a slide's tiling or one read may take
    max_plain_pixels: int | None = MAX_PLAIN_PIXELS  # non-pyramidal images decoded whole

    @property
    def layout(self) -> OutputLayout:
        return OutputLayout(self.out)
