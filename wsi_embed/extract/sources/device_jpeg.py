"""JPEG tiles decoded in batches on the GPU (nvJPEG, through torchvision), with patches cut,
stitched, shifted and downsampled on the device.

For a YCbCr-JPEG TIFF level (most Aperio and generic tiled TIFF slides) the reader sends the
compressed tile bytes to the device instead of decoded pixels: each chunk of patches needs a
set of tiles, the ones not in the device-side cache are decoded in one batched
`decode_jpeg(..., device="cuda")` call, and every patch is gathered from them by index
arithmetic (tiles stacked with a white tile for glass and edges), shifted by OpenSlide's
sub-pixel offset where the level's downsample is fractional, and area-resized to the patch
size. The same code runs with `device="cpu"` (libjpeg-turbo through torchvision), which is how
the tests check it without a GPU.

nvJPEG always converts YCbCr to RGB, so RGB-photometric JPEG (CMU-1), JPEG 2000 and other
compressions stay with the CPU decoders; each slide is also checked on one tile against
tifffile's decoder before the GPU path is trusted with it.

Opt-in (`--decode gpu`): on the H100 with 16 cores the CPU reader processes decoded twice as
fast and left the GPU to the encoder, so `auto` uses them (docs/BENCHMARKS.md).

A batch that nvJPEG refuses is decoded again tile by tile to name the tile at fault: the
slide fails with its level, tile index and byte offset, as with the CPU decoders.
"""

from __future__ import annotations

import queue
import threading
import warnings
from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from ...errors import TileDecodeError, describe_error
from .spec import Decode, DeviceChunk, ReadResult, ReadTask
from .tiff_tiles import JPEG, SUBPIXEL, YCBCR_PHOTOMETRIC, TiffTileReader, TileFile, TileGrid

#: mean absolute difference (grey levels) from tifffile above which a slide's GPU decode is
#: not trusted. A colour-space mix-up gives ≈ 49 (CMU-1); nvJPEG's chroma upsampling alone
#: differs from libjpeg-turbo's by 0.1 on smooth tissue and 4.5 on pixel-scale colour texture
CANARY_MAD = 8.0


def gpu_unsupported(reader: TiffTileReader) -> str | None:
    """Why the GPU decoder cannot take this page, or None when it can."""
    if reader.compression != JPEG:
        return f"TIFF compression {reader.compression} decodes on CPU"
    if reader.grid.photometric != YCBCR_PHOTOMETRIC:
        return "RGB-photometric JPEG decodes on CPU (nvJPEG would convert its colours)"
    return None


def _decode_jpeg(streams: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """torchvision's batched decode; its codecs still work but warn (≥ 0.29) that they will
    move to torchcodec: that warning is silenced here only."""
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The image decoding and encoding "
                                "capabilities", category=DeprecationWarning)
        if device.type == "cuda":
            with torch.cuda.device(device):
                return decode_jpeg(streams, mode=ImageReadMode.RGB, device=device)
        return decode_jpeg(streams, mode=ImageReadMode.RGB)


class TileSource:
    """Complete JPEG streams of one page's tiles (the shared JPEGTables spliced in), each
    checked to be all there; as stored (nvJPEG ignores colour-space markers, so RGB pages
    never come here: the canary shows what it would make of one)."""

    def __init__(self, path: str, grid: TileGrid, level: int = 0):
        self.grid = grid
        self.file = TileFile(path, grid, level)

    def stream(self, i: int) -> torch.Tensor:
        stream = self.grid.jpeg_stream(self.file.raw(i), mark_rgb=False)
        return torch.frombuffer(bytearray(stream), dtype=torch.uint8)

    def close(self) -> None:
        self.file.close()


@dataclass
class TilePlan:
    """The tiles a chunk of patches needs and where each patch finds its pixels."""

    tiles: np.ndarray  # (T,) tile indices to supply, in this order
    grid: np.ndarray  # (n, Ky, Kx) position in `tiles`, or T for white (outside, unwritten)
    ix: np.ndarray  # (n,) top-left in the level's pixels
    iy: np.ndarray
    dx: np.ndarray  # (n,) sub-pixel offset, [0, 1)
    dy: np.ndarray
    shift: bool  # some patch falls between pixels: gather one more and interpolate
    size: int  # pixels gathered per side: the read size, +1 with a shift


