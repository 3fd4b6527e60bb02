"""The raw-tile reader gives OpenSlide's pixels, decodes each tile once, and falls back."""

from __future__ import annotations

import csv

import h5py
import numpy as np
import pytest

from wsi_embed.errors import SlideError
from wsi_embed.extract.sources import SourceKind, choose_source
from wsi_embed.extract.sources.tiff_tiles import TiffTileReader
from wsi_embed.slides import open_slide

from .conftest import CMU, DICOM, KIDNEY, NDPI, cli, copy, small_slide


def test_each_tile_is_decoded_once_for_a_grid(tmp_path):
    path = small_slide(tmp_path / "g.svs", 1024, 1024, seed=2)
    r = TiffTileReader(path, 0)
    for y in range(0, 1024 - 200, 100):  # overlapping 200 px patches crossing borders
        for x in range(0, 1024 - 200, 100):
            r.read(x, y, 200, 200)
    assert r.decoded == 16  # a 4 x 4 tile grid
    assert r.read(900, 900, 256, 256)[200:, 200:].min() == 255  # outside the slide: white


def test_other_formats_fall_back_and_fast_insists():
    why = {}
    for path in (NDPI, KIDNEY, DICOM):
        with open_slide(path) as s:
            c = choose_source(s, 0, 256, 256, "auto")
            # a TIFF in strips has its own reader (decoded whole once); the rest OpenSlide
            want = SourceKind.PLAIN_IMAGE if path == KIDNEY else SourceKind.OPENSLIDE
            assert c.kind == want and c.page == -1
            why[path] = c.reason
            with pytest.raises(SlideError, match="--reader auto"):
                choose_source(s, 0, 256, 256, "fast")
    # each for its vendor: NDPI, a TIFF in strips (OpenSlide's plain-image), DICOM
    assert [why[p].split("'")[1] for p in (NDPI, KIDNEY, DICOM)] == [
        "hamamatsu", "plain-image", "dicom"]
    with open_slide(CMU) as s:
        assert choose_source(s, 0, 256, 256, "openslide").kind == SourceKind.OPENSLIDE


def test_extract_features_agree_between_readers(tmp_path, means_encoder):
    """Through `extract` with a reader process: the fast reader's features equal
    OpenSlide's per patch (channel means, to a grey level); NDPI goes to OpenSlide, and
    `--reader fast` fails it."""
    slides = tmp_path / "in"
    copy(CMU, slides / "cmu.svs")
    copy(NDPI, slides / "ndpi.ndpi")
    feats = {}
    for reader in ("openslide", "auto"):
        out = tmp_path / reader
        r = cli("extract", slides, "--out", out, "--encoder", means_encoder, "--weights",
                "random", "--reader", reader, "--num-workers", "1", "--batch-size", "16")
        assert r.exit_code == 0, r.output
        with open(out / f"extract_report_{means_encoder}.csv") as fh:
            rows = {row["slide_id"]: row for row in csv.DictReader(fh)}
        with h5py.File(out / "features" / means_encoder / "cmu.h5") as f:
            feats[reader] = f["features"][:]
        if reader == "auto":
            assert rows["cmu"]["reader"].startswith("fast")
            assert rows["ndpi"]["reader"].startswith("openslide")
    a, b = feats["openslide"], feats["auto"]
    assert len(a) > 20 and a.std(0).max() > 0.01  # the patches differ: a swap would show
    assert np.abs(a - b).max() <= 1 / 255 + 1e-6
    assert cli("extract", slides, "--out", tmp_path / "x", "--encoder", means_encoder,
               "--weights", "random", "--reader", "fast", "--num-workers", "0").exit_code == 1
