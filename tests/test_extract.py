"""`wsi-embed extract`: the pipeline's correctness on CPU (the same code runs on CUDA)."""

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import torch

from wsi_embed.encoders import PRESETS
from wsi_embed.h5io import FEATURES_SCHEMA, check_output
from wsi_embed.slides import open_slide

from .conftest import (
    CMU,
    MEANS_CLI,
    MEANS_PRESET,
    NDPI,
    ROOT,
    cli,
    copy,
    last_run,
    patch_means,
    small_slide,
)


def feats(out, enc, slide_id):
    with h5py.File(out / "features" / enc / f"{slide_id}.h5") as f:
        return f["features"][:], f["coords"][:], dict(f.attrs), dict(f["coords"].attrs)


def report(out, enc):
    """What the last `extract` run into `out` did."""
    return last_run(out / f"extract_report_{enc}.csv")


def test_row_i_of_features_belongs_to_row_i_of_coords(tmp_path, means_encoder):
    folder = tmp_path / "in"
    copy(CMU, folder / "cmu.svs")
    copy(NDPI, folder / "ndpi.ndpi")  # read at level 1 and resized: the non-native path
    r = cli("extract", folder, "--out", tmp_path / "o", "--encoder", means_encoder,
            "--weights", "random", "--tissue", "none", "--batch-size", "8",
            "--num-workers", "2")
    assert r.exit_code == 0, r.output
    for sid in ("cmu", "ndpi"):
        f, coords, attrs, cattrs = feats(tmp_path / "o", means_encoder, sid)
        assert len(f) == len(coords) > 50
        lvl, read = int(cattrs["patch_level"]), int(cattrs["read_size"])
        with open_slide(folder / (sid + (".svs" if sid == "cmu" else ".ndpi"))) as s:
            ref = np.stack([s.read_region(x, y, lvl, read, read).reshape(-1, 3).mean(0) / 255
                            for x, y in coords])
        assert np.abs(f - ref).max() < 0.01, sid
        assert ref.std(0).max() > 0.03  # the patches differ, so a row swap would show
        assert attrs["weights"] == "random" and attrs["schema"] == FEATURES_SCHEMA


def test_features_do_not_depend_on_batch_size_or_worker_count(tmp_path):
    outs = []
    for i, (batch, workers) in enumerate([(4, 0), (32, 2)]):
        out = tmp_path / f"o{i}"
        r = cli("extract", CMU, "--out", out, "--encoder", "kaiko_vits16", "--weights",
                "random", "--batch-size", str(batch), "--num-workers", str(workers),
                "--target-mpp", "1.0")  # ~20 patches: still several batches of 4
        assert r.exit_code == 0, r.output
        outs.append(feats(out, "kaiko_vits16", "CMU-1-Small-Region"))
    (fa, ca, _, _), (fb, cb, _, _) = outs
    assert np.array_equal(ca, cb) and len(ca) > 8
    np.testing.assert_allclose(fa, fb, rtol=1e-4, atol=1e-5)


def test_real_architecture_on_the_sample_slide(tmp_path):
    r = cli("extract", CMU, "--out", tmp_path, "--encoder", "ctranspath", "--weights",
            "random", "--dtype", "float16", "--num-workers", "0")
    assert r.exit_code == 0, r.output
    f, coords, attrs, _ = feats(tmp_path, "ctranspath", "CMU-1-Small-Region")
    assert f.dtype == np.float16 and f.shape == (len(coords), 768) and len(coords) > 20
    assert np.isfinite(f).all() and f.std() > 0
    assert attrs["encoder"] == "ctranspath" and attrs["embed_dim"] == 768
    assert (tmp_path / "coords" / "CMU-1-Small-Region.h5").exists()  # tiled on the fly
    row = report(tmp_path, "ctranspath")["CMU-1-Small-Region"]
    assert row["status"] == "ok" and float(row["patches_per_s"]) > 0
    # the run says what it made, and that random weights are for tests
    assert f"{len(coords)} patches" in r.output and "× 768 float16" in r.output
    assert str(tmp_path / "features" / "ctranspath") in r.output
    assert "for testing the pipeline only" in r.output


