"""The device side of `extract`: batches onto the device, and the encoder on them.

Why a side stream: on the H100 a ViT-B/16 batch of 512 takes ≈ 50 ms, and copying its
100 MB of patches to the device plus resizing and normalising them takes several ms more.
Done on the encoder's stream, or by the main thread copying slots into a pinned buffer, that
time was lost for every batch. Here the readers' shared-memory slots are page-locked once,
each batch is copied from them straight into device memory on a feed stream that also
preprocesses it, and the encoder's stream only waits for the finished input. A slot goes back
to the readers once the copy out of it has completed.
"""

from __future__ import annotations

import logging
from collections import deque
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from ..encoders import Encoder, EncoderConfig
from .sources import DeviceChunk, HostChunk, ReaderPool

log = logging.getLogger(__name__)


def pin_host(t: torch.Tensor) -> bool:
    """Page-lock `t`'s memory in place (shared memory included), so copies out of it to the
    device run asynchronously. False where CUDA refuses: copies then still work, staged by
    the driver."""
    try:  # 1: cudaHostRegisterPortable
        err = int(torch.cuda.cudart().cudaHostRegister(t.data_ptr(),
                                                       t.numel() * t.element_size(), 1))
    except (AttributeError, RuntimeError) as e:
        err = f"{type(e).__name__}: {e}"
    if err != 0:
        log.warning("could not page-lock the patch slots (%s): host-to-device copies will "
                    "be staged by the driver, and slower", err)
        return False
    return True


def unpin_host(t: torch.Tensor) -> None:
    torch.cuda.cudart().cudaHostUnregister(t.data_ptr())


class DeviceRunner:
    """Resize + normalise on the device, run the encoder, halve the batch on CUDA OOM."""

    def __init__(self, model: Encoder, cfg: EncoderConfig, device: torch.device,
                 precision: torch.dtype, batch_size: int, compile: bool):
        self.cfg, self.device, self.dtype = cfg, device, precision
        self.model = model.to(device=device, dtype=precision).eval()
        if compile:
            self.model = torch.compile(self.model)
        self.pad_to = batch_size if compile else 0
        self.micro = batch_size
        mean, std = (torch.tensor(v, device=device).view(1, 3, 1, 1) for v in cfg.mean_std)
        # (x / 255 - mean) / std as one multiply-add on 0..255 values
        self.scale, self.shift = 1.0 / (255.0 * std), -mean / std

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (B, P, P, 3) → normalised (B, 3, S, S) in the model's dtype."""
        x = x.permute(0, 3, 1, 2).float()
        r, s = self.cfg.resize, self.cfg.input_size
        if x.shape[-1] != r:
            x = F.interpolate(x, size=(r, r), mode=self.cfg.interpolation, antialias=True,
                              align_corners=False).clamp_(0, 255)
        if r != s:
            o = (r - s) // 2
            x = x[..., o : o + s, o : o + s]
        return torch.addcmul(self.shift, x, self.scale).to(self.dtype).contiguous(
            memory_format=torch.channels_last)

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Features of a preprocessed batch (on the device)."""
        outs, i, n = [], 0, len(x)
        while i < n:
            part = x[i : i + self.micro]
            try:
                outs.append(self._forward(part))
                i += len(part)
            except torch.cuda.OutOfMemoryError:
                if self.micro == 1:
                    raise
                torch.cuda.empty_cache()
                self.micro = max(1, self.micro // 2)
                self.pad_to = min(self.pad_to, self.micro) if self.pad_to else 0
                log.warning("CUDA out of memory: batch size lowered to %d", self.micro)
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def _forward(self, part: torch.Tensor) -> torch.Tensor:
        n = len(part)
        if self.pad_to and n < self.pad_to:  # a fixed shape spares torch.compile recompiles
            part = torch.cat([part, part.new_zeros((self.pad_to - n, *part.shape[1:]))])
        return self.model(part)[:n]


class _Copied:
    """The copy event on CPU, where a copy is done when `copy_` returns."""

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass


_COPIED = _Copied()


class BatchFeeder:
    """Packs finished read chunks into one preprocessed batch on the device.

    `pool` holds the shared-memory `slots` and takes back what a chunk held (`release`).
    Chunks are (owner, row0, n, chunk) with `chunk` a `HostChunk` (patches in a slot) or a
    `DeviceChunk` (decoded on the device). On CUDA the copies and the preprocessing run on
    the feed stream and a slot is released once the copy out of it has passed (on CPU: at
    once)."""

    def __init__(self, pool: ReaderPool, runner: DeviceRunner, batch: int, max_held: int = 2):
        self.pool, self.runner, self.max_held = pool, runner, max_held
        self.device = runner.device
        self.cuda = self.device.type == "cuda"
        _, p, _, c = pool.slots.shape[1:]
        self.buf = torch.empty((batch, p, p, c), dtype=torch.uint8, device=self.device)
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.pinned = self.cuda and pin_host(pool.slots)
        self.held: deque[tuple[torch.cuda.Event | _Copied, list[HostChunk]]] = deque()

    @torch.inference_mode()
    def __call__(self, chunks: list[tuple[object, int, int, HostChunk | DeviceChunk]]
                 ) -> tuple[torch.Tensor, list[tuple]]:
        """(preprocessed batch on the device, each chunk's (owner, row0, n, offset))."""
        self.reap()
        segments, held, off = [], [], 0
        with torch.cuda.stream(self.stream) if self.cuda else nullcontext():
            for owner, row0, n, chunk in chunks:
                chunk.copy_to(self.buf[off : off + n], self.pool.slots)
                if chunk.held_until_copied:
                    held.append(chunk)
                else:
                    self.pool.release(chunk)
                segments.append((owner, row0, n, off))
                off += n
            copied = _COPIED
            if self.cuda:
                copied = torch.cuda.Event()
                copied.record(self.stream)
            self.held.append((copied, held))
            x = self.runner.preprocess(self.buf[:off])
        if self.cuda:
            main = torch.cuda.current_stream(self.device)
            main.wait_stream(self.stream)
            x.record_stream(main)
        self.reap()
        return x, segments

    def held_slots(self) -> int:
        return sum(len(chunks) for _, chunks in self.held)

    def reap(self) -> None:
        """Give back the slots whose copies are done; wait for the oldest when more than
        `max_held` batches' slots are held, so the readers always have slots to fill."""
        while self.held and (len(self.held) > self.max_held or self.held[0][0].query()):
            event, chunks = self.held.popleft()
            event.synchronize()
            for c in chunks:
                self.pool.release(c)

    def close(self) -> None:
        """Wait for the copies in flight: the slots' memory must outlive them."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
        self.held.clear()
        if self.pinned:
            unpin_host(self.pool.slots)
            self.pinned = False
