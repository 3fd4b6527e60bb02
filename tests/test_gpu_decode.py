"""Batched JPEG decoding on the device: same pixels as OpenSlide, tiles decoded once, JPEG it
cannot read or gets wrong sent to the CPU decoders. Runs on a GPU when there is one (nvJPEG),
else the same code on the CPU (libjpeg-turbo through torchvision)."""

from __future__ import annotations

import csv

import h5py
import numpy as np
import torch

from wsi_embed.extract.sources.device_jpeg import JpegTileDecoder, canary, choose_decode
from wsi_embed.extract.sources.tiff_tiles import TiffTileReader

from .conftest import CMU, TCGA, cli, copy, small_slide

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# libjpeg-turbo through torchvision gives OpenSlide's pixels; nvJPEG upsamples chroma
# differently, so on a GPU the bound is the per-slide check's (the figure is printed)
TOL = 5.0 if DEVICE.type == "cuda" else 1.0


def textured(path, width, height, tile, aperio=True, mpp=0.25):
    """Detail at every scale, with stain-like colour (see `small_slide`)."""
    return small_slide(path, width, height, mpp, aperio, seed=1, tile=tile, blur=1.5)


def test_tiles_are_decoded_once_and_glass_is_white(tmp_path):
    path = textured(tmp_path / "g.svs", 1024, 1024, 256, mpp=0.5)
    dec = JpegTileDecoder(DEVICE)
    grid = np.array([(x, y) for y in range(0, 824, 100) for x in range(0, 824, 100)])
    for part in np.array_split(grid, 5):  # overlapping 200 px patches, in five chunks
        dec.read(str(path), 0, part, 1.0, 200, 200)
    assert dec.decoded == 16  # a 4 x 4 tile grid
    corner = dec.read(str(path), 0, np.array([[900, 900]]), 1.0, 256, 256)[0].cpu().numpy()
    assert corner[:124, :124].std() > 20 and corner[124:, 124:].min() == 255


def test_jpeg_the_gpu_cannot_read_or_gets_wrong_goes_to_the_cpu():
    ok, why = choose_decode(str(CMU), 0, "gpu", DEVICE)
    assert not ok and "RGB-photometric" in why
    # CMU's tiles are RGB-coded JPEG: a YCbCr decoder shifts every colour, and the per-slide
    # check against tifffile catches it even when the TIFF tags are not trusted
    with TiffTileReader(CMU, 0) as ref:
        assert "differs from tifffile" in canary(ref, DEVICE)
    ok, why = choose_decode(str(TCGA), 0, "gpu", DEVICE)
    assert not ok and "33005" in why  # JPEG 2000
    ok, why = choose_decode(str(CMU), 0, "cpu", DEVICE)
    assert not ok and why == "CPU decode"
    assert choose_decode(str(CMU), 0, "auto", torch.device("cuda")) == (False, "CPU decode")


def test_extract_with_device_decode_matches_cpu_decode(tmp_path, means_encoder):
    """A YCbCr slide read 512 px at 0.25 µm/px for 256 px at 0.5 (decode, stitch and resize
    on the device) next to CMU (RGB JPEG: CPU workers), in one run and in shared batches;
    channel-mean features equal per patch to the decoders' pixel bound."""
    slides = tmp_path / "in"
    textured(slides / "ycbcr.svs", 2048, 1536, 240)
    copy(CMU, slides / "cmu.svs")
    feats, rows = {}, {}
    for decode in ("cpu", "gpu"):
        out = tmp_path / decode
        r = cli("extract", slides, "--out", out, "--encoder", means_encoder, "--weights",
                "random", "--decode", decode, "--device", str(DEVICE), "--num-workers", "1",
                "--batch-size", "24", "--target-mpp", "0.5", "--tissue", "none")
        assert r.exit_code == 0, r.output
        with open(out / f"extract_report_{means_encoder}.csv") as fh:
            rows[decode] = {row["slide_id"]: row["reader"] for row in csv.DictReader(fh)}
        for sid in ("ycbcr", "cmu"):
            with h5py.File(out / "features" / means_encoder / f"{sid}.h5") as f:
                feats[decode, sid] = f["features"][:]
    assert "batched decode" in rows["gpu"]["ycbcr"]
    assert "RGB-photometric" in rows["gpu"]["cmu"] and "CPU decode" in rows["cpu"]["ycbcr"]
    for sid in ("ycbcr", "cmu"):
        a, b = feats["cpu", sid], feats["gpu", sid]
        print(f"{sid}: channel means, device vs CPU decode on {DEVICE}: max abs diff "
              f"{np.abs(a - b).max() * 255:.3f} grey levels")
        assert len(a) >= 12 and a.std(0).max() > 0.01  # patches differ: a swap would show
        assert np.abs(a - b).max() <= TOL / 255 + 1e-6, sid
    r = cli("extract", slides, "--out", tmp_path / "x", "--encoder", "ctranspath",
            "--decode", "nvjpeg")
    assert r.exit_code == 2 and "--decode" in r.output
