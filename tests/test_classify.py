"""classify over a real slide: attention, heatmap, top/bottom patches and QuPath GeoJSON."""

from __future__ import annotations

import json

import cv2
import h5py
import numpy as np

from wsi_embed.h5io import atomic_h5, read_coords_file, write_features_file
from wsi_embed.synthetic import write_witness_bags
from wsi_embed.viz import HEATMAP_MAX_SIDE

from .conftest import CMU, cli, copy


def test_heatmap_geojson_and_patches_show_where_the_witnesses_are(tmp_path):
    bags = write_witness_bags(tmp_path / "train", 40, patches=(40, 80), shift=20.0, seed=5)
    r = cli("train", "--features", bags.labels_csv.parent, "--labels", bags.labels_csv,
            "--out", tmp_path / "m", "--folds", "2", "--epochs", "8", "--lr", "1e-3")
    assert r.exit_code == 0, r.output

    # features for the real CMU slide: witnesses in the left third of the tissue
    slides = tmp_path / "slides"
    copy(CMU, slides / "cmu.svs")
    assert cli("tile", slides, "--out", tmp_path / "t").exit_code == 0
    cf = read_coords_file(tmp_path / "t" / "coords" / "cmu.h5")
    coords, n = cf.coords, len(cf.coords)
    left = coords[:, 0] < np.quantile(coords[:, 0], 0.1)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, 768)).astype(np.float32)
    # take a witness patch straight from a positive training bag: the same distribution
    with h5py.File(bags.labels_csv.parent / "slide_0001.h5") as f:
        w = f["features"][:][bags.witnesses["slide_0001"]].astype(np.float32)
    x[left] = w[rng.integers(0, len(w), left.sum())] + 0.1 * rng.standard_normal(
        (left.sum(), 768))
    feats = tmp_path / "features"
    write_features_file(feats / "cmu.h5", x.astype(np.float16), coords, cf.attrs,
                        {"encoder": "synthetic", "weights": "random"})

    out = tmp_path / "c"
    r = cli("classify", "--features", feats, "--model", tmp_path / "m" / "model.pt", "--out",
            out, "--slides", slides, "--top-k", "4")
    assert r.exit_code == 0, r.output
    with h5py.File(out / "attention" / "cmu.h5") as f:
        np.testing.assert_array_equal(f["coords"][:], coords)
        a = f["attention"][:]
        assert f.attrs["prediction"] == "1"
    assert a[left].mean() > 5 * a[~left].mean()

    # heatmap: thumbnail-sized map, hot (red) over the witnesses, cold (blue) elsewhere
    img = cv2.imread(str(out / "heatmaps" / "cmu.png"))[..., ::-1].astype(int)
    d = max(2220, 2967) / HEATMAP_MAX_SIDE
    assert img.shape[0] > 2967 / d and abs(img.shape[1] - 90 - 2220 / d) <= 1
    size0 = int(cf.attrs["patch_size_level0"])

    def redness(mask):
        vals = []
        for cx, cy in coords[mask]:
            px, py = int((cx + size0 / 2) / d), int((cy + size0 / 2) / d)
            vals.append(img[py, px, 0] - img[py, px, 2])
        return np.mean(vals)

    assert redness(left) > 60 > redness(~left)
    grid = cv2.imread(str(out / "patches" / "cmu.png"))
    assert grid.shape[0] == 2 * (160 + 24) and grid.shape[1] == 4 * 164

    # GeoJSON for QuPath: one square per patch in level-0 px, with the measurements
    gj = json.loads((out / "geojson" / "cmu.geojson").read_text())
    assert len(gj["features"]) == n
    f0 = gj["features"][0]
    x0, y0 = coords[0].tolist()
    assert f0["geometry"]["coordinates"][0] == [[x0, y0], [x0 + size0, y0],
                                                [x0 + size0, y0 + size0], [x0, y0 + size0],
                                                [x0, y0]]
    m = f0["measurements"] if "measurements" in f0 else f0["properties"]["measurements"]
    assert {"attention", "rank", "prob_0", "prob_1"} <= set(m)
    total = sum(f["properties"]["measurements"]["attention"] for f in gj["features"])
    assert abs(total - 1) < 1e-3

    # the same features as STAMP writes them: `feats`, coords in µm, unit at the root
    mpp = float(cf.attrs["level0_mpp"])
    stamp = tmp_path / "stamp"
    with atomic_h5(stamp / "cmu.h5") as f:
        f.attrs.update({"extractor": "synthetic", "unit": "um",
                        "tile_size_um": size0 * mpp, "tile_size_px": 224,
                        "weights": "random"})  # not STAMP's: lets the model take the file
        f["feats"] = x.astype(np.float16)
        f["coords"] = coords * mpp
    r = cli("classify", "--features", stamp, "--model", tmp_path / "m" / "model.pt", "--out",
            tmp_path / "cs", "--slides", slides)
    assert r.exit_code == 0, r.output
    with h5py.File(tmp_path / "cs" / "attention" / "cmu.h5") as f:
        assert np.abs(f["coords"][:] - coords).max() <= 1  # level-0 px again, not µm
    gj = json.loads((tmp_path / "cs" / "geojson" / "cmu.geojson").read_text())
    ring = np.array(gj["features"][0]["geometry"]["coordinates"][0])
    assert np.abs(ring[2] - ring[0] - size0).max() <= 1
    # without the slide there is no MPP: no coords at all rather than µm taken for px
    r = cli("classify", "--features", stamp, "--model", tmp_path / "m" / "model.pt", "--out",
            tmp_path / "cn")
    assert r.exit_code == 0, r.output
    with h5py.File(tmp_path / "cn" / "attention" / "cmu.h5") as f:
        assert f["coords"].shape == (0, 2) and len(f["attention"]) == n
