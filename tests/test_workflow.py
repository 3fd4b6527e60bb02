"""Cluster runs: the SLURM array script covers every slide exactly once; the Snakemake
workflow runs end to end and agrees with wsi-embed's resume."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

import h5py
import numpy as np
import yaml

from wsi_embed.batch import discover, parse_shard, take_shard

from .conftest import CMU, MEANS_CLI, ROOT, cli, copy, patch_means


def test_every_slide_is_in_exactly_one_array_task(tmp_path):
    slides = tmp_path / "slides"
    slides.mkdir()
    for i in range(11):
        (slides / f"s{i:02d}.svs").write_bytes(b"x")
    script = tmp_path / "run.sbatch"
    r = cli("workflow", "slurm-array", "--shards", "4", "--script", script, "--logs",
            tmp_path / "logs", "--", "extract", slides, "--out", tmp_path / "out",
            "--encoder", "uni_v1")
    assert r.exit_code == 0, r.output
    text = script.read_text()
    assert "#SBATCH --array=0-3" in text and (tmp_path / "logs").is_dir()
    # run each task's script with a stand-in for wsi-embed that prints its arguments
    stub = tmp_path / "stub"
    stub.write_text(f"#!{sys.executable}\nimport sys; print(' '.join(sys.argv[1:]))\n")
    stub.chmod(0o755)
    jobs = discover([slides])
    seen = []
    for first in (0, 1):  # arrays numbered from 0 or from 1 (--array=1-4)
        for k in range(4):
            env = {**os.environ, "WSI_EMBED": str(stub), "SLURM_ARRAY_TASK_ID": str(first + k),
                   "SLURM_ARRAY_TASK_MIN": str(first), "SLURM_ARRAY_TASK_COUNT": "4"}
            out = subprocess.run(["bash", str(script)], env=env, capture_output=True,
                                 text=True, check=True).stdout.split()
            assert out[:2] == ["extract", str(slides)] and "--encoder" in out
            shard = parse_shard(out[out.index("--shard") + 1])
            seen += [j.slide_id for j in take_shard(jobs, shard)]
    assert sorted(seen) == sorted([j.slide_id for j in jobs] * 2)  # each once per numbering
    r = cli("workflow", "slurm-array", "--shards", "2", "--script", script, "--", "extract",
            slides, "--shard", "0/2")
    assert r.exit_code == 2 and "leave --shard out" in r.output


def _snakemake(wf, *args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # the stand-in encoder lives in tests/
    return subprocess.run([sys.executable, "-m", "snakemake", "--cores", "2", "--directory",
                           str(wf), "-s", str(wf / "Snakefile"), *args], env=env,
                          capture_output=True, text=True)


def test_the_snakemake_workflow_tiles_and_extracts_then_has_nothing_to_do(tmp_path):
    """`workflow init`, then Snakemake's local executor on the sample slide with the
    channel-mean encoder: features of the right patches; a dry run then finds nothing to do;
    the train rule and shard jobs are wired; a typo in config.yaml is one line."""
    wf = tmp_path / "wf"
    r = cli("workflow", "init", wf)
    assert r.exit_code == 0, r.output
    copy(CMU, wf / "slides" / CMU.name)
    config = yaml.safe_load((wf / "config.yaml").read_text())
    config["workflow"].update(encoders=["test_means"],
                              wsi_embed=" ".join(shlex.quote(a) for a in MEANS_CLI))
    config["wsi_embed"]["extract"].update(weights="random", num_workers=0, device="cpu")
    (wf / "config.yaml").write_text(yaml.safe_dump(config))
    done = _snakemake(wf)
    assert done.returncode == 0, done.stderr[-3000:]
    with h5py.File(wf / "out" / "features" / "test_means" / f"{CMU.stem}.h5") as f:
        coords, feats = f["coords"][:], f["features"][:]
    with h5py.File(wf / "out" / "coords" / f"{CMU.stem}.h5") as f:
        assert np.array_equal(f["coords"][:], coords) and len(coords) > 10
    assert np.abs(feats - patch_means(CMU, coords, 0, 256)).max() < 0.01
    dry = _snakemake(wf, "-n")
    assert dry.returncode == 0 and "Nothing to be done" in dry.stdout + dry.stderr, dry.stderr

    config["wsi_embed"]["train"] = {"labels": "labels.csv", "head": "mean"}
    config["workflow"].update(jobs="shard", shards=2)
    (wf / "config.yaml").write_text(yaml.safe_dump(config))
    dry = _snakemake(wf, "-n", "-p")
    text = dry.stdout + dry.stderr
    assert dry.returncode == 0, text
    for k in (0, 1):
        assert f"--shard {k}/2 --num-workers 0" in text  # tile
        assert f"--shard {k}/2 --encoder test_means" in text  # extract
    assert "train --config out/workflow/wsi-embed.yaml --features out/features/test_means" in text

    config["wsi_embed"]["extract"]["batchsize"] = 4
    (wf / "config.yaml").write_text(yaml.safe_dump(config))
    bad = _snakemake(wf, "-n")
    assert bad.returncode != 0 and "no option 'batchsize' (did you mean 'batch_size'?)" in (
        bad.stdout + bad.stderr)
