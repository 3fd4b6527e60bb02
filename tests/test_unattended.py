"""Unattended batches that cannot be hurt: outputs stay inside --out, nothing stalls or is
orphaned, reports survive shards, concurrent runs and interruptions, and odd inputs fail one
slide with a clear line (issue: "Unattended batches that cannot be hurt")."""

from __future__ import annotations

import csv
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
import torch

from wsi_embed.claims import claim_path
from wsi_embed.report import run_reports
from wsi_embed.synthetic import write_witness_bags

from .conftest import CMU, KIDNEY, MEANS_CLI, ROOT, cli, copy, last_run, small_slide


def merged(path: Path) -> dict[str, dict]:
    with open(path, newline="") as fh:
        return {r["slide_id"]: r for r in csv.DictReader(fh)}


def no_temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(".*") if ".tmp" in p.name or p.name.endswith(".claim")]


# -- security: outputs stay inside --out ------------------------------------------------
@pytest.mark.parametrize("bad_id,rule", [
    ("../../victim", "separator"), ("/tmp/abs", "separator"), ("..", "'.'"),
    ("tab\there", "control character"), ("x" * 300, "longer than"),
])
def test_unsafe_slide_ids_are_a_usage_error_naming_the_row(tmp_path, bad_id, rule):
    victim = tmp_path / "victim.h5"
    with h5py.File(victim, "w") as f:
        f["data"] = np.arange(3)
    before = victim.read_bytes()
    listing = tmp_path / "list.csv"
    with open(listing, "w", newline="") as fh:
        csv.writer(fh).writerows([["path", "slide_id"], [CMU, "fine"], [CMU, bad_id]])
    out = tmp_path / "deep" / "er" / "out"
    r = cli("tile", "--slide-list", listing, "--out", out)
    assert r.exit_code == 2, r.output
    assert "line 3" in r.output and rule in r.output
    assert victim.read_bytes() == before
    assert not (out / "coords").exists()


def test_outputs_that_would_resolve_outside_out_are_refused(tmp_path):
    """A coords folder that is a link to elsewhere: every output path is resolved and
    checked, so the slide fails instead of writing outside --out."""
    elsewhere, out = tmp_path / "elsewhere", tmp_path / "out"
    elsewhere.mkdir()
    out.mkdir()
    (out / "coords").symlink_to(elsewhere)
    r = cli("tile", CMU, "--out", out, "--num-workers", "0")
    assert r.exit_code == 1
    (row,) = last_run(out / "tile_report.csv").values()
    assert "outside the output folder" in row["error"]
    assert not any(elsewhere.iterdir())


def test_ids_from_features_files_and_labels_are_checked(tmp_path):
    bags = write_witness_bags(tmp_path / "f", 8, patches=(5, 8), dim=8)
    labels = tmp_path / "l.csv"
    labels.write_text(bags.labels_csv.read_text() + "../escape,1,p\n")
    r = cli("train", "--features", tmp_path / "f", "--labels", labels, "--out", tmp_path / "m")
    assert r.exit_code == 2 and "line 10" in r.output and "separator" in r.output
    shutil.copy(tmp_path / "f" / "slide_0000.h5", tmp_path / "f" / "bad\x07id.h5")
    r = cli("train", "--features", tmp_path / "f", "--labels", bags.labels_csv, "--out",
            tmp_path / "m")
    assert r.exit_code == 2 and "control character" in r.output and "rename" in r.output


