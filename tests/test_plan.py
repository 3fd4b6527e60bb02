"""`wsi-embed plan`: what `tile` will find, before anything runs or is written."""

from __future__ import annotations

import csv
import json

from .conftest import CMU, cli, copy


def test_the_plan_counts_what_tile_then_writes(tmp_path):
    folder = tmp_path / "in"
    copy(CMU, folder / "cmu.svs")
    (folder / "broken.svs").write_bytes(b"not a slide at all")
    r = cli("plan", folder, "--encoder", "kaiko_vitb16", "--dtype", "float16",
            "--device-kind", "nvidia-h100", "--target-mpp", "0.5", "--json")
    assert r.exit_code == 0, r.output
    plan = json.loads(r.output)
    rows = {s["slide_id"]: s for s in plan["slides"]}
    assert rows["broken"]["status"] == "failed" and rows["broken"]["error"]
    assert rows["cmu"]["status"] == "ok" and rows["cmu"]["mpp_source"].startswith("openslide")
    assert not (tmp_path / "in" / "coords").exists() and sorted(p.name for p in folder.iterdir()
                                                               ) == ["broken.svs", "cmu.svs"]
    r = cli("tile", folder / "cmu.svs", "--out", tmp_path / "out", "--target-mpp", "0.5")
    assert r.exit_code == 0, r.output
    with open(tmp_path / "out" / "tile_report.csv") as fh:
        (tiled,) = [row for row in csv.DictReader(fh) if row["slide_id"] == "cmu"]
    assert rows["cmu"]["n_patches"] == int(tiled["n_patches"]) > 0
    assert rows["cmu"]["read_level"] == int(tiled["read_level"])
    t = plan["totals"]
    assert t["slides"] == 2 and t["slides_failed"] == 1 and t["patches"] == int(tiled["n_patches"])
    assert t["features_gb"] == round(t["patches"] * 768 * 2 / 1e9, 4)
    assert t["device_hours"] == round(t["patches"] / t["patches_per_s"] / 3600, 3)
    r = cli("plan", folder / "cmu.svs", "--encoder", "kaiko_vitb16", "--device-kind", "tpu")
    assert r.exit_code == 0 and "device_hours unknown" in r.output, r.output
    r = cli("plan", folder / "cmu.svs", "--encoder", "no_such_model")
    assert r.exit_code == 2 and "unknown --encoder" in r.output
