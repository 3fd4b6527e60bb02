"""Batch behaviour: bad slides, resume, kill and restart, shards, bad usage."""

import os
import signal
import socket
import subprocess
import sys
import time

from wsi_embed.h5io import COORDS_SCHEMA, TMP_SUFFIX, check_output, remove_stale_tmp

from .conftest import CMU, DICOM, cli, copy, dicom_series, last_run, small_slide


def rows(out):
    """What the last `tile` run into `out` did."""
    return last_run(out / "tile_report.csv")


def test_a_dicom_slide_stored_as_a_series_of_files_is_one_slide(tmp_path):
    """OpenSlide opens a whole DICOM series from any of its files, so a file per job would do
    each slide once per level under different ids. One job per series, named after (and
    reading) its level-0 file; a folder may hold several such slides."""
    folder, out = tmp_path / "in", tmp_path / "out"
    case = dicom_series(folder / "caseA")
    mixed = (dicom_series(folder / "mixed", (1, 2), new_series=True)
             + dicom_series(folder / "mixed", (1, 4), new_series=True))
    copy(DICOM, folder / "single" / "bone.dcm")  # a one-file slide keeps its file's name
    r = cli("tile", folder, "--recursive", "--out", out, "--slide-mpp", "0.5", "--tissue",
            "none", "--num-workers", "0")
    assert r.exit_code == 0, r.output
    rep = rows(out)
    assert sorted(rep) == sorted([case[0].stem, mixed[0].stem, mixed[2].stem, "bone"])
    for level0 in (case[0], mixed[0], mixed[2]):
        assert rep[level0.stem]["path"] == str(level0)
    assert int(rep[case[0].stem]["n_patches"]) == int(rep["bone"]["n_patches"]) > 0


def test_bad_slides_are_reported_and_the_good_one_is_tiled(tmp_path):
    folder = tmp_path / "in"
    copy(CMU, folder / "good.svs")
    (folder / "text.svs").write_text("not a slide at all\n" * 100)
    data = CMU.read_bytes()
    (folder / "truncated.svs").write_bytes(data[: len(data) // 3])
    (folder / "zeiss.czi").write_bytes(b"ZISRAWFILE" + bytes(1000))
    r = cli("tile", folder, "--out", tmp_path / "out", "--num-workers", "2")
    assert r.exit_code == 1
    rep = rows(tmp_path / "out")
    assert set(rep) == {"good", "text", "truncated", "zeiss"}
    assert rep["good"]["status"] == "ok" and int(rep["good"]["n_patches"]) > 20
    for bad in ("text", "truncated", "zeiss"):
        assert rep[bad]["status"] == "failed" and rep[bad]["error"], bad
        assert not (tmp_path / "out" / "coords" / f"{bad}.h5").exists()
    assert "CZI" in rep["zeiss"]["error"]
    assert "3 failed" in r.output


def test_resume_skips_finished_slides_and_overwrite_redoes_them(slide_folder, tmp_path):
    out = tmp_path / "out"
    assert cli("tile", slide_folder, "--out", out, "--num-workers", "0").exit_code == 0
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "coords").glob("*.h5")}
    t0 = time.perf_counter()
    assert cli("tile", slide_folder, "--out", out, "--num-workers", "0").exit_code == 0
    assert time.perf_counter() - t0 < 5
    assert {r["status"] for r in rows(out).values()} == {"skipped"}
    assert mtimes == {p.name: p.stat().st_mtime_ns for p in (out / "coords").glob("*.h5")}
    # other settings on the same outputs: one refusal up front with readable values,
    # nothing overwritten, the report unchanged
    r = cli("tile", slide_folder, "--out", out, "--min-tissue", "0.9", "--num-workers", "0")
    assert r.exit_code == 2 and "--overwrite" in r.output and "np." not in r.output
    assert "tiling_min_tissue=0.25, this run asks 0.9" in r.output
    assert {r["status"] for r in rows(out).values()} == {"skipped"}
    assert mtimes == {p.name: p.stat().st_mtime_ns for p in (out / "coords").glob("*.h5")}
    assert cli("tile", slide_folder, "--out", out, "--overwrite",
               "--num-workers", "0").exit_code == 0
    assert {r["status"] for r in rows(out).values()} == {"ok"}
    assert all(p.stat().st_mtime_ns > mtimes[p.name] for p in (out / "coords").glob("*.h5"))