def test_bad_and_empty_slides_do_not_stop_the_batch(tmp_path, means_encoder):
    folder = tmp_path / "in"
    copy(CMU, folder / "good.svs")
    (folder / "bad.svs").write_text("not a slide")
    from wsi_embed.synthetic import write_slide

    write_slide(folder / "blank.svs", 1024, 1024, 0.5,
                lambda x, y, w, h: np.full((h, w, 3), 243, np.uint8))
    r = cli("extract", folder, "--out", tmp_path / "o", "--encoder", means_encoder,
            "--weights", "random", "--num-workers", "0")
    assert r.exit_code == 1
    rep = report(tmp_path / "o", means_encoder)
    assert rep["good"]["status"] == "ok" and rep["blank"]["status"] == "ok"
    assert rep["bad"]["status"] == "failed" and rep["bad"]["error"].startswith("tiling:")
    f, coords, _, _ = feats(tmp_path / "o", means_encoder, "blank")
    assert f.shape == (0, 3) and coords.shape == (0, 2)
    # resume: nothing redone; other weights would be refused, --overwrite redoes
    r = cli("extract", folder / "good.svs", "--out", tmp_path / "o", "--encoder",
            means_encoder, "--weights", "random", "--num-workers", "0")
    assert r.exit_code == 0 and report(tmp_path / "o", means_encoder)["good"]["status"] == \
        "skipped"


def test_coords_at_another_resolution_or_patch_size_are_refused(tmp_path, means_encoder):
    """`tile --target-mpp 1.0` then `extract` at the default 0.5 µm/px must not embed the
    1.0 µm/px patches as if they were 0.5: refused before any work, naming the folder, both
    values and the fix."""
    slide = small_slide(tmp_path / "s.svs")
    out = tmp_path / "o"
    assert cli("tile", slide, "--out", out, "--target-mpp", "1.0", "--tissue",
               "none").exit_code == 0
    base = ("extract", slide, "--out", out, "--encoder", means_encoder, "--weights", "random",
            "--num-workers", "0")
    for extra, words in (((), ["tiling_target_mpp=1.0, this run asks 0.5",
                               "pass --target-mpp 1.0"]),
                         (("--target-mpp", "1.0", "--patch-size", "224"),
                          ["tiling_patch_size=256", "pass --patch-size 256"])):
        r = cli(*base, *extra)
        assert r.exit_code == 2, r.output
        assert str(out / "coords") in r.output and all(w in r.output for w in words), r.output
        assert not (out / "features" / means_encoder / "s.h5").exists()
    r = cli(*base, "--magnification", "10")  # 10x = 1.0 µm/px: the coords are used
    assert r.exit_code == 0, r.output
    f, coords, _, cattrs = feats(out, means_encoder, "s")
    assert len(f) == len(coords) > 0 and float(cattrs["target_mpp"]) == 1.0


def tiled_slides(tmp_path, n: int, side: int):
    """n small slides k0.. in tmp_path/in, tiled whole into tmp_path/o: (folder, out)."""
    folder, out = tmp_path / "in", tmp_path / "o"
    for i in range(n):
        small_slide(folder / f"k{i}.svs", side, side, seed=i)
    assert cli("tile", folder, "--out", out, "--tissue", "none",
               "--num-workers", "0").exit_code == 0
    return folder, out


def test_sigkill_mid_extract_then_resume(tmp_path):
    folder, out = tiled_slides(tmp_path, 5, 2048)
    cmd = [*MEANS_CLI, "extract", str(folder), "--out", str(out), "--encoder", "test_means",
           "--weights", "random", "--num-workers", "0", "--batch-size", "8"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    fdir = out / "features" / "test_means"
    deadline = time.time() + 120
    while time.time() < deadline and not list(fdir.glob("k*.h5")):
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)  # now mid-way through a later slide
    proc.wait()
    done = list(fdir.glob("k*.h5"))
    assert 1 <= len(done) < 5
    for p in done:
        assert check_output(p, FEATURES_SCHEMA) is None
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    rep = report(out, "test_means")
    assert sum(v["status"] == "skipped" for v in rep.values()) == len(done)
    for i in range(5):
        assert check_output(fdir / f"k{i}.h5", FEATURES_SCHEMA) is None
        with h5py.File(fdir / f"k{i}.h5") as f:  # the right patches, in order
            coords, got = f["coords"][:], f["features"][:]
        assert got.shape == (64, 3)
        assert np.abs(got - patch_means(folder / f"k{i}.svs", coords, 0, 256)).max() < 0.01
    assert not list(fdir.glob(".*"))


