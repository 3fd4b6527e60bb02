"""Opening slides, MPP sources and level choice, on real and synthetic slides."""

import csv
import json

import pytest

from wsi_embed.errors import SlideError
from wsi_embed.slides import open_slide

from .conftest import CMU, DICOM, KIDNEY, NDPI, TCGA, cli, small_slide


def test_info_json_reports_levels_mpp_and_sources():
    r = cli("info", CMU, "--json")
    assert r.exit_code == 0
    d = json.loads(r.output)
    assert d["vendor"] == "aperio"
    assert (d["width"], d["height"]) == (2220, 2967)
    assert d["mpp"] == pytest.approx(0.499)
    assert d["mpp_source"] == "openslide.mpp-x/y"
    assert d["objective_power"] == 20
    assert set(d["associated_images"]) == {"label", "macro", "thumbnail"}


def test_info_lists_every_level_of_the_ndpi():
    d = json.loads(cli("info", NDPI, "--json").output)
    assert d["vendor"] == "hamamatsu" and len(d["levels"]) == 7
    assert d["levels"][2]["downsample"] == 4
    assert d["levels"][2]["mpp"] == pytest.approx(0.2282 * 4, rel=1e-3)


def test_info_on_a_corrupt_file_is_one_clear_line(tmp_path):
    bad = tmp_path / "notes.svs"
    bad.write_text("this is not a slide\n")
    r = cli("info", bad)
    assert r.exit_code == 1
    assert str(bad) in r.output and "Traceback" not in r.output


def test_plain_tiff_falls_back_and_needs_user_mpp():
    with open_slide(KIDNEY) as s:
        assert s.vendor == "plain-image" and (s.width, s.height) == (1493, 901)
        with pytest.raises(SlideError, match="--slide-mpp"):
            s.set_mpp()
        s.set_mpp(0.5, "--slide-mpp")
        assert s.read_region(0, 0, 0, 64, 32).shape == (32, 64, 3)


def test_level_choice_follows_the_design_rules(tmp_path):
    p = small_slide(tmp_path / "s.svs", 2048, 2048, mpp=0.25)
    with open_slide(p) as s:
        s.set_mpp()
        g = s.geometry(256, 0.5)
        assert (g.level, g.patch_size_level0, g.read_size) == (0, 512, 512)
        g = s.geometry(256, 1.0)  # level 1 (downsample 4) is exactly 1.0 µm/px: native
        assert (g.level, g.read_size, g.patch_size_level0) == (1, 256, 1024)
    with open_slide(CMU) as s:
        s.set_mpp()
        g = s.geometry(256, 0.5)  # 0.499 is within 2 %: read natively
        assert g.native and g.patch_size_level0 == 256 and g.level == 0
    with open_slide(NDPI) as s:
        s.set_mpp()
        g = s.geometry(256, 0.5)  # 40x: level 1 (0.456 µm/px) is the coarsest ≤ 0.5
        assert g.level == 1
        assert g.patch_size_level0 == round(256 * 0.5 / s.mpp)
        assert g.read_size == round(256 * 0.5 / (s.mpp * 2))


def test_slide_without_mpp_and_implausible_dicom():
    with open_slide(TCGA) as s:
        assert s.metadata_mpp is None and len(s.level_dims) == 2
    with open_slide(DICOM) as s:
        assert s.vendor == "dicom" and s.metadata_mpp == pytest.approx(16.783, rel=1e-3)


def test_an_implausible_mpp_is_refused_with_a_clear_message(tmp_path):
    """80 µm/px is no scan: in the metadata it is named (not taken for "no MPP"), as
    --slide-mpp or a slide list's mpp it is a usage error before any work."""
    slide = small_slide(tmp_path / "in" / "s.tif", 512, 512, mpp=80.0, aperio=False)
    r = cli("tile", slide, "--out", tmp_path / "o", "--num-workers", "0")
    assert r.exit_code == 1
    with open(tmp_path / "o" / "tile_report.csv") as fh:
        (row,) = csv.DictReader(fh)
    for words in ("80 µm/px", "openslide.mpp-x/y", "plausible range", "--slide-mpp"):
        assert words in row["error"], row["error"]
    r = cli("tile", slide, "--out", tmp_path / "o2", "--slide-mpp", "80")
    assert r.exit_code == 2 and "--slide-mpp 80" in r.output and "plausible" in r.output
    assert not (tmp_path / "o2" / "coords").exists()
    listing = tmp_path / "slides.csv"
    listing.write_text(f"path,mpp\n{slide},80\n")
    r = cli("tile", "--slide-list", listing, "--out", tmp_path / "o3")
    assert r.exit_code == 2 and "line 2" in r.output and "plausible" in r.output
    assert cli("tile", slide, "--out", tmp_path / "o4", "--slide-mpp", "0.5",
               "--num-workers", "0").exit_code == 0
