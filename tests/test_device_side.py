"""The device side of `extract`: batches packed from read chunks, and preprocessing."""

import pytest
import torch
from torchvision.transforms import v2

from wsi_embed.encoders import PRESETS, EncoderConfig, build_encoder
from wsi_embed.extract.device import BatchFeeder, DeviceRunner
from wsi_embed.extract.sources import DeviceChunk, HostChunk, ReaderPool
from wsi_embed.extract.sources.device_jpeg import DecodeThread


@pytest.mark.parametrize("preset,patch", [("kaiko_vitb16", 256), ("uni_v1", 224),
                                          ("conch_v1", 512)])
def test_preprocess_equals_torchvision_transforms(preset, patch):
    """To [0, 1], resize (antialiased, clamped), centre crop, normalise with the preset's
    mean and std; ours folds /255 and the normalisation into one multiply-add after the
    resize, which must not change the result."""
    cfg = PRESETS[preset]
    model, _ = build_encoder("ctranspath", "cpu")  # any small module: only preprocess runs
    runner = DeviceRunner(model, cfg, torch.device("cpu"), torch.float32, 4, False)
    x = torch.randint(0, 256, (3, patch, patch, 3), dtype=torch.uint8,
                      generator=torch.Generator().manual_seed(0))
    mode = {"bilinear": v2.InterpolationMode.BILINEAR,
            "bicubic": v2.InterpolationMode.BICUBIC}[cfg.interpolation]
    ref = v2.Compose([v2.ToDtype(torch.float32, scale=True),
                      v2.Resize(cfg.resize, interpolation=mode, antialias=True),
                      v2.Lambda(lambda t: t.clamp(0, 1)),  # as PIL's uint8 resize does
                      v2.CenterCrop(cfg.input_size), v2.Normalize(*cfg.mean_std)])
    want = torch.stack([ref(p.permute(2, 0, 1)) for p in x])
    got = runner.preprocess(x)
    assert got.shape == (3, 3, cfg.input_size, cfg.input_size)
    diff = (got - want).abs()
    assert diff.max() < 1e-4


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the feed stream's CUDA branch needs a GPU"))])
def test_feeder_packs_slot_and_device_chunks_in_order_and_frees_slots(device):
    """A batch mixes chunks read into shared-memory slots with chunks decoded on the device:
    each lands at its offset in order, and each slot goes back to the readers once copied.
    On CUDA the slots are page-locked and copied on the feed stream, which the encoder's
    stream must wait for."""
    dev = torch.device(device)
    pool = ReaderPool(0, chunk=4, patch_size=8, n_slots=3)
    pool.slots.share_memory_()  # as with reader processes: the memory the feeder page-locks
    pool.decoder = DecodeThread(dev, pool.results)  # only its room counter
    g = torch.Generator().manual_seed(1)
    pool.slots[:] = torch.randint(0, 256, pool.slots.shape, dtype=torch.uint8, generator=g)
    decoded = torch.randint(0, 256, (2, 8, 8, 3), dtype=torch.uint8, generator=g)
    event = None
    if dev.type == "cuda":  # decoded on another stream, as the decode thread does
        side = torch.cuda.Stream(dev)
        with torch.cuda.stream(side):
            decoded_dev = decoded.to(dev, non_blocking=True)
            event = torch.cuda.Event()
            event.record(side)
    else:
        decoded_dev = decoded
    pool.free.clear()  # all three slots hold finished chunks
    cfg = EncoderConfig("none", {}, 3, input_size=8, resize=8,
                        mean_std=((0, 0, 0), (1, 1, 1)))
    runner = DeviceRunner(torch.nn.Identity(), cfg, dev, torch.float32, 16, False)
    feeder = BatchFeeder(pool, runner, batch=16)
    assert feeder.pinned == (dev.type == "cuda")
    chunks = [("a", 0, 4, HostChunk(2)), ("b", 8, 2, DeviceChunk(decoded_dev, event)),
              ("c", 4, 3, HostChunk(0))]
    x, segments = feeder(chunks)
    y = (x * 2).cpu()  # on the encoder's stream, as the encoder would use it
    want = torch.cat([pool.slots[2, :4], decoded, pool.slots[0, :3]])
    assert (y / 2 - want.permute(0, 3, 1, 2).float() / 255).abs().max() < 1e-6
    assert segments == [("a", 0, 4, 0), ("b", 8, 2, 4), ("c", 4, 3, 6)]
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    feeder.reap()
    assert sorted(pool.free) == [0, 2] and feeder.held_slots() == 0
    feeder.close()
    assert not feeder.pinned