def plan_tiles(pg: TileGrid, coords: np.ndarray, downsample: float, read_size: int) -> TilePlan:
    """Level-0 top-lefts → the tiles of this level each patch spans."""
    fx, fy = coords[:, 0] / downsample, coords[:, 1] / downsample
    ix, iy = np.floor(fx).astype(np.int64), np.floor(fy).astype(np.int64)
    dx, dy = fx - ix, fy - iy
    shift = bool((dx >= SUBPIXEL).any() or (dy >= SUBPIXEL).any())
    size = read_size + int(shift)
    kx, ky = (size - 1) // pg.tw + 2, (size - 1) // pg.th + 2
    tx = ix[:, None] // pg.tw + np.arange(kx)  # (n, kx)
    ty = iy[:, None] // pg.th + np.arange(ky)
    ids = ty[:, :, None] * pg.ntx + tx[:, None, :]  # (n, ky, kx)
    ok = (((tx >= 0) & (tx < pg.ntx))[:, None, :] & ((ty >= 0) & (ty < pg.nty))[:, :, None])
    ok &= pg.counts[np.where(ok, ids, 0)] > 0  # unwritten tiles are glass
    tiles, inv = np.unique(ids[ok], return_inverse=True)
    grid = np.full(ids.shape, len(tiles), np.int64)
    grid[ok] = inv
    return TilePlan(tiles, grid, ix, iy, dx, dy, shift, size)


