"""A damaged tile fails its slide under every reader, as OpenSlide fails it: never grey or
garbage features reported `ok`. The slide is tiled while intact, then damaged, so that
`extract` reaches the bad tile when it reads patches (as with coords made earlier)."""

from __future__ import annotations

import csv
import struct
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile

from wsi_embed.slides import open_slide

from .conftest import CMU, cli, copy, small_slide


def tile_span(path: Path, i: int, page: int = 0) -> tuple[int, int]:
    with tifffile.TiffFile(path) as tf:
        pg = tf.pages[page]
        return int(pg.dataoffsets[i]), int(pg.databytecounts[i])


def set_byte_count(path: Path, i: int, count: int) -> None:
    """Rewrite tile `i`'s TileByteCounts entry (page 0) in place."""
    with tifffile.TiffFile(path) as tf:
        tag = tf.pages[0].tags["TileByteCounts"]
        fmt = {4: "<I", 16: "<Q"}[tag.dtype]
        at = tag.valueoffset + i * struct.calcsize(fmt)
    with open(path, "r+b") as fh:
        fh.seek(at)
        fh.write(struct.pack(fmt, count))


def tiled_batch(tmp_path: Path, slide: Path) -> tuple[Path, Path]:
    """`slide` and a good slide in one folder, tiled whole into `out` while intact."""
    folder, out = tmp_path / "in", tmp_path / "out"
    small_slide(folder / "good.svs", 1024, 1024, seed=3)
    r = cli("tile", folder, "--out", out, "--tissue", "none", "--num-workers", "0")
    assert r.exit_code == 0, r.output
    return folder, out


def extract_rows(folder: Path, out: Path, encoder: str, reader: str) -> tuple[int, dict]:
    r = cli("extract", folder, "--out", out / reader, "--coords", out, "--encoder", encoder,
            "--weights", "random", "--reader", reader, "--num-workers", "0",
            "--batch-size", "16", "--tissue", "none")
    with open(out / reader / f"extract_report_{encoder}.csv") as fh:
        return r.exit_code, {row["slide_id"]: row for row in csv.DictReader(fh)}


def assert_fails_everywhere(folder: Path, out: Path, encoder: str, sid: str,
                            openslide_says: str, ours_says: list[str]) -> None:
    for reader in ("auto", "fast", "openslide"):
        code, rows = extract_rows(folder, out, encoder, reader)
        assert code == 1, reader
        assert rows["good"]["status"] == "ok", (reader, rows["good"])
        bad = rows[sid]
        assert bad["status"] == "failed", (reader, bad)
        words = [openslide_says] if reader == "openslide" else ours_says
        assert all(w in bad["error"] for w in words), (reader, bad["error"])
        feats = out / reader / "features" / encoder
        assert (feats / "good.h5").exists() and not list(feats.glob(f"*{sid}*"))


