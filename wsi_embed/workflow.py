"""Cluster runs: a SLURM array script whose tasks are `extract --shard i/n` (each task its
deterministic share of the slides; reruns skip finished slides)."""

from __future__ import annotations

import shlex
from pathlib import Path

from .errors import UsageError

SBATCH = """#!/usr/bin/env bash
# wsi-embed on a SLURM array: task k of {shards} runs `extract --shard k/{shards}`.
# Submit: sbatch {script}   (rerun the same line to finish what a time limit cut short)
#SBATCH --job-name={job}
#SBATCH --array=0-{last}
#SBATCH --output={logs}/%x-%A_%a.log
{resources}
set -euo pipefail
WSI_EMBED=${{WSI_EMBED:-wsi-embed}}
# the task's share, whatever the array's first index is
K=$((SLURM_ARRAY_TASK_ID - ${{SLURM_ARRAY_TASK_MIN:-0}}))
SHARD="$K/${{SLURM_ARRAY_TASK_COUNT:-{shards}}}"
$WSI_EMBED {command} --shard "$SHARD"
"""


def slurm_array_script(command: list[str], shards: int, logs: Path, job: str = "wsi-embed",
                       partition: str | None = None, gpus: int = 1, cpus: int = 16,
                       mem: str = "64G", time: str = "24:00:00",
                       script: Path = Path("wsi-embed.sbatch")) -> str:
    """The sbatch script: `command` (a wsi-embed command line without --shard) per task."""
    if shards < 1:
        raise UsageError("--shards must be at least 1")
    if "--shard" in command:
        raise UsageError("leave --shard out: each array task sets its own")
    resources = [f"#SBATCH --cpus-per-task={cpus}", f"#SBATCH --mem={mem}",
                 f"#SBATCH --time={time}"]
    if gpus:
        resources.append(f"#SBATCH --gpus={gpus}")
    if partition:
        resources.append(f"#SBATCH --partition={partition}")
    return SBATCH.format(shards=shards, last=shards - 1, logs=logs, job=job, script=script,
                         resources="\n".join(resources),
                         command=" ".join(shlex.quote(c) for c in command))
