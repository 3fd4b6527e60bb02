"""`wsi-embed tile`: resolution, tissue detection against ground truth, coords files."""

import csv
import json

import h5py
import numpy as np
import pytest

from wsi_embed.h5io import COORDS_SCHEMA, check_output
from wsi_embed.tiling import box_fractions, grid_coords

from .conftest import CMU, DICOM, KIDNEY, NDPI, TCGA, cli, last_run, small_slide


def report(out):
    with open(out / "tile_report.csv") as fh:
        return {r["slide_id"]: r for r in csv.DictReader(fh)}


def coords_of(out, slide_id):
    with h5py.File(out / "coords" / f"{slide_id}.h5") as f:
        return f["coords"][:], dict(f["coords"].attrs), dict(f.attrs), f["tissue_fraction"][:]


def test_quarter_micron_slide_at_half_micron_uses_512_px_grid(tmp_path):
    p = small_slide(tmp_path / "in" / "fine.svs", 3000, 2100, mpp=0.25)
    r = cli("tile", p, "--out", tmp_path / "out", "--tissue", "none", "--num-workers", "0")
    assert r.exit_code == 0, r.output
    coords, attrs, root, _ = coords_of(tmp_path / "out", "fine")
    assert attrs["patch_size_level0"] == 512 and attrs["patch_size"] == 256
    assert attrs["target_mpp"] == 0.5 and attrs["level0_mpp"] == 0.25
    assert coords.dtype == np.int64 and coords.shape == (5 * 4, 2)
    assert (coords % 512 == 0).all()
    assert coords[:, 0].max() + 512 <= 3000 and coords[:, 1].max() + 512 <= 2100
    assert root["schema"] == COORDS_SCHEMA


def test_cmu_is_read_natively_and_attrs_are_complete(tmp_path):
    r = cli("tile", CMU, "--out", tmp_path, "--num-workers", "0")
    assert r.exit_code == 0, r.output
    coords, attrs, root, frac = coords_of(tmp_path, "CMU-1-Small-Region")
    assert (attrs["patch_level"], attrs["patch_size_level0"], attrs["read_size"]) == (0, 256, 256)
    for k in ("patch_size", "patch_size_level0", "patch_level", "downsample", "level0_mpp",
              "target_mpp", "target_magnification", "overlap", "level0_width",
              "level0_height", "name"):
        assert k in attrs
    for k in ("schema", "wsi_embed_version", "slide_path", "slide_size_bytes", "slide_mtime",
              "created", "tiling_min_tissue"):
        assert k in root
    assert 20 < len(coords) < 88  # tissue, not the whole 8x11 grid
    assert (frac >= 0.25).all()
    assert (tmp_path / "thumbnails" / "CMU-1-Small-Region.png").stat().st_size > 10_000
    row = report(tmp_path)["CMU-1-Small-Region"]
    assert row["status"] == "ok" and float(row["tissue_area_mm2"]) > 0.3


def test_overlap_and_magnification_sugar(tmp_path):
    r = cli("tile", CMU, "--out", tmp_path, "--magnification", "20", "--overlap", "128",
            "--tissue", "none", "--num-workers", "0")
    assert r.exit_code == 0, r.output
    coords, attrs, _, _ = coords_of(tmp_path, "CMU-1-Small-Region")
    xs = np.unique(coords[:, 0])
    assert attrs["overlap"] == 128 and (np.diff(xs) == 128).all()


def test_40x_ndpi_is_tiled_at_20x_from_level_1_and_dark_background_is_reported(tmp_path):
    r = cli("tile", NDPI, "--out", tmp_path, "--num-workers", "0")
    assert r.exit_code == 0, r.output
    row = report(tmp_path)["fluorescence-dapi-40x"]
    assert row["read_level"] == "1"
    assert "dark background" in row["warning"]
    coords, attrs, _, _ = coords_of(tmp_path, "fluorescence-dapi-40x")
    assert attrs["patch_size_level0"] == round(256 * 0.5 / attrs["level0_mpp"])
    total = len(grid_coords(3968, 4864, attrs["patch_size_level0"], attrs["patch_size_level0"]))
    assert 0.3 * total < len(coords) < total  # tissue found, black margin left out


def test_slide_without_mpp_fails_clearly_then_works_with_either_fix(tmp_path):
    r = cli("tile", TCGA, "--out", tmp_path / "a", "--num-workers", "0")
    assert r.exit_code == 1
    err = report(tmp_path / "a")["tcga-cr-7395-01a-01-ts1"]["error"]
    assert "--slide-mpp" in err and "'mpp' column" in err and str(TCGA) in err
    assert not (tmp_path / "a" / "coords" / "tcga-cr-7395-01a-01-ts1.h5").exists()

    r = cli("tile", TCGA, "--out", tmp_path / "b", "--slide-mpp", "0.5", "--num-workers", "0")
    assert r.exit_code == 0, r.output
    lst = tmp_path / "list.csv"
    lst.write_text(f"path,mpp\n{TCGA},0.5\n")
    r = cli("tile", "--slide-list", lst, "--out", tmp_path / "c", "--num-workers", "0")
    assert r.exit_code == 0, r.output
    b, attrs_b, root_b, _ = coords_of(tmp_path / "b", "tcga-cr-7395-01a-01-ts1")
    c, _, root_c, _ = coords_of(tmp_path / "c", "tcga-cr-7395-01a-01-ts1")
    assert len(b) > 20 and np.array_equal(b, c) and attrs_b["level0_mpp"] == 0.5
    assert root_b["mpp_source"] == "--slide-mpp"
    assert root_c["mpp_source"] == "slide list 'mpp' column"


