"""The SLURM array script: its tasks' shares cover every slide exactly once."""

from __future__ import annotations

import os
import subprocess
import sys

from wsi_embed.batch import discover, parse_shard, take_shard

from .conftest import cli


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