def test_a_corrupt_jpeg_tile_fails_the_slide_under_every_reader(tmp_path, means_encoder):
    """A few hundred bytes overwritten mid-tile: tifffile and torchvision decode it to grey
    without a word; OpenSlide says "Corrupt JPEG data". Every reader must fail the slide,
    ours naming the level, the tile and its byte offset."""
    bad = copy(CMU, tmp_path / "in" / "cmu.svs")
    folder, out = tiled_batch(tmp_path, bad)
    off, n = tile_span(bad, 40)
    with open(bad, "r+b") as fh:
        fh.seek(off + n // 2)
        fh.write(bytes(300))
    assert_fails_everywhere(folder, out, means_encoder, "cmu", "Corrupt JPEG data",
                            [str(bad), "level 0", "tile 40", f"byte offset {off}",
                             "Corrupt JPEG data"])


def test_a_byte_count_past_the_end_of_the_file_fails_the_slide(tmp_path, means_encoder):
    bad = copy(CMU, tmp_path / "in" / "cmu.svs")
    folder, out = tiled_batch(tmp_path, bad)
    off, _ = tile_span(bad, 40)
    set_byte_count(bad, 40, 10**8)
    assert_fails_everywhere(folder, out, means_encoder, "cmu", "Read error",
                            ["tile 40", f"byte offset {off}", "100000000 bytes declared",
                             "the file ends after"])


def test_a_truncated_last_tile_fails_the_slide(tmp_path, means_encoder):
    """The file ends inside its last tile (an interrupted copy). OpenSlide then refuses to
    open a one-level slide (its quickhash reads the smallest level whole), so every reader
    fails it before reading; the raw-tile reader says the same of the tile itself."""
    from wsi_embed.errors import TileDecodeError
    from wsi_embed.extract.sources.tiff_tiles import TiffTileReader

    bad = small_slide(tmp_path / "in" / "cut.svs", 1024, 768, seed=1)
    folder, out = tiled_batch(tmp_path, bad)
    with tifffile.TiffFile(bad) as tf:  # a one-level copy: the last tile ends the file
        level0 = tf.pages[0].asarray()
    tifffile.imwrite(bad, level0, tile=(256, 256), compression="jpeg", photometric="rgb",
                     resolution=(2e4, 2e4), resolutionunit="CENTIMETER",
                     description="Aperio Image Library v12.0.15\r\n1024x768 (256x256) "
                                 "JPEG/RGB Q=90|AppMag = 20|MPP = 0.5")
    off, n = tile_span(bad, 11)
    assert off + n == bad.stat().st_size
    with open(bad, "r+b") as fh:
        fh.truncate(off + n // 2)
    assert_fails_everywhere(folder, out, means_encoder, "cut", "truncated",
                            [str(bad), "truncated"])
    with TiffTileReader(bad, 0) as r, pytest.raises(
            TileDecodeError, match=f"tile 11 \\(byte offset {off}\\): {n} bytes declared, "
                                   f"the file ends after {n // 2}"):
        r.read(768, 512, 256, 256)


def test_a_zero_length_tile_is_glass_for_every_reader(tmp_path, means_encoder):
    """A tile with no bytes was never written: OpenSlide reads it transparent, and so it is
    white (glass) for every reader, never an error and never stale pixels."""
    slide = copy(CMU, tmp_path / "in" / "cmu.svs")
    folder, out = tiled_batch(tmp_path, slide)
    set_byte_count(slide, 40, 0)  # tile 40: x 0-240, y 960-1200 in 240 px tiles
    feats = {}
    for reader in ("auto", "openslide"):
        code, rows = extract_rows(folder, out, means_encoder, reader)
        assert code == 0 and rows["cmu"]["status"] == "ok", rows["cmu"]
        with h5py.File(out / reader / "features" / means_encoder / "cmu.h5") as f:
            feats[reader], coords = f["features"][:], f["coords"][:]
    np.testing.assert_allclose(feats["auto"], feats["openslide"], atol=0.01)
    (row,) = np.flatnonzero((coords[:, 0] == 0) & (coords[:, 1] == 1024))
    with open_slide(CMU) as s:  # the intact patch with the tile's part white
        want = s.read_region(0, 1024, 0, 256, 256)
    want[: 1200 - 1024, :240] = 255
    np.testing.assert_allclose(feats["auto"][row], want.reshape(-1, 3).mean(0) / 255,
                               atol=0.01)


def test_device_decode_names_the_tile_the_decoder_refuses(tmp_path):
    """--decode gpu (here the same batched code on the CPU, libjpeg-turbo through
    torchvision): a batch the decoder refuses is decoded tile by tile to name the tile at
    fault. (What a decoder accepts silently is not caught on this path: torchvision's
    libjpeg takes zeroed bytes; nvJPEG's strictness is unmeasured here, there is no GPU.)"""
    from wsi_embed.errors import TileDecodeError
    from wsi_embed.extract.sources.device_jpeg import JpegTileDecoder

    path = small_slide(tmp_path / "y.svs", 1024, 1024, seed=4, blur=1.5)
    with tifffile.TiffFile(path) as tf:  # YCbCr JPEG, as nvJPEG takes
        assert tf.pages[0].photometric == 6
    off, n = tile_span(path, 5)
    with open(path, "r+b") as fh:
        fh.seek(off + n // 2)
        fh.write(b"\xff" * 300)
    dec = JpegTileDecoder("cpu")
    coords = np.array([[x, y] for y in range(0, 1024, 256) for x in range(0, 1024, 256)])
    try:
        with pytest.raises(TileDecodeError, match=f"tile 5 \\(byte offset {off}\\)"):
            dec.read(str(path), 0, coords, 1.0, 256, 256)
    finally:
        dec.close()