def test_plain_image_tiles_with_user_mpp_only(tmp_path):
    assert cli("tile", KIDNEY, "--out", tmp_path / "a", "--num-workers", "0").exit_code == 1
    r = cli("tile", KIDNEY, "--out", tmp_path / "b", "--slide-mpp", "0.5", "--tissue", "none",
            "--num-workers", "0")
    assert r.exit_code == 0, r.output
    coords, _, _, _ = coords_of(tmp_path / "b", "kidney-ihc-1493x901")
    assert len(coords) == 5 * 3
    # a low-power image: its one small IHC tissue piece (near x 285-400, y 500-570) is found
    r = cli("tile", KIDNEY, "--out", tmp_path / "c", "--slide-mpp", "4", "--target-mpp", "4",
            "--patch-size", "32", "--num-workers", "0")
    assert r.exit_code == 0, r.output
    coords, _, _, _ = coords_of(tmp_path / "c", "kidney-ihc-1493x901")
    assert len(coords) >= 2
    assert (coords[:, 0] > 240).all() and (coords[:, 0] < 420).all()
    assert (coords[:, 1] > 460).all() and (coords[:, 1] < 600).all()


def test_tissue_detection_matches_ground_truth(phantom, tmp_path):
    path, ph = phantom
    r = cli("tile", path, "--out", tmp_path, "--num-workers", "0")
    assert r.exit_code == 0, r.output
    coords, attrs, _, _ = coords_of(tmp_path, "phantom")
    grid = grid_coords(8000, 6000, 256, 256)
    gt = box_fractions(ph.tissue, 1, grid, 256)
    ink = box_fractions(ph.ink, 1, grid, 256)
    faint = box_fractions(ph.faint, 1, grid, 256)
    truth = (gt >= 0.25) & (ink < 0.5)
    kept = np.isin(grid[:, 0] * 100_000 + grid[:, 1], coords[:, 0] * 100_000 + coords[:, 1])
    tp = (kept & truth).sum()
    precision, recall = tp / kept.sum(), tp / truth.sum()
    assert precision >= 0.95 and recall >= 0.95, (precision, recall)
    assert not (kept & (ink >= 0.5)).any(), "a patch that is mostly ink was kept"
    faint_truth = truth & (faint >= 0.5)
    assert faint_truth.sum() > 30 and (kept & faint_truth).sum() >= 0.95 * faint_truth.sum()


def test_geojson_tissue_mask_limits_patches_to_the_polygon(tmp_path):
    p = small_slide(tmp_path / "s.svs", 2048, 2048)
    mask = tmp_path / "s.geojson"
    poly = [[0, 0], [1024, 0], [1024, 512], [0, 512], [0, 0]]
    mask.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [poly]}}]}))
    r = cli("tile", p, "--out", tmp_path / "o", "--tissue-mask", mask, "--num-workers", "0")
    assert r.exit_code == 0, r.output
    coords, _, _, frac = coords_of(tmp_path / "o", "s")
    want = sorted((x, y) for y in (0, 256) for x in range(0, 1024, 256))
    assert sorted(map(tuple, coords)) == want
    assert frac == pytest.approx(1.0)


def test_slide_with_no_tissue_gives_empty_coords_and_a_warning(tmp_path):
    from wsi_embed.synthetic import write_slide

    blank = write_slide(tmp_path / "blank.svs", 1024, 1024, 0.5,
                        lambda x, y, w, h: np.full((h, w, 3), 243, np.uint8))
    r = cli("tile", blank, "--out", tmp_path / "o", "--num-workers", "0")
    assert r.exit_code == 0, r.output
    coords, _, _, _ = coords_of(tmp_path / "o", "blank")
    assert coords.shape == (0, 2)
    assert "no tissue" in report(tmp_path / "o")["blank"]["warning"]
    assert check_output(tmp_path / "o" / "coords" / "blank.h5", COORDS_SCHEMA) is None


def test_slides_without_patches_say_why_and_are_counted_apart(tmp_path):
    """The bone-marrow DICOM (mostly classed as pen ink) and the kidney IHC fragment give no
    patches: each row's warning names the cause and the fixes; the summary counts them."""
    r = cli("tile", DICOM, KIDNEY, "--out", tmp_path / "o", "--num-workers", "0",
            "--slide-mpp", "0.5")
    assert r.exit_code == 0, r.output
    rows = last_run(tmp_path / "o" / "tile_report.csv")
    marrow, kidney = rows[DICOM.stem], rows[KIDNEY.stem]
    assert marrow["n_patches"] == "0" and "pen-ink filter removed" in marrow["warning"]
    for row in (marrow, kidney):
        assert "no tissue patches" in row["warning"] and "--tissue none" in row["warning"]
    assert "2 with no patches" in r.output