def test_a_corrupt_output_is_redone_not_taken_for_done(slide_folder, tmp_path):
    out = tmp_path / "out"
    (out / "coords").mkdir(parents=True)
    (out / "coords" / "s1.h5").write_bytes(b"\x89HDF\r\n\x1a\n garbage")
    assert cli("tile", slide_folder, "--out", out, "--num-workers", "0").exit_code == 0
    assert rows(out)["s1"]["status"] == "ok"
    assert check_output(out / "coords" / "s1.h5", COORDS_SCHEMA) is None


def test_sigkill_mid_run_leaves_only_complete_outputs(tmp_path):
    folder = tmp_path / "in"
    for i in range(8):
        small_slide(folder / f"k{i}.svs", 4096, 4096, seed=i)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "wsi_embed.cli", "tile", str(folder), "--out", str(out),
           "--num-workers", "0", "--tissue", "none"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and len(list((out / "coords").glob("k*.h5"))) < 2:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = list((out / "coords").glob("k*.h5"))
    assert 2 <= len(done) < 8, "the kill did not land mid-run"
    for p in done:
        assert check_output(p, COORDS_SCHEMA) is None, p
    assert not (out / "tile_report.csv").exists()  # no report that looks finished
    assert "killed" in cli("status", out).output  # its own report says it never ended
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    rep = rows(out)
    assert sum(r["status"] == "skipped" for r in rep.values()) == len(done)
    assert sum(r["status"] == "ok" for r in rep.values()) == 8 - len(done)
    assert not list((out / "coords").glob(".*"))  # stale temporaries cleaned
    for i in range(8):
        assert check_output(out / "coords" / f"k{i}.h5", COORDS_SCHEMA) is None


def test_stale_temporaries_of_dead_processes_are_removed_live_ones_kept(tmp_path):
    """What a killed run leaves: HDF5 temporaries and PNG ones (`.tmp.png`); a live
    process's and another host's stay."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    gone = [f".a.h5.{host}.{dead.pid}{TMP_SUFFIX}", f".b.png.{host}.{dead.pid}{TMP_SUFFIX}.png"]
    kept = [f".c.h5.{host}.{os.getpid()}{TMP_SUFFIX}", f".d.h5.x{host}.{dead.pid}{TMP_SUFFIX}",
            f".e.png.{host}.{os.getpid()}{TMP_SUFFIX}.png", "f.h5"]
    for name in gone + kept:
        (tmp_path / name).write_bytes(b"x")
    assert remove_stale_tmp(tmp_path) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)


def test_two_shards_cover_every_slide_exactly_once(slide_folder, tmp_path):
    for i in (0, 1):
        r = cli("tile", slide_folder, "--out", tmp_path / f"o{i}", "--shard", f"{i}/2",
                "--num-workers", "0")
        assert r.exit_code == 0, r.output
    a, b = set(rows(tmp_path / "o0")), set(rows(tmp_path / "o1"))
    assert a.isdisjoint(b) and a | b == {f"s{i}" for i in range(5)}
    assert len(a) == 3 and len(b) == 2


def test_bad_usage_is_a_clear_error_before_any_work(tmp_path, slide_folder):
    out = tmp_path / "out"
    copy(CMU, tmp_path / "dup" / "a" / "x.svs")
    copy(CMU, tmp_path / "dup" / "b" / "x.svs")
    r = cli("tile", tmp_path / "dup", "--recursive", "--out", out)
    assert r.exit_code == 2 and "duplicate slide id 'x'" in r.output
    assert "a/x.svs" in r.output and "b/x.svs" in r.output

    (tmp_path / "empty").mkdir()
    r = cli("tile", tmp_path / "empty", "--out", out)
    assert r.exit_code == 2 and "no slides" in r.output and "empty" in r.output

    bad_csv = tmp_path / "list.csv"
    bad_csv.write_text("file,mpp\nx.svs,0.5\n")
    r = cli("tile", "--slide-list", bad_csv, "--out", out)
    assert r.exit_code == 2 and "no 'path' column" in r.output

    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the output folder should be")
    r = cli("tile", slide_folder, "--out", blocker / "out")
    assert r.exit_code == 2 and "cannot be written" in r.output
    assert not out.exists()

    r = cli("tile", slide_folder, "--out", out, "--shard", "2/2")
    assert r.exit_code == 2 and "--shard" in r.output
