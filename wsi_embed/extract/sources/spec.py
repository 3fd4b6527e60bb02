"""What the rest of `extract` knows about reading patches: the choices a user makes, the
frozen per-slide `SourceSpec` that `choose_source` picks, read tasks, and the typed chunks
that come back (patches in a host slot, or already on the device)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import NamedTuple

import numpy as np
import torch

from .choices import Decode, Reader

__all__ = ["Decode", "DeviceChunk", "HostChunk", "ReadResult", "ReadTask", "Reader",
           "SourceKind", "SourceSpec"]


class SourceKind(StrEnum):
    """A way of reading patches; each host kind is one class in `HOST_SOURCES`."""

    OPENSLIDE = "openslide"
    TIFF_TILES = "tiff-tiles"
    PLAIN_IMAGE = "plain-image"
    DEVICE_JPEG = "device-jpeg"  # decoded on the device by the pool's decode thread


#: the name a kind has in the report's `reader` column (the `--reader` it answers to)
REPORT_NAMES = {SourceKind.OPENSLIDE: "openslide", SourceKind.TIFF_TILES: "fast",
                SourceKind.PLAIN_IMAGE: "plain-image", SourceKind.DEVICE_JPEG: "fast"}


@dataclass(frozen=True)
class SourceSpec:
    """How one slide's patches are read: picklable, so it travels to reader processes."""

    kind: SourceKind
    path: str
    level: int  # pyramid level read from
    read_size: int  # pixels read at `level` per patch side, then resized to patch_size
    patch_size: int
    downsample: float = 1.0  # of `level`: level-0 coords → level pixels for raw tiles
    page: int = -1  # the level's TIFF page, for the raw-tile kinds
    reason: str = ""  # why this kind, for the report

    @property
    def on_device(self) -> bool:
        return self.kind is SourceKind.DEVICE_JPEG

    def task_size(self, chunk: int, batch: int) -> int:
        """Patches per read task: a whole batch for device decode (one batched nvJPEG call
        and one gather per batch), `chunk` for the reader processes."""
        return max(chunk, batch) if self.on_device else chunk

    def describe(self) -> str:
        return f"{REPORT_NAMES[self.kind]} ({self.reason})"


@dataclass(frozen=True)
class ReadTask:
    """`coords` (level-0 top-lefts) of one slide, rows `row0`.. of its coords file."""

    task_id: int
    spec: SourceSpec
    coords: np.ndarray
    row0: int


@dataclass(frozen=True)
class HostChunk:
    """Patches read into shared-memory slot `slot`; the slot is freed once copied out."""

    slot: int
    held_until_copied = True

    def copy_to(self, dst: torch.Tensor, slots: torch.Tensor) -> None:
        dst.copy_(slots[self.slot, : len(dst)], non_blocking=True)


@dataclass(frozen=True)
class DeviceChunk:
    """Patches decoded on the device, ready once `event` (on the decode stream) has passed."""

    patches: torch.Tensor
    event: torch.cuda.Event | None
    held_until_copied = False

    def copy_to(self, dst: torch.Tensor, slots: torch.Tensor) -> None:
        dst.copy_(on_main_stream(self.patches, self.event))


def on_main_stream(patches: torch.Tensor, event) -> torch.Tensor:
    """Make the consumer's stream wait for the decode stream, and keep the allocator from
    reusing the tensor's memory until the consumer is done with it."""
    if event is not None:
        cur = torch.cuda.current_stream(patches.device)
        cur.wait_event(event)
        patches.record_stream(cur)
    return patches


class ReadResult(NamedTuple):
    task_id: int
    chunk: HostChunk | DeviceChunk | None  # None: failed, see error
    error: str | None = None