def assemble(tiles: torch.Tensor, plan: TilePlan, pg: TileGrid, patch_size: int,
             piece_px: int = 1 << 23) -> torch.Tensor:
    """Patches (n, P, P, 3) uint8 from `tiles` (T + 1, th, tw, 3), the last one white."""
    dev = tiles.device
    flat = tiles.reshape(-1, 3)
    out = []
    per = max(1, piece_px // (plan.size * plan.size))  # bounds the index tensors' memory
    r = torch.arange(plan.size, device=dev)
    for s in range(0, len(plan.ix), per):
        sl = slice(s, s + per)
        grid = torch.from_numpy(plan.grid[sl]).to(dev)
        iy = torch.from_numpy(plan.iy[sl]).to(dev)
        ix = torch.from_numpy(plan.ix[sl]).to(dev)
        yy, xx = iy[:, None] + r, ix[:, None] + r  # (m, size) level pixels
        j, i = yy // pg.th - (iy // pg.th)[:, None], xx // pg.tw - (ix // pg.tw)[:, None]
        m = len(grid)
        lid = grid[torch.arange(m, device=dev)[:, None, None], j[:, :, None], i[:, None, :]]
        inside = (((yy >= 0) & (yy < pg.height))[:, :, None]
                  & ((xx >= 0) & (xx < pg.width))[:, None, :])
        lid = torch.where(inside, lid, len(tiles) - 1)
        idx = (lid * pg.th + (yy % pg.th)[:, :, None]) * pg.tw + (xx % pg.tw)[:, None, :]
        region = flat[idx]  # (m, size, size, 3)
        out.append(_finish(region, plan.dx[sl], plan.dy[sl], plan.shift, patch_size))
    return torch.cat(out) if len(out) > 1 else out[0]


def _finish(region: torch.Tensor, dx: np.ndarray, dy: np.ndarray, shift: bool,
            patch_size: int) -> torch.Tensor:
    """Sub-pixel shift (bilinear, as OpenSlide) and area resize to patch_size, in uint8."""
    if not shift and region.shape[1] == patch_size:
        return region
    x = region.permute(0, 3, 1, 2).float()
    if shift:
        fx = torch.from_numpy(dx).to(x).view(-1, 1, 1, 1)
        fy = torch.from_numpy(dy).to(x).view(-1, 1, 1, 1)
        top = x[..., :-1, :-1] * (1 - fx) + x[..., :-1, 1:] * fx
        bottom = x[..., 1:, :-1] * (1 - fx) + x[..., 1:, 1:] * fx
        x = top * (1 - fy) + bottom * fy
    if x.shape[-1] != patch_size:
        w = area_matrix(x.shape[-1], patch_size, x.device)
        half = x.device.type == "cuda"  # fp16: exact for pixels, weights to 2^-11
        if half:
            x, w = x.half(), w.half()
        x = (w @ x @ w.T).float()
    return x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


@lru_cache(maxsize=16)
def area_matrix(src: int, dst: int, device: torch.device) -> torch.Tensor:
    """(dst, src) weights of an area (box) resize, as cv2's INTER_AREA: each output pixel
    averages the input pixels under its footprint, weighted by overlap. Applied as
    W @ X @ W^T it resizes by any factor, whole or not (0.2525 µm/px → 0.5 reads 507 px)."""
    s = src / dst
    edges = torch.arange(dst + 1, dtype=torch.float64) * s
    j = torch.arange(src, dtype=torch.float64)
    lo = torch.maximum(edges[:-1, None], j[None, :])
    hi = torch.minimum(edges[1:, None], j[None, :] + 1)
    return ((hi - lo).clamp_(min=0) / s).float().to(device)


class JpegTileDecoder:
    """Reads patches of YCbCr-JPEG TIFF levels on `device`: batched decode of the tiles a
    chunk needs, an LRU cache of decoded tiles on the device, assembly by indexing."""

    def __init__(self, device: torch.device | str, cache_tiles: int = 2048, max_open: int = 8):
        self.device = torch.device(device)
        self._sources: OrderedDict[tuple[str, int], TileSource] = OrderedDict()
        self._cache: OrderedDict[tuple[str, int, int], torch.Tensor] = OrderedDict()
        self.cache_tiles, self.max_open = cache_tiles, max_open
        self.decoded = 0  # tiles decoded so far
        self._white: dict[tuple[int, int], torch.Tensor] = {}  # glass, per tile shape

    def _source(self, path: str, page: int, level: int) -> TileSource:
        key = (path, page)
        if key in self._sources:
            self._sources.move_to_end(key)
            return self._sources[key]
        src = self._sources[key] = TileSource(path, TileGrid.read(path, page), level)
        while len(self._sources) > self.max_open:
            old_key, old = self._sources.popitem(last=False)
            old.close()
            for k in [k for k in self._cache if k[:2] == old_key]:
                del self._cache[k]
        return src

    def decode(self, streams: list[torch.Tensor]) -> list[torch.Tensor]:
        """Tiles as (th, tw, 3) uint8 on the device, one batched call."""
        if not streams:
            return []
        imgs = _decode_jpeg(streams, self.device)
        self.decoded += len(imgs)
        return [im.permute(1, 2, 0).contiguous() for im in imgs]

    def decode_tiles(self, src: TileSource, tiles: list[int]) -> list[torch.Tensor]:
        """Tiles `tiles` of `src`, one batched call; when the decoder refuses the batch, the
        tiles one by one, to fail with the tile at fault."""
        streams = [src.stream(t) for t in tiles]
        try:
            imgs = self.decode(streams)
        except RuntimeError:
            for t, s in zip(tiles, streams, strict=True):
                try:
                    self.decode([s])
                except RuntimeError as e:
                    raise TileDecodeError(f"{src.file.where(t)}: "
                                          f"{' '.join(str(e).split())[:300]}") from None
            raise
        for t, img in zip(tiles, imgs, strict=True):
            if img.shape != (src.grid.th, src.grid.tw, 3):
                raise TileDecodeError(f"{src.file.where(t)}: decodes to {tuple(img.shape)}, "
                                      f"expected {(src.grid.th, src.grid.tw, 3)}")
        return imgs

    def read(self, path: str, page: int, coords: np.ndarray, downsample: float,
             read_size: int, patch_size: int, level: int = 0) -> torch.Tensor:
        """Patches (n, P, P, 3) uint8 on the device; top-lefts `coords` in level-0 px."""
        src = self._source(path, page, level)
        pg = src.grid
        plan = plan_tiles(pg, np.asarray(coords), downsample, read_size)
        have: dict[int, torch.Tensor] = {}
        missing = []
        for t in plan.tiles.tolist():
            hit = self._cache.get((path, page, t))
            if hit is None:
                missing.append(t)
            else:
                self._cache.move_to_end((path, page, t))
                have[t] = hit
        for t, img in zip(missing, self.decode_tiles(src, missing), strict=True):
            have[t] = img
            self._cache[(path, page, t)] = img
        while len(self._cache) > self.cache_tiles:
            self._cache.popitem(last=False)
        white = self._white.get((pg.th, pg.tw))
        if white is None:
            white = self._white[pg.th, pg.tw] = torch.full((pg.th, pg.tw, 3), 255,
                                                          dtype=torch.uint8, device=self.device)
        tiles = torch.stack([have[t] for t in plan.tiles.tolist()] + [white])
        return assemble(tiles, plan, pg, patch_size)

    def close(self) -> None:
        for s in self._sources.values():
            s.close()
        self._sources.clear()
        self._cache.clear()


def canary(ref: TiffTileReader, device: torch.device) -> str | None:
    """Decode the page's first written tile on `device` and with tifffile; None when they
    agree, else why this slide must decode on CPU (a mislabelled colour space, a decoder
    error)."""
    i = ref.first_written_tile()
    if i is None:
        return None
    src = TileSource(str(ref.path), ref.grid)
    dec = JpegTileDecoder(device)
    try:
        a = dec.decode([src.stream(i)])[0].cpu().numpy()
        mad = float(np.abs(a.astype(np.int16) - ref.tile(i).astype(np.int16)).mean())
        if mad > CANARY_MAD:
            return f"GPU decode differs from tifffile by {mad:.1f} grey levels: decodes on CPU"
        return None
    except Exception as e:  # noqa: BLE001 - any decoder failure means "use the CPU"
        return f"GPU decode failed ({type(e).__name__}: {e}): decodes on CPU"
    finally:
        src.close()
        dec.close()


def choose_decode(path: str, page: int, decode: Decode, device: torch.device
                  ) -> tuple[bool, str]:
    """(decode on the device?, why) for a slide the fast reader takes. `auto` is the CPU
    workers: on the H100 with 16 cores they delivered 24.8k patches/s against 12.0k for
    batched nvJPEG, and left the GPU to the encoder (docs/BENCHMARKS.md). `gpu` decodes on the
    device (on a CPU device: the same batched code, for tests), falling back to the workers
    for a page nvJPEG cannot read or gets wrong."""
    if decode != Decode.GPU:
        return False, "CPU decode"
    with TiffTileReader(path, page) as ref:
        why = gpu_unsupported(ref) or canary(ref, device)
    if why:
        return False, why
    return True, f"batched decode on {device}"


class DecodeThread(threading.Thread):
    """Runs the JpegTileDecoder beside the encoder: it decodes on its own CUDA stream while
    the main thread launches the model, and hands back a `ReadResult` with a `DeviceChunk`.
    At most `ahead` decoded batches wait on the device: each is `release`d once consumed."""

    def __init__(self, device: torch.device, results: queue.Queue[ReadResult], ahead: int = 3):
        super().__init__(daemon=True)
        self.device, self.results = device, results
        self.tasks: queue.Queue = queue.Queue()
        self.decoder = JpegTileDecoder(device)
        self.room = threading.Semaphore(ahead)

    def release(self) -> None:
        """A decoded batch was consumed (or dropped): room for the next."""
        self.room.release()

    def run(self) -> None:
        cuda = self.device.type == "cuda"
        stream = torch.cuda.Stream(self.device) if cuda else None
        with torch.cuda.stream(stream) if cuda else nullcontext(), torch.inference_mode():
            while (task := self.tasks.get()) is not None:
                self.room.acquire()
                self.results.put(self._read(task, stream))
        self.decoder.close()

    def _read(self, task: ReadTask, stream) -> ReadResult:
        sp = task.spec
        try:
            out = self.decoder.read(sp.path, sp.page, task.coords, sp.downsample, sp.read_size,
                                    sp.patch_size, sp.level)
            event = None
            if stream is not None:
                event = torch.cuda.Event()
                event.record(stream)
            return ReadResult(task.task_id, DeviceChunk(out, event))
        except Exception as e:  # noqa: BLE001 - the slide fails, the run goes on
            self.room.release()  # nothing is held for a failed batch
            return ReadResult(task.task_id, None, f"GPU decode: {describe_error(e)}")

    def stop(self) -> None:
        self.tasks.put(None)
        self.room.release()  # after an error, batches may never be consumed
        self.join(timeout=30)