def test_the_fixes_the_warnings_name_give_patches(tmp_path):
    """--no-pen-filter finds the bone-marrow DICOM's tissue; a slide list's `tissue` column
    sets the choice per slide (the marrow without the pen filter, the kidney fragment as a
    whole slide), and its reruns and other settings are checked per slide."""
    a = tmp_path / "a"
    r = cli("tile", DICOM, "--out", a, "--num-workers", "0", "--slide-mpp", "0.5",
            "--no-pen-filter")
    assert r.exit_code == 0, r.output
    marrow_patches = int(report(a)[DICOM.stem]["n_patches"])
    assert marrow_patches == 6  # 957 × 715 px: a 3 × 2 grid, every patch tissue
    listed = tmp_path / "slides.csv"
    listed.write_text(f"path,tissue\n{DICOM},no-pen\n{KIDNEY},none\n")
    b = tmp_path / "b"
    args = ("tile", "--slide-list", listed, "--out", b, "--num-workers", "0", "--slide-mpp",
            "0.5")
    r = cli(*args)
    assert r.exit_code == 0, r.output
    assert int(last_run(b / "tile_report.csv")[DICOM.stem]["n_patches"]) == marrow_patches
    coords, attrs, root, _ = coords_of(b, KIDNEY.stem)
    ps0 = attrs["patch_size_level0"]
    assert root["tiling_tissue"] == "none" and len(coords) == (
        attrs["level0_width"] // ps0) * (attrs["level0_height"] // ps0)
    assert not coords_of(b, DICOM.stem)[2]["tiling_pen_filter"]
    r = cli(*args)
    assert {row["status"] for row in last_run(b / "tile_report.csv").values()} == {"skipped"}
    r = cli("tile", DICOM, KIDNEY, "--out", b, "--num-workers", "0", "--slide-mpp", "0.5")
    assert r.exit_code == 2 and "2 of 2 slides already have coords" in r.output
    listed.write_text(f"path,tissue\n{DICOM},otsu\n")
    r = cli(*args)
    assert r.exit_code == 2 and "line 2: tissue 'otsu'" in r.output and "no-pen" in r.output


def test_coords_from_before_the_pen_and_edge_settings_count_as_the_defaults(tmp_path):
    p = small_slide(tmp_path / "in" / "old.svs")
    out = tmp_path / "o"
    base = ("tile", p, "--out", out, "--tissue", "none", "--num-workers", "0")
    assert cli(*base).exit_code == 0
    with h5py.File(out / "coords" / "old.h5", "a") as f:  # as an earlier version wrote it
        del f.attrs["tiling_pen_filter"], f.attrs["tiling_edge"]
    r = cli(*base)
    assert r.exit_code == 0 and last_run(out / "tile_report.csv")["old"]["status"] == "skipped"
    r = cli(*base, "--edge", "pad")
    assert r.exit_code == 2 and "tiling_edge='drop', this run asks 'pad'" in r.output


def test_edge_pad_adds_the_partial_last_column_and_row_only_when_pixels_are_left():
    drop = grid_coords(1000, 700, 256, 256)
    pad = grid_coords(1000, 700, 256, 256, pad=True)
    assert sorted(set(drop[:, 0])) == [0, 256, 512] and sorted(set(drop[:, 1])) == [0, 256]
    assert sorted(set(pad[:, 0])) == [0, 256, 512, 768] and sorted(set(pad[:, 1])) == [
        0, 256, 512]
    assert len(grid_coords(1024, 512, 256, 256, pad=True)) == 8  # nothing left over
    assert sorted(set(grid_coords(1000, 256, 256, 128, pad=True)[:, 0]))[-1] == 768
    assert len(grid_coords(100, 100, 256, 256)) == 0
    assert grid_coords(100, 100, 256, 256, pad=True).tolist() == [[0, 0]]


def test_the_patch_grid_shows_on_fluorescence_thumbnails(tmp_path):
    """Blue outlines vanish on a DAPI slide's blue tissue: its grid is drawn in yellow; H&E
    keeps blue."""
    import cv2

    from wsi_embed.viz import PATCH_BGR

    r = cli("tile", NDPI, CMU, "--out", tmp_path / "o", "--num-workers", "0")
    assert r.exit_code == 0, r.output
    for slide, colour in ((NDPI, PATCH_BGR[1]), (CMU, PATCH_BGR[0])):
        img = cv2.imread(str(tmp_path / "o" / "thumbnails" / f"{slide.stem}.png"))
        drawn = {c: int((img == c).all(axis=2).sum()) for c in PATCH_BGR}
        assert drawn[colour] > 500 and sum(drawn.values()) == drawn[colour], drawn
