"""Cluster runs: a SLURM array script whose tasks are `extract --shard i/n` (each task its
deterministic share of the slides; reruns skip finished slides), and the settings of the
Snakemake workflow shipped in `snakemake/` (its rules call the same commands)."""

from __future__ import annotations

import csv
import io
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


# -- Snakemake ---------------------------------------------------------------------------
#: the workflow's own settings (config.yaml's `workflow:` section) and their defaults
WORKFLOW_KEYS = {"slides": [], "slide_list": None, "recursive": False, "out": "out",
                 "encoders": [], "jobs": "slide", "shards": 1, "wsi_embed": "wsi-embed",
                 "resources": {}}
SNAKEMAKE_DIR = Path(__file__).parent / "snakemake"


def init_workflow(folder: Path) -> list[Path]:
    """Copy the Snakefile and its config template into `folder` (never over a file)."""
    folder.mkdir(parents=True, exist_ok=True)
    made = []
    for name in ("Snakefile", "config.yaml"):
        dest = folder / name
        if dest.exists():
            raise UsageError(f"{dest} exists; remove it or choose another folder")
        dest.write_text((SNAKEMAKE_DIR / name).read_text())
        made.append(dest)
    return made


class WorkflowSettings:
    """config.yaml as the Snakefile uses it: the slides and the jobs they make, the rules'
    resources, and each rule's command line. Options of the commands themselves are a
    wsi-embed config file (the `wsi_embed:` section), checked here and passed as --config."""

    def __init__(self, config: dict) -> None:
        from .run_config import _closest

        wf = dict(config.get("workflow") or {})
        for key in wf:
            if key not in WORKFLOW_KEYS:
                raise UsageError(f"config.yaml: [workflow] has no setting {key!r}"
                                 f"{_closest(key, WORKFLOW_KEYS)}")
        for key in config:
            if key not in ("workflow", "wsi_embed"):
                raise UsageError(f"config.yaml: unknown section {key!r}"
                                 f"{_closest(key, ('workflow', 'wsi_embed'))}")
        s = {**WORKFLOW_KEYS, **wf}
        self.out = str(s["out"])
        self.slides = [str(p) for p in ([s["slides"]] if isinstance(s["slides"], str)
                                        else s["slides"])]
        self.slide_list = s["slide_list"]
        self.recursive = bool(s["recursive"])
        self.encoders = list(s["encoders"])
        if not self.encoders:
            raise UsageError("config.yaml: [workflow] encoders is empty; name at least one "
                             "(`wsi-embed encoders` lists them)")
        if s["jobs"] not in ("slide", "shard"):
            raise UsageError(f"config.yaml: [workflow] jobs {s['jobs']!r}: slide or shard")
        self.jobs, self.shards = s["jobs"], int(s["shards"])
        if self.shards < 1:
            raise UsageError("config.yaml: [workflow] shards must be at least 1")
        self.wsi_embed, self.resources_cfg = str(s["wsi_embed"]), dict(s["resources"] or {})
        self.options = dict(config.get("wsi_embed") or {})
        self.train = self.options.get("train")
        self.config_file = Path(self.out) / "workflow" / "wsi-embed.yaml"

    @classmethod
    def from_config(cls, config: dict) -> WorkflowSettings:
        """Checked settings, with the commands' options written where --config reads them."""
        self = cls(config)
        self.write_options()
        if self.jobs == "slide":
            for job in self.slide_jobs():
                self.write_slide_row(job)
        return self

    def write_options(self) -> None:
        import typer.main
        import yaml

        from .cli import app
        from .run_config import default_map

        default_map(typer.main.get_command(app), self.options, Path("config.yaml"))
        text = yaml.safe_dump(self.options, sort_keys=False)
        if not self.config_file.exists() or self.config_file.read_text() != text:
            self.config_file.parent.mkdir(parents=True, exist_ok=True)
            self.config_file.write_text(text)

    # -- slides and jobs ----------------------------------------------------------------
    def slide_jobs(self):
        from .batch import discover

        return discover([Path(p) for p in self.slides],
                        Path(self.slide_list) if self.slide_list else None, self.recursive)

    @property
    def parts(self) -> list[str]:
        """Slide ids (a job per slide) or shard numbers (a job per shard)."""
        if self.jobs == "slide":
            return sorted(j.slide_id for j in self.slide_jobs())
        return [str(k) for k in range(self.shards)]

    def extract_output(self, encoder: str, part: str) -> str:
        if self.jobs == "slide":
            return f"{self.out}/features/{encoder}/{part}.h5"
        return f"{self.out}/workflow/done/extract-{encoder}-{part}-of-{self.shards}"

    def slide_row(self, slide_id: str) -> Path:
        return Path(self.out) / "workflow" / "slides" / f"{slide_id}.csv"

    def write_slide_row(self, job) -> None:
        """A one-row slide list: the slide's id, path, MPP and tissue choice as given;
        rewritten only when that changes (its time is the tile rule's input time)."""
        row = {"slide_id": job.slide_id, "path": str(job.path.resolve()),
               "mpp": "" if job.mpp is None else repr(job.mpp),
               "tissue": str(job.tissue_mask.resolve()) if job.tissue_mask else job.tissue or ""}
        buf = io.StringIO()
        w = csv.DictWriter(buf, list(row))
        w.writeheader()
        w.writerow(row)
        path = self.slide_row(job.slide_id)
        if not path.exists() or path.read_text() != buf.getvalue():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(buf.getvalue())

    # -- rules --------------------------------------------------------------------------
    def shard_args(self) -> str:
        """The slides as given and this job's share (`part` is the shard number)."""
        args = list(self.slides)
        if self.slide_list:
            args += ["--slide-list", self.slide_list]
        if self.recursive:
            args.append("--recursive")
        return (_braces(" ".join(shlex.quote(a) for a in args))
                + f" --shard {{wildcards.part}}/{self.shards}")

    def command(self, name: str, rest: str, out: bool = True) -> str:
        """A rule's shell line: `rest` may hold Snakemake's {input}/{wildcards} fields; the
        constant parts are quoted and their braces escaped."""
        head = [*shlex.split(self.wsi_embed), name, "--config", str(self.config_file)]
        if out:
            head += ["--out", self.out]
        return _braces(" ".join(shlex.quote(a) for a in head)) + " " + rest

    def resources(self, rule: str) -> dict:
        got = self.resources_cfg.get(rule) or {}
        if not isinstance(got, dict):
            raise UsageError(f"config.yaml: [workflow] resources.{rule} must map names to "
                             "values (mem_mb, runtime, cpus_per_task, gpu, ...)")
        return dict(got)


def _braces(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")