def _reader_pids() -> list[int]:
    """This process's reader processes (spawned children; not the resource tracker)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmd = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == os.getpid() and b"spawn_main" in cmd:
            pids.append(int(stat.parent.name))
    return pids


def test_a_reader_killed_mid_run_costs_no_slide(tmp_path, means_encoder, quick_checks):
    """SIGKILL one reader process (as the OOM killer would) while slides are being read: the
    readers are restarted, what the dead one was reading is read again, and every slide ends
    with the right features in that same run."""
    folder, out = tiled_slides(tmp_path, 4, 4096)
    fdir = out / "features" / means_encoder
    killed = []

    def kill_a_reader():
        deadline = time.time() + 120
        while time.time() < deadline and not list(fdir.glob("k*.h5")):  # a slide done
            time.sleep(0.01)
        pids = _reader_pids()
        if pids:
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])

    killer = threading.Thread(target=kill_a_reader)
    killer.start()
    r = cli("extract", folder, "--out", out, "--encoder", means_encoder, "--weights",
            "random", "--num-workers", "2", "--batch-size", "32")
    killer.join()
    assert killed and "restarting the readers" in r.output, r.output
    assert r.exit_code == 0, r.output
    rep = report(out, means_encoder)
    assert sorted(rep) == [f"k{i}" for i in range(4)]
    assert all(row["status"] == "ok" for row in rep.values()), rep
    for i in range(4):
        f, coords, _, cattrs = feats(out, means_encoder, f"k{i}")
        read = int(cattrs["read_size"])
        with open_slide(folder / f"k{i}.svs") as sl:
            ref = np.stack([sl.read_region(x, y, 0, read, read).reshape(-1, 3).mean(0) / 255
                            for x, y in coords])
        assert len(f) == 256 and np.abs(f - ref).max() < 0.01  # no slot was overwritten


def test_two_devices_share_the_slides_and_match_one_device(tmp_path, slide_folder,
                                                           means_encoder):
    """--devices cpu,cpu: one process per device pulling slides from a shared queue."""
    feats = {}
    for name, extra in (("one", ()), ("two", ("--devices", "cpu,cpu"))):
        out = tmp_path / name
        r = cli("extract", slide_folder, "--out", out, "--encoder", means_encoder, "--weights",
                "random", "--num-workers", "0", "--batch-size", "16", "--device", "cpu",
                *extra)
        assert r.exit_code == 0, r.output
        rows = report(out, means_encoder)
        assert sorted(rows) == [f"s{i}" for i in range(5)]  # each slide once
        assert all(row["status"] == "ok" for row in rows.values())
        feats[name] = {s: feats_of(out, means_encoder, s) for s in rows}
    for s, (a, coords) in feats["one"].items():
        with open_slide(slide_folder / f"{s}.svs") as sl:  # the right patches, in order
            ref = np.stack([sl.read_region(x, y, 0, 256, 256).reshape(-1, 3).mean(0) / 255
                            for x, y in coords])
        assert np.abs(a - ref).max() < 0.01 and ref.std(0).max() > 0.01
        np.testing.assert_allclose(feats["two"][s][0], a, rtol=1e-4, atol=1e-4)
    # a second run finds everything done, whatever device made it
    r = cli("extract", slide_folder, "--out", tmp_path / "two", "--encoder", means_encoder,
            "--weights", "random", "--devices", "cpu,cpu", "--num-workers", "0")
    assert r.exit_code == 0 and all(row["status"] == "skipped"
                                    for row in report(tmp_path / "two", means_encoder).values())
    r = cli("extract", slide_folder, "--out", tmp_path / "x", "--encoder", "ctranspath",
            "--devices", "cuda:7")
    assert r.exit_code == 2 and "cuda:7" in r.output


def feats_of(out, enc, slide_id):
    f, coords, _, _ = feats(out, enc, slide_id)
    return f, coords


def test_coords_dir_shards_refusal_of_other_settings_and_overwrite(tmp_path, means_encoder):
    """--coords DIR (a `tile` output folder or its coords folder) is used as is, nothing is
    tiled again; --shard i/n extracts a deterministic share; features made with other
    weights or precision are refused up front in one line (nothing written, no failed rows)
    until --overwrite."""
    folder, tiled = tiled_slides(tmp_path, 3, 768)
    out = tmp_path / "x"
    fdir = out / "features" / means_encoder
    base = ("extract", folder, "--out", out, "--encoder", means_encoder, "--num-workers", "0")
    r = cli(*base, "--weights", "random", "--coords", tiled, "--shard", "0/2")
    assert r.exit_code == 0, r.output
    assert sorted(report(out, means_encoder)) == ["k0", "k2"] == sorted(
        p.stem for p in fdir.glob("*.h5"))
    r = cli(*base, "--weights", "random", "--coords", tiled / "coords", "--shard", "1/2")
    assert r.exit_code == 0, r.output
    assert sorted(report(out, means_encoder)) == ["k1"]
    assert not (out / "coords").exists()  # nothing was tiled again
    for i in range(3):
        f, coords, _, _ = feats(out, means_encoder, f"k{i}")
        assert np.abs(f - patch_means(folder / f"k{i}.svs", coords, 0, 256)).max() < 0.01
    mtimes = {p.name: p.stat().st_mtime_ns for p in fdir.glob("*.h5")}

    weights = tmp_path / "w.pth"  # the channel-mean encoder has no parameters: any file
    torch.save({}, weights)
    r = cli(*base, "--weights", weights, "--coords", tiled)
    assert r.exit_code == 2 and "3 of 3 slides already have features" in r.output
    assert "weights='random'" in r.output and "--overwrite" in r.output and str(fdir) in r.output
    assert {row["status"] for row in report(out, means_encoder).values()} == {"ok"}
    with h5py.File(fdir / "k1.h5", "r+") as f:  # as if made on a GPU in bf16
        f.attrs["precision"] = "bf16"
    mtimes["k1.h5"] = (fdir / "k1.h5").stat().st_mtime_ns
    r = cli(*base, "--weights", "random", "--coords", tiled)
    assert r.exit_code == 2 and "1 of 3 slides" in r.output and "precision='bf16'" in r.output
    r = cli(*base, "--weights", "random", "--coords", tiled, "--dtype", "float16")
    assert r.exit_code == 2 and "feature_dtype='float32', this run asks 'float16'" in r.output
    assert mtimes == {p.name: p.stat().st_mtime_ns for p in fdir.glob("*.h5")}

    r = cli(*base, "--weights", weights, "--coords", tiled, "--overwrite")
    assert r.exit_code == 0, r.output
    assert {row["status"] for row in report(out, means_encoder).values()} == {"ok"}
    for p in fdir.glob("*.h5"):
        assert p.stat().st_mtime_ns > mtimes[p.name]
        with h5py.File(p) as f:
            assert f.attrs["weights"].startswith("sha256:") and f.attrs["precision"] == "fp32"


def test_progress_counts_patches_over_all_slides(tmp_path, means_encoder, monkeypatch):
    """On a terminal a bar of patches done out of every slide's patches (slides done beside
    it); without one, log lines with the same counts and the rate."""
    import wsi_embed.report as run_report

    folder, out = tiled_slides(tmp_path, 2, 768)  # 9 patches each
    bars = []

    class Bar:
        def __init__(self, total, desc, unit="slide", leave=True):
            self.total, self.unit, self.done, self.postfix = total, unit, 0, ""
            bars.append(self)

        def update(self, n):
            self.done += n

        def set_postfix_str(self, s):
            self.postfix = s

        def close(self):
            pass

    monkeypatch.setattr(run_report, "progress_bar", Bar)
    base = ("extract", folder, "--out", out, "--encoder", means_encoder, "--weights",
            "random", "--num-workers", "0", "--batch-size", "4")
    r = cli(*base)
    assert r.exit_code == 0, r.output
    bar = bars[-1]  # counted in slides until the patches to read are known
    assert (bar.unit, bar.total, bar.done, bar.postfix) == ("patch", 18, 18, "slides 2/2")
    monkeypatch.undo()
    monkeypatch.setitem(PRESETS, means_encoder, MEANS_PRESET)
    monkeypatch.setattr(run_report, "LOG_EVERY", 0.0)
    r = cli(*base, "--overwrite")
    assert r.exit_code == 0
    lines = [ln for ln in r.output.splitlines() if "patches/s" in ln and "slides," in ln]
    assert lines and "2/2 slides, 18/18 patches" in lines[-1], r.output


def test_edge_pad_patches_read_white_past_the_slide(tmp_path, means_encoder):
    """`--edge pad`: the partial last column and row are embedded, with white (glass) past
    the slide's edge, through the fast reader as through OpenSlide."""
    p = small_slide(tmp_path / "in" / "edge.svs", 2200, 1700)
    out = tmp_path / "o"
    r = cli("extract", p, "--out", out, "--encoder", means_encoder, "--weights", "random",
            "--tissue", "none", "--edge", "pad", "--num-workers", "0")
    assert r.exit_code == 0, r.output
    f, coords, _, _ = feats(out, means_encoder, "edge")
    assert len(coords) == 9 * 7 and coords[:, 0].max() == 2048 and coords[:, 1].max() == 1536
    want = patch_means(p, coords, 0, 256)
    assert np.abs(f - want).max() < 0.01
    corner = (coords[:, 0] == 2048) & (coords[:, 1] == 1536)  # 152 × 164 px of slide
    inside = 152 * 164 / 256**2
    assert np.all(f[corner] > inside * 0.25 + (1 - inside) * 0.99)  # mostly white