# -- nothing stalls --------------------------------------------------------------------
def lying_tiff(path: Path, width: int, height: int, tiled: bool) -> Path:
    """A small real TIFF whose header is then rewritten to declare width x height px. Tiled,
    every one of the tiles that size needs points at the one real tile (a valid file that
    OpenSlide opens: 7 MB for 200,000 x 200,000 px)."""
    side = 256 if tiled else 64
    data = np.full((side, side, 3), 200, np.uint8)
    kw = ({"tile": (256, 256), "compression": "jpeg", "bigtiff": True} if tiled
          else {"rowsperstrip": 64})
    tifffile.imwrite(path, data, photometric="rgb", resolution=(2e4, 2e4),
                     resolutionunit="CENTIMETER", **kw)
    with tifffile.TiffFile(path, mode="r+b") as tf:
        page = tf.pages[0]
        off, count = page.dataoffsets[0], page.databytecounts[0]
        page.tags["ImageWidth"].overwrite(width)
        page.tags["ImageLength"].overwrite(height)
        if tiled:
            n = -(-width // 256) * -(-height // 256)
            page.tags["TileOffsets"].overwrite(np.full(n, off, np.uint64))
            page.tags["TileByteCounts"].overwrite(np.full(n, count, np.uint64))
    return path


def test_a_lying_header_fails_fast_instead_of_stalling(tmp_path):
    """A 5 KB stripped TIFF declaring 39,000 x 39,000 px (4.5 GB decoded) and a tiled one
    declaring 200,000 x 200,000: each fails before anything is allocated, naming the file."""
    folder = tmp_path / "in"
    folder.mkdir()
    strips = lying_tiff(folder / "strips.tif", 39_000, 39_000, tiled=False)
    tiles = lying_tiff(folder / "tiles.tif", 200_000, 200_000, tiled=True)
    assert strips.stat().st_size < 20_000
    assert tiles.stat().st_size < 10 * 2**20
    r = cli("tile", folder, "--out", tmp_path / "o", "--num-workers", "0")
    assert r.exit_code == 1
    rows = last_run(tmp_path / "o" / "tile_report.csv")
    assert "39000 x 39000 px but holds only" in rows["strips"]["error"]
    for words in ("200000 x 200000 px", "pyramid", "lies about the size"):
        assert words in rows["tiles"]["error"], rows["tiles"]["error"]


def test_max_plain_pixels_refuses_big_plain_images_with_the_fix(tmp_path):
    r = cli("tile", KIDNEY, "--out", tmp_path / "o", "--slide-mpp", "0.5", "--num-workers",
            "0", "--max-plain-pixels", "1000000")
    assert r.exit_code == 1
    (row,) = last_run(tmp_path / "o" / "tile_report.csv").values()
    for words in ("1493 x 901", "--max-plain-pixels 1000000", "vips tiffsave"):
        assert words in row["error"], row["error"]
    assert cli("tile", KIDNEY, "--out", tmp_path / "o", "--slide-mpp", "0.5",
               "--num-workers", "0").exit_code == 0


def test_a_slide_past_its_time_limit_fails_and_its_worker_is_replaced(tmp_path):
    folder = tmp_path / "in"
    for i in range(2):
        small_slide(folder / f"s{i}.svs", 4096, 4096, seed=i)
    r = cli("tile", folder, "--out", tmp_path / "o", "--num-workers", "1",
            "--slide-timeout", "0.01")
    assert r.exit_code == 1
    rows = last_run(tmp_path / "o" / "tile_report.csv")
    for sid in ("s0", "s1"):  # the second ran in a replacement worker, and timed out too
        assert rows[sid]["status"] == "failed" and "--slide-timeout" in rows[sid]["error"]
    assert not list((tmp_path / "o").glob("coords/*.h5"))
    assert cli("tile", folder, "--out", tmp_path / "o", "--num-workers", "1").exit_code == 0


def children_of(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.parametrize("command", ["tile", "extract"])
def test_workers_die_with_their_parent(tmp_path, command):
    """SIGKILL to the main process only: its reader or tile workers must not live on."""
    folder = tmp_path / "in"
    for i in range(4):
        small_slide(folder / f"k{i}.svs", 4096, 4096, seed=i)
    cmd = [*MEANS_CLI, command, str(folder), "--out", str(tmp_path / "o"), "--num-workers",
           "2", "--tissue", "none"]
    if command == "extract":
        cmd += ["--encoder", "test_means", "--weights", "random", "--batch-size", "8"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    kids: list[int] = []
    while time.time() < deadline and len(kids) < 3:  # two workers and a resource tracker
        time.sleep(0.2)
        kids = children_of(proc.pid)
    assert len(kids) >= 3, kids
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 10
    while time.time() < deadline and any(alive(k) for k in kids):
        time.sleep(0.2)
    assert not [k for k in kids if alive(k)]


# -- reports that survive shards, concurrency and interruption ---------------------------
def test_shards_into_one_out_keep_every_row_and_claims_stop_double_work(tmp_path,
                                                                        slide_folder):
    out = tmp_path / "o"
    bad = slide_folder / "s9.svs"
    bad.write_text("not a slide")
    for i in (0, 1):
        cli("tile", slide_folder, "--out", out, "--shard", f"{i}/2", "--num-workers", "0")
    rows = merged(out / "tile_report.csv")
    assert sorted(rows) == [f"s{i}" for i in (0, 1, 2, 3, 4, 9)]  # both shards' rows
    assert rows["s9"]["status"] == "failed" and len(run_reports(out / "tile_report.csv")) == 2
    # a slide another live run is making is left to it; a dead run's claim is taken over
    (out / "coords" / "s1.h5").unlink()
    (out / "coords" / "s3.h5").unlink()
    live = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
    claim_path(out / "coords" / "s1.h5").write_text(json.dumps(live))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    claim_path(out / "coords" / "s3.h5").write_text(json.dumps({**live, "pid": dead.pid}))
    r = cli("tile", slide_folder, "--out", out, "--num-workers", "0")
    now = last_run(out / "tile_report.csv")
    assert now["s1"]["status"] == "skipped" and "another run" in now["s1"]["warning"]
    assert not (out / "coords" / "s1.h5").exists()
    assert now["s3"]["status"] == "ok" and (out / "coords" / "s3.h5").exists()
    assert r.exit_code == 1  # s9
    assert claim_path(out / "coords" / "s1.h5").exists()  # not ours to remove
    assert not claim_path(out / "coords" / "s3.h5").exists()


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT"])
def test_an_interrupted_run_says_so_lists_what_it_did_and_exits_130(tmp_path, how):
    """SIGTERM to the main process (a scheduler's time limit, `kill`); SIGINT to the whole
    process group, reader included (Ctrl-C): one line, no worker tracebacks."""
    folder = tmp_path / "in"
    for i in range(5):
        small_slide(folder / f"k{i}.svs", 2048, 2048, seed=i)
    out = tmp_path / "o"
    assert cli("tile", folder, "--out", out, "--tissue", "none",
               "--num-workers", "0").exit_code == 0
    cmd = [*MEANS_CLI, "extract", str(folder), "--out", str(out), "--encoder", "test_means",
           "--weights", "random", "--num-workers", "0" if how == "SIGTERM" else "1",
           "--batch-size", "4"]
    # a shell's background jobs start with SIGINT ignored, which Python would keep
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    fdir = out / "features" / "test_means"
    deadline = time.time() + 60
    while time.time() < deadline and not list(fdir.glob("k*.h5")):
        time.sleep(0.02)
    if how == "SIGTERM":
        proc.send_signal(signal.SIGTERM)
    else:
        os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert f"Interrupted ({how}); rerun the same command to resume" in err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    (run,) = [p for p in run_reports(out / "extract_report_test_means.csv")
              if p.name.endswith(".interrupted.csv")]
    with open(run, newline="") as fh:
        rows = {r["slide_id"]: r for r in csv.DictReader(fh)}
    done = {p.stem for p in fdir.glob("k*.h5")}
    assert 1 <= len(done) < 5 and sorted(rows) == [f"k{i}" for i in range(5)]
    for sid, row in rows.items():
        assert row["status"] == ("ok" if sid in done else "interrupted"), row
    assert merged(out / "extract_report_test_means.csv") .keys() == rows.keys()
    assert not no_temporaries(out)
    status = cli("status", out).output
    assert f"interrupted {run.name}" in " ".join(status.split())
    assert "extract_report_test_means: 5 slides:" in status and "interrupted" in status
    if how == "SIGINT":
        return  # resuming is the same after either signal
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert {r["status"] for r in merged(out / "extract_report_test_means.csv").values()} == {
        "ok"}
    assert "extract_report_test_means: 5 slides: 5 ok" in cli("status", out).output


def test_a_model_folder_appears_complete_or_not_at_all(tmp_path, monkeypatch):
    """`train` fails after its models are written: no folder under --out; the rerun
    (no --overwrite needed) makes the whole folder."""
    import wsi_embed.train as train

    bags = write_witness_bags(tmp_path / "f", 20, patches=(5, 8), dim=8)
    args = ("train", "--features", tmp_path / "f", "--labels", bags.labels_csv, "--out",
            tmp_path / "m", "--folds", "2", "--epochs", "1")

    def fail(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(train, "summarise", fail)  # after the fold models are written
    with pytest.raises(OSError):
        cli(*args)
    assert not (tmp_path / "m").exists() and not list(tmp_path.glob(".m.*"))
    monkeypatch.undo()
    assert cli(*args).exit_code == 0
    assert {p.name for p in (tmp_path / "m").iterdir()} >= {"model.pt", "metrics.json",
                                                            "config.json", "folds"}


# -- full disks and odd files fail the slide, not the run --------------------------------
def file_size_limit(limit: int):
    """For a child process: writes past `limit` bytes fail with EFBIG (Python ignores
    SIGXFSZ), as on a full disk."""
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def test_a_full_disk_during_extract_fails_that_slide_only(tmp_path, means_encoder):
    folder = tmp_path / "in"
    small_slide(folder / "big.svs", 4096, 4096, seed=1)
    for i in range(2):
        small_slide(folder / f"small{i}.svs", 768, 768, seed=i)
    tiled = tmp_path / "tiled"
    assert cli("tile", folder, "--out", tiled, "--tissue", "none",
               "--num-workers", "0").exit_code == 0
    base = [*MEANS_CLI, "extract", str(folder), "--coords", str(tiled), "--encoder",
            "test_means", "--weights", "random", "--num-workers", "0"]
    assert cli(*base[len(MEANS_CLI):], "--out", tmp_path / "free").exit_code == 0
    sizes = {p.stem: p.stat().st_size for p in (tmp_path / "free").glob("features/*/*.h5")}
    limit = (sizes["big"] + sizes["small0"]) // 2
    out = tmp_path / "full"
    r = subprocess.run([*base, "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                       preexec_fn=file_size_limit(limit))
    assert r.returncode == 1, r.stderr
    # (h5py prints "Exception ignored" for the handles it frees after a failed write)
    assert "wsi_embed/" not in r.stderr, r.stderr  # no traceback through our code
    rows = last_run(out / "extract_report_test_means.csv")
    assert rows["big"]["status"] == "failed" and "cannot write" in rows["big"]["error"]
    assert "free disk space" in rows["big"]["error"]
    assert rows["small0"]["status"] == rows["small1"]["status"] == "ok"
    assert not no_temporaries(out) and not (out / "features/test_means/big.h5").exists()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A model trained on small synthetic bags, and those bags (two of them large)."""
    tmp = tmp_path_factory.mktemp("model")
    bags = write_witness_bags(tmp / "f", 20, patches=(5, 8), dim=8)
    for sid in ("slide_0000", "slide_0001"):  # large bags: large attention files
        big = write_witness_bags(tmp / "big", 1, patches=(3000, 3001), dim=8, seed=7)
        shutil.copy(tmp / "big" / "slide_0000.h5", tmp / "f" / f"{sid}.h5")
        del big
    r = cli("train", "--features", tmp / "f", "--labels", bags.labels_csv, "--out",
            tmp / "m", "--folds", "2", "--epochs", "1")
    assert r.exit_code == 0, r.output
    return tmp / "m" / "model.pt", tmp / "f"


def test_a_full_disk_during_classify_fails_that_slide_only(tmp_path, model):
    model_pt, feats = model
    base = [sys.executable, "-m", "wsi_embed.cli", "classify", "--features", str(feats),
            "--model", str(model_pt)]
    assert cli(*base[3:], "--out", tmp_path / "free").exit_code == 0
    sizes = {p.stem: p.stat().st_size for p in (tmp_path / "free" / "attention").glob("*.h5")}
    limit = (sizes["slide_0000"] + sizes["slide_0002"]) // 2
    out = tmp_path / "full"
    r = subprocess.run([*base, "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                       preexec_fn=file_size_limit(limit))
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    rows = last_run(out / "predictions.csv")
    for sid in ("slide_0000", "slide_0001"):
        assert rows[sid]["status"] == "failed" and "cannot write" in rows[sid]["error"]
    assert sum(row["status"] == "ok" for row in rows.values()) == 18
    assert not no_temporaries(out)


def test_a_truncated_features_file_is_one_failed_row(tmp_path, model):
    model_pt, feats = model
    folder = tmp_path / "f"
    shutil.copytree(feats, folder)
    data = (folder / "slide_0005.h5").read_bytes()
    (folder / "slide_0005.h5").write_bytes(data[: len(data) // 3])
    r = cli("classify", "--features", folder, "--model", model_pt, "--out", tmp_path / "c")
    assert r.exit_code == 1, r.output
    rows = last_run(tmp_path / "c" / "predictions.csv")
    assert rows["slide_0005"]["status"] == "failed"
    assert "slide_0005.h5" in rows["slide_0005"]["error"]
    assert sum(row["status"] == "ok" for row in rows.values()) == 19


def test_labels_are_normalised_missing_ones_dropped_and_encodings_named(tmp_path):
    bags = write_witness_bags(tmp_path / "f", 24, patches=(5, 8), dim=8)
    lines = bags.labels_csv.read_text().splitlines()
    out = [lines[0]]
    for i, line in enumerate(lines[1:]):
        sid, label, patient = line.split(",")
        if i in (3, 7):
            label = ("NaN", "")[i == 7]  # missing: dropped, not a class of its own
        elif label == "0" and i % 4 == 0:
            label = "0.0"  # the same class as "0"
        out.append(f"{sid},{label},{patient}")
    labels = tmp_path / "l.csv"
    labels.write_text("\n".join(out) + "\n")
    r = cli("train", "--features", tmp_path / "f", "--labels", labels, "--out",
            tmp_path / "m", "--folds", "2", "--epochs", "1")
    assert r.exit_code == 0, r.output
    assert "2 rows have no label" in r.output and "lines 5, 9" in r.output
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["n_slides"] == 22 and cfg["model"]["classes"] == ["0", "1"]
    latin = tmp_path / "latin.csv"
    latin.write_bytes(labels.read_bytes().replace(b"slide_0001", "slide_0001é".encode(
        "latin-1")))
    r = cli("train", "--features", tmp_path / "f", "--labels", latin, "--out",
            tmp_path / "m2")
    assert r.exit_code == 2 and "not UTF-8" in r.output and "iconv" in r.output
    assert "Traceback" not in r.output


@pytest.mark.parametrize("coordinate,why", [(1e12, "outside the slide"),
                                            (float("nan"), "not finite"),
                                            (-1e15, "outside the slide")])
def test_a_tissue_mask_that_cannot_be_right_fails_the_slide(tmp_path, coordinate, why):
    ring = [[100, 100], [1500, 100], [coordinate, 1500], [100, 1500], [100, 100]]
    mask = tmp_path / "cmu.geojson"
    mask.write_text(json.dumps({"type": "Polygon", "coordinates": [ring]}).replace(
        "NaN", "NaN"))
    r = cli("tile", CMU, "--out", tmp_path / "o", "--tissue-mask", mask, "--num-workers", "0")
    assert r.exit_code == 1
    (row,) = last_run(tmp_path / "o" / "tile_report.csv").values()
    assert row["status"] == "failed" and str(mask) in row["error"] and why in row["error"]
    assert not (tmp_path / "o" / "coords" / "CMU-1-Small-Region.h5").exists()


def test_what_gave_tracebacks_gives_one_line(tmp_path, model):
    model_pt, feats = model
    # features that are not embeddings: strings, and int8 (silently taken before)
    for dtype in ("S8", "int8"):
        folder = tmp_path / dtype
        shutil.copytree(feats, folder)
        with h5py.File(folder / "slide_0003.h5", "r+") as f:
            x = f["features"][:]
            del f["features"]
            f["features"] = x.astype(dtype)
        r = cli("classify", "--features", folder, "--model", model_pt, "--out",
                tmp_path / f"c_{dtype}")
        assert r.exit_code == 1 and "Traceback" not in r.output
        row = last_run(tmp_path / f"c_{dtype}" / "predictions.csv")["slide_0003"]
        assert "not embeddings" in row["error"] and "re-extract" in row["error"]
    # a model.pt whose description does not fit its weights
    blob = torch.load(model_pt, weights_only=True)
    for name, spec in (("head", {**blob["spec"], "head": "mean"}),
                       ("classes", {**blob["spec"], "classes": ["a", "b", "c"]}),
                       ("key", {**blob["spec"], "colour": "blue"})):
        path = tmp_path / f"model_{name}.pt"
        torch.save({**blob, "spec": spec}, path)
        r = cli("classify", "--features", feats, "--model", path, "--out", tmp_path / "x")
        assert r.exit_code == 2, (name, r.output)
        assert str(path) in r.output and "does not fit its weights" in r.output, r.output
    # reader slots that cannot be allocated
    r = cli("extract", CMU, "--out", tmp_path / "e", "--encoder", "kaiko_vits16",
            "--weights", "random", "--batch-size", "10000000", "--num-workers", "1")
    assert r.exit_code == 2 and "reader slots" in r.output and "--batch-size" in r.output


def test_quiet_surprises_are_named(tmp_path):
    folder = tmp_path / "in"
    copy(CMU, folder / "good.svs")
    channels = [np.full((512, 512), 40 * (c + 1), np.uint8) for c in range(4)]
    with tifffile.TiffWriter(folder / "multiplex.qptiff") as tw:
        for c in channels:
            tw.write(c, tile=(256, 256), photometric="minisblack", compression="jpeg",
                     resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
    (folder / "loop_a.svs").symlink_to(folder / "loop_b.svs")
    (folder / "loop_b.svs").symlink_to(folder / "loop_a.svs")
    out = tmp_path / "o"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = out / f".tile_report.csv.{socket.gethostname()}.{dead.pid}.tmp"
    stale.write_text("slide_id,status\n")
    r = cli("tile", folder, "--out", out, "--num-workers", "0")
    assert r.exit_code == 1
    rows = last_run(out / "tile_report.csv")
    assert rows["good"]["status"] == "ok"
    assert "multiplex" in rows["multiplex"]["error"] and "4" in rows["multiplex"]["error"]
    for sid in ("loop_a", "loop_b"):
        assert rows[sid]["status"] == "failed" and "link" in rows[sid]["error"]
    assert not stale.exists()


def test_a_report_that_cannot_be_written_stops_the_run_with_one_line(tmp_path):
    """The one failure that stops a run: its report. Exit 1, one line naming the file, no
    traceback; finished outputs stay. (Root ignores permissions, so real failures are used:
    a file where the reports folder goes, a folder where the merged report goes, and
    /dev/full, which fails every write with "No space left on device".)"""
    from wsi_embed.report import ReportError, RunReport

    out = tmp_path / "o"
    out.mkdir()
    (out / "reports").write_text("in the way")
    r = cli("tile", CMU, "--out", out, "--num-workers", "0")
    assert r.exit_code == 1 and "cannot write the run report" in r.output
    assert "Traceback" not in r.output and not (out / "coords").exists()
    (out / "reports").unlink()
    (out / "tile_report.csv").mkdir()  # the merged view cannot be renamed into place
    r = cli("tile", CMU, "--out", out, "--num-workers", "0")
    assert r.exit_code == 1 and "cannot write the merged report" in r.output
    assert (out / "coords" / "CMU-1-Small-Region.h5").exists()  # the work is kept
    report = RunReport(tmp_path / "x" / "tile_report.csv", ["slide_id", "status"], "tile")
    report._fh = open("/dev/full", "w")  # noqa: SIM115 - a real full disk under the writer
    report._w = csv.DictWriter(report._fh, report.columns)
    with pytest.raises(ReportError, match="No space left on device"):
        report.add({"slide_id": "a", "status": "ok"})


def test_a_run_ending_during_another_runs_merge_is_not_hidden(tmp_path, monkeypatch):
    """Shards of an array end together. Run A reads the run reports while B still has a
    slide to go; B then ends and rebuilds the merged view; A's rename of its view (built
    from the older read) would come last and hide B's last slide. The interleaving is forced
    by running B's end inside A's read (real files, real reports)."""
    from wsi_embed import report as rep

    merged = tmp_path / "tile_report.csv"
    a = rep.RunReport(merged, ["slide_id", "status"], "tile")
    b = rep.RunReport(merged, ["slide_id", "status"], "tile")
    a.add({"slide_id": "s1", "status": "ok"})
    b.add({"slide_id": "s2", "status": "ok"})
    real, raced = rep.merge_rows, []

    def read_then_b_ends(paths):
        rows = real(paths)
        if not raced:
            raced.append(True)
            b.add({"slide_id": "s3", "status": "ok"})
            b.close()
        return rows

    monkeypatch.setattr(rep, "merge_rows", read_then_b_ends)
    a.close()
    with open(merged, newline="") as fh:
        rows = {r["slide_id"]: r["status"] for r in csv.DictReader(fh)}
    assert raced and rows == {"s1": "ok", "s2": "ok", "s3": "ok"}
