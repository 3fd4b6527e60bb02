"""The `wsi-embed` command line: parse options, call the library, report. No logic here."""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import sys
from pathlib import Path

import typer

from . import __version__, batch, slides
from .choices import (
    DecodingMethod,
    Edge,
    FeatureNorm,
    HistoGPTSize,
    Pooling,
    RegressionLoss,
    SurvivalLoss,
    Task,
    Threshold,
    TissueMethod,
)
from .errors import UsageError, WsiEmbedError
from .extract.config import Decode, FeatureDtype, Precision, Reader

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="Whole-slide images to patch embeddings and slide-level predictions.")


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"wsi-embed {__version__}")
        raise typer.Exit()


@app.callback()
def _options(ctx: typer.Context,
             version: bool = typer.Option(False, "--version", callback=_show_version,
                                          is_eager=True, help="Print the version and exit."),
             config: Path = typer.Option(None, "--config",
                                         help="TOML/YAML file: one section per command; "
                                              "flags override it.")) -> None:
    """Whole-slide images to patch embeddings and slide-level predictions."""
    ctx.obj = {"config": None, "default_map": {}}
    _CONFIG.clear()
    if config is not None:
        _CONFIG["path"] = str(config)
        from .run_config import default_map, read_config_file

        try:
            dmap = default_map(ctx.command, read_config_file(config), config)
        except WsiEmbedError as e:
            typer.echo(f"Error: {e}", err=True)
            raise typer.Exit(e.exit_code) from None
        ctx.default_map = dmap
        ctx.obj = {"config": str(config), "default_map": dmap}


workflow_app = typer.Typer(no_args_is_help=True,
                           help="Cluster runs: a Snakemake workflow, SLURM array scripts.")
app.add_typer(workflow_app, name="workflow")


@workflow_app.command("init")
def workflow_init(folder: Path = typer.Argument(..., help="Where to write the Snakefile and "
                                                           "its config.yaml.")) -> None:
    """Copy the Snakemake workflow (tile -> extract -> train) and its config template."""
    from .workflow import init_workflow

    try:
        made = init_workflow(folder)
    except WsiEmbedError as e:
        typer.echo(f"Error: {e}", err=True)
        raise typer.Exit(e.exit_code) from None
    typer.echo(f"wrote {', '.join(str(p) for p in made)}: edit config.yaml, then "
               f"`snakemake --directory {folder} --cores 8` (or --executor slurm)")


@workflow_app.command("slurm-array",
                      context_settings={"allow_extra_args": True,
                                        "ignore_unknown_options": True})
def workflow_slurm_array(ctx: typer.Context,
                         shards: int = typer.Option(..., "--shards",
                                                    help="Array tasks (one share each)."),
                         script: Path = typer.Option(Path("wsi-embed.sbatch"), "--script",
                                                     help="Where to write the sbatch script."),
                         logs: Path = typer.Option(Path("logs"), "--logs",
                                                   help="Folder for the tasks' logs."),
                         partition: str = typer.Option(None, "--partition",
                                                       help="SLURM partition."),
                         gpus: int = typer.Option(1, "--gpus", help="GPUs per task."),
                         cpus: int = typer.Option(16, "--cpus", help="CPUs per task."),
                         mem: str = typer.Option("64G", "--mem", help="Memory per task."),
                         time: str = typer.Option("24:00:00", "--time",
                                                  help="Time limit per task.")) -> None:
    """Write an sbatch array script; what follows `--` is the command each task runs,
    e.g. `-- extract /data/slides --out /scratch/run --encoder uni_v1`."""
    from .workflow import slurm_array_script

    command = [a for a in ctx.args if a != "--"]
    if not command:
        typer.echo("Error: give the command after --, e.g. -- extract SLIDES --out OUT "
                   "--encoder NAME", err=True)
        raise typer.Exit(2)
    try:
        text = slurm_array_script(command, shards, logs, partition=partition, gpus=gpus,
                                  cpus=cpus, mem=mem, time=time, script=script)
    except WsiEmbedError as e:
        typer.echo(f"Error: {e}", err=True)
        raise typer.Exit(e.exit_code) from None
    script.write_text(text)
    script.chmod(0o755)
    logs.mkdir(parents=True, exist_ok=True)  # SLURM opens the log files before the script runs
    typer.echo(f"wrote {script}: sbatch {script} (tasks 0-{shards - 1}; logs in {logs}/)")


config_app = typer.Typer(no_args_is_help=True,
                         help="Config files: a template of every option, the resolved view.")
app.add_typer(config_app, name="config")


@config_app.command("init")
def config_init(path: Path = typer.Argument(Path("wsi-embed.yaml"),
                                            help="Where to write the template."),
                force: bool = typer.Option(False, "--force", help="Replace an existing file.")
                ) -> None:
    """Write a commented template of every option of every command, with its default."""
    from .run_config import template

    if path.exists() and not force:
        typer.echo(f"Error: {path} exists; use --force to replace it", err=True)
        raise typer.Exit(2)
    path.write_text(template(typer.main.get_command(app)) + "\n")
    typer.echo(f"wrote {path}")


@config_app.command("show")
def config_show(ctx: typer.Context,
                command: str = typer.Argument(None, help="One command's settings only.")
                ) -> None:
    """The settings a command will run with: the --config file's, else the defaults."""
    from .run_config import resolved

    group = typer.main.get_command(app)
    if command is not None and command not in group.commands:
        typer.echo(f"Error: unknown command {command!r}", err=True)
        raise typer.Exit(2)
    obj = ctx.find_root().obj or {}
    typer.echo(json.dumps({"config": obj.get("config"),
                           "settings": resolved(group, obj.get("default_map", {}), command)},
                          indent=2, default=str))
log = logging.getLogger("wsi_embed")

LOG_LEVEL = typer.Option("INFO", "--log-level", help="DEBUG, INFO, WARNING or ERROR.")
OUT = typer.Option(..., "--out", help="Output folder.")
SLIDE_LIST = typer.Option(None, "--slide-list",
                          help="CSV with path[,slide_id][,mpp][,tissue].")
RECURSIVE = typer.Option(False, "--recursive", help="Search folders recursively.")
EXT = typer.Option(None, "--ext", help="Comma-separated slide extensions for folders.")
TARGET_MPP = typer.Option(None, "--target-mpp", help="Patch resolution in µm/px (default 0.5).")
MAGNIFICATION = typer.Option(None, "--magnification", help="Sugar for MPP: 20 = 0.5 µm/px.")
PATCH_SIZE = typer.Option(256, "--patch-size", help="Patch side in px at the target MPP.")
OVERLAP = typer.Option(0, "--overlap", help="Overlap between patches in px at the target MPP.")
MIN_TISSUE = typer.Option(0.25, "--min-tissue", help="Keep patches with this tissue fraction.")
SLIDE_MPP = typer.Option(None, "--slide-mpp", help="Level-0 MPP for slides (overrides metadata).")
TISSUE = typer.Option(TissueMethod.AUTO, "--tissue",
                      help="auto (detect) or none (whole slide); per slide: a 'tissue' column "
                           "in --slide-list (auto, none, no-pen or a mask file).")
PEN_FILTER = typer.Option(True, "--pen-filter/--no-pen-filter",
                          help="Drop patches mostly covered by pen ink (brightfield slides).")
EDGE = typer.Option(Edge.DROP, "--edge",
                    help="drop: patches wholly inside the slide; pad: also the partial last "
                         "row and column, padded with white.")
TISSUE_MASK = typer.Option(None, "--tissue-mask",
                           help="PNG mask or GeoJSON (level-0 px), or a folder of <slide_id>.*")
OVERWRITE = typer.Option(False, "--overwrite", help="Redo slides whose outputs exist.")
DEVICE = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N.")
SHARD = typer.Option(None, "--shard", help="i/n: process the i-th of n deterministic shares.")
NUM_WORKERS = typer.Option(min(8, os.cpu_count() or 1), "--num-workers",
                           help="Worker processes (0 = in the main process).")
MAX_PLAIN_PIXELS = typer.Option(slides.MAX_PLAIN_PIXELS, "--max-plain-pixels",
                                help="Largest non-pyramidal image (PNG, TIFF in strips) to "
                                     "decode whole; larger ones fail with the fix.")
SLIDE_TIMEOUT = typer.Option(batch.SLIDE_TIMEOUT, "--slide-timeout",
                             help="Seconds one slide may take before it fails and its worker "
                                  "is replaced (worker processes only).")


class _TqdmHandler(logging.StreamHandler):
    """Log lines printed above progress bars instead of through them."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging never raises
            self.handleError(record)


def _setup_logging(level: str) -> None:
    handlers = [_TqdmHandler()] if sys.stderr.isatty() else None
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(levelname)s %(name)s: %(message)s", force=True,
                        handlers=handlers)


#: the exit code of a run stopped by SIGINT or SIGTERM (128 + SIGINT, as shells report it)
INTERRUPTED = 130


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _guarded(fn):
    """A command whose expected errors end it with their one line and their exit code, and
    that a SIGTERM (a scheduler's time limit, `kill`) stops as cleanly as Ctrl-C: outputs in
    progress removed, the reports saying which slides were not done, exit code 130."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        import datetime as dt

        previous = signal.signal(signal.SIGTERM, _interrupt)
        started, code = dt.datetime.now(dt.UTC), 1
        _LAST_COUNTS.clear()
        try:
            fn(*args, **kwargs)
            code = 0
        except typer.Exit as e:
            code = e.exit_code
            raise
        except WsiEmbedError as e:
            typer.echo(f"Error: {e}", err=True)
            code = e.exit_code
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt as e:
            typer.echo(f"Interrupted ({e.args[0] if e.args else 'SIGINT'}); rerun the same "
                       "command to resume (finished slides are kept)", err=True)
            code = INTERRUPTED
            raise typer.Exit(INTERRUPTED) from None
        finally:
            signal.signal(signal.SIGTERM, previous)
            _record(fn.__name__, kwargs, started, code)

    return run


#: the counts of the run report a command finished with (for its run record)
_LAST_COUNTS: dict = {}
#: the --config file of this invocation (for its run record)
_CONFIG: dict = {}


#: commands that only look at a folder: they leave no record in it
_READ_ONLY = {"status", "doctor"}


def _record(command: str, options: dict, started, code: int) -> None:
    from .run_record import write_run_record

    if command in _READ_ONLY:
        return
    write_run_record(command.replace("_", "-"), options, started, code,
                     dict(_LAST_COUNTS) or None, _CONFIG.get("path"))


def _command(fn):
    """A top-level command, guarded."""
    return app.command()(_guarded(fn))


def _target_mpp(target_mpp: float | None, magnification: float | None) -> float:
    from .tiling import magnification_to_mpp

    if target_mpp is not None and magnification is not None:
        raise UsageError("give --target-mpp or --magnification, not both")
    if magnification is not None:
        if magnification <= 0:
            raise UsageError("--magnification must be positive")
        return magnification_to_mpp(magnification)
    return 0.5 if target_mpp is None else target_mpp


@_command
def info(slides: list[Path] = typer.Argument(..., help="Slide files or folders."),
         as_json: bool = typer.Option(False, "--json", help="Print JSON."),
         log_level: str = LOG_LEVEL) -> None:
    """Vendor, size, levels, MPP and objective power of slides."""
    from .batch import discover
    from .errors import SlideError
    from .slides import open_slide, slide_info

    _setup_logging(log_level)
    found, failed = [], 0
    for job in discover(slides):
        try:
            with open_slide(job.path) as s:
                found.append(slide_info(s))
        except (SlideError, OSError) as e:
            failed += 1
            typer.echo(f"{job.path}: cannot be read ({e})", err=True)
    if as_json:
        typer.echo(json.dumps(found[0] if len(found) == 1 else found, indent=2))
    for data in [] if as_json else found:
        typer.echo(f"{data['path']}\n  vendor: {data['vendor']}\n"
                   f"  size: {data['width']} x {data['height']} px\n"
                   f"  mpp: {_num(data['mpp'])} ({data['mpp_source'] or 'not in the file'})\n"
                   f"  objective power: {_num(data['objective_power'])} "
                   f"({data['objective_power_source'] or 'not in the file'})")
        for i, lv in enumerate(data["levels"]):
            typer.echo(f"  level {i}: {lv['width']} x {lv['height']}  downsample "
                       f"{_num(lv['downsample'])}  mpp {_num(lv['mpp'])}")
        typer.echo(f"  associated images: {', '.join(data['associated_images']) or 'none'}")
    if failed:
        raise typer.Exit(1)


def _num(x) -> str:
    """A number as people read it (4 significant digits), or n/a."""
    return "n/a" if x is None else f"{x:.4g}"


def _jobs(slides, slide_list, recursive, ext, shard):
    from .batch import discover, parse_extensions, parse_shard, take_shard

    jobs = discover(slides or [], slide_list, recursive, parse_extensions(ext))
    return take_shard(jobs, parse_shard(shard))


def _tile_params(out: Path, n_slides: int, target_mpp, magnification, patch_size, overlap,
                 min_tissue, tissue: str, tissue_mask: Path | None, slide_mpp: float | None,
                 pen_filter: bool = True, edge: str = "drop", check_out: bool = True):
    """Validate the tiling options shared by `tile` and `extract`, and the output folder."""
    from .batch import check_writable
    from .slides import mpp_problem
    from .tiling import TileParams

    if slide_mpp is not None and mpp_problem(slide_mpp):
        raise UsageError(f"--slide-mpp {slide_mpp:g} {mpp_problem(slide_mpp)}")
    if tissue_mask is not None and not tissue_mask.exists():
        raise UsageError(f"--tissue-mask {tissue_mask} does not exist")
    if tissue_mask is not None and tissue_mask.is_file() and n_slides > 1:
        raise UsageError("--tissue-mask is one file but there are several slides; give a "
                         "folder of <slide_id>.geojson/.png masks")
    try:
        params = TileParams(_target_mpp(target_mpp, magnification), patch_size, overlap,
                            min_tissue, "mask" if tissue_mask else str(tissue), pen_filter,
                            str(edge))
    except ValueError as e:
        raise UsageError(str(e)) from None
    if check_out:
        check_writable(out)
    return params


def _workers(n: int) -> int:
    if n < 0:
        raise UsageError(f"--num-workers {n}: give 0 (read in the main process) or more")
    return n


def _timeout(seconds: float) -> float:
    if not seconds > 0:
        raise UsageError(f"--slide-timeout {seconds:g}: give a positive number of seconds")
    return seconds


def _finish(report) -> None:
    """Log the run's summary; exit code 1 when any slide failed."""
    _LAST_COUNTS.update(report.counts)
    if report.counts["failed"]:
        log.error(report.summary())
        raise typer.Exit(1)
    log.info(report.summary())


@_command
def tile(slides: list[Path] = typer.Argument(None, help="Slide files or folders."),
         out: Path = OUT, slide_list: Path = SLIDE_LIST, recursive: bool = RECURSIVE,
         ext: str = EXT, target_mpp: float = TARGET_MPP, magnification: float = MAGNIFICATION,
         patch_size: int = PATCH_SIZE, overlap: int = OVERLAP, min_tissue: float = MIN_TISSUE,
         slide_mpp: float = SLIDE_MPP, tissue: TissueMethod = TISSUE,
         tissue_mask: Path = TISSUE_MASK, pen_filter: bool = PEN_FILTER, edge: Edge = EDGE,
         overwrite: bool = OVERWRITE, shard: str = SHARD, num_workers: int = NUM_WORKERS,
         slide_timeout: float = SLIDE_TIMEOUT, max_plain_pixels: int = MAX_PLAIN_PIXELS,
         log_level: str = LOG_LEVEL) -> None:
    """Find tissue and lay a grid of patches at a physical resolution."""
    from .tiling import TileConfig, tile_slides

    _setup_logging(log_level)
    jobs = _jobs(slides, slide_list, recursive, ext, shard)
    params = _tile_params(out, len(jobs), target_mpp, magnification, patch_size, overlap,
                          min_tissue, tissue, tissue_mask, slide_mpp, pen_filter, edge)
    _finish(tile_slides(jobs, TileConfig(out, params, slide_mpp, tissue_mask, overwrite,
                                         max_plain_pixels), _workers(num_workers),
                        _timeout(slide_timeout)))


weights_app = typer.Typer(no_args_is_help=True, help="Checkpoints on this machine: fetch "
                                                       "once, then every job reads them.")
app.add_typer(weights_app, name="weights")
WEIGHTS_TO = typer.Option(None, "--to", help="Folder (default: $WSI_EMBED_WEIGHTS).")


@weights_app.command("fetch")
@_guarded
def weights_fetch(names: list[str] = typer.Argument(..., help="Encoder names."),
                  to: Path = WEIGHTS_TO, log_level: str = LOG_LEVEL) -> None:
    """Download official checkpoints into DIR/<name>/<file> with a sha256 manifest."""
    from .weights_store import fetch

    _setup_logging(log_level)
    fetch(list(names), to)


@weights_app.command("list")
@_guarded
def weights_list(to: Path = WEIGHTS_TO) -> None:
    """What the weights folder holds, and whether each file still has its sha256."""
    from .weights_store import listing

    rows = listing(to)
    for r in rows:
        typer.echo(f"{r['name']}\t{r['state']}\t{r['file']}")
    if not rows:
        typer.echo("no checkpoints fetched yet (`wsi-embed weights fetch NAME`)")
    if any(r["state"] != "ok" for r in rows):
        raise typer.Exit(1)


@_command
def doctor(encoder: list[str] = typer.Option([], "--encoder",
                                             help="Check these encoders' weights; repeat."),
           out: Path = typer.Option(None, "--out", help="Check this output folder."),
           hub: bool = typer.Option(True, "--hub/--no-hub",
                                    help="Ask whether the Hugging Face hub answers.")) -> None:
    """Check the installation before a long run: ✓/✗ per check, with the fix."""
    from .doctor import run_doctor
    from .encoders import PRESETS

    unknown = [e for e in encoder if e not in PRESETS]
    if unknown:
        raise UsageError(f"unknown --encoder {', '.join(unknown)}; `wsi-embed encoders` lists "
                         "them")
    checks = run_doctor(list(encoder), out, hub)
    for c in checks:
        typer.echo(c.line())
    if not all(c.ok for c in checks):
        raise typer.Exit(1)


@_command
def plan(slides: list[Path] = typer.Argument(None, help="Slide files or folders."),
         slide_list: Path = SLIDE_LIST, recursive: bool = RECURSIVE, ext: str = EXT,
         encoder: str = typer.Option(None, "--encoder",
                                     help="For the features' size and device hours."),
         dtype: FeatureDtype = typer.Option(FeatureDtype.FLOAT32, "--dtype",
                                            help="The features' dtype (for their size)."),
         device_kind: str = typer.Option(None, "--device-kind",
                                         help="The GPU the run will use (e.g. nvidia-h100); "
                                              "default: this machine's."),
         target_mpp: float = TARGET_MPP, magnification: float = MAGNIFICATION,
         patch_size: int = PATCH_SIZE, overlap: int = OVERLAP, min_tissue: float = MIN_TISSUE,
         slide_mpp: float = SLIDE_MPP, tissue: TissueMethod = TISSUE,
         tissue_mask: Path = TISSUE_MASK, pen_filter: bool = PEN_FILTER, edge: Edge = EDGE,
         shard: str = SHARD, max_plain_pixels: int = MAX_PLAIN_PIXELS,
         as_json: bool = typer.Option(False, "--json", help="Print JSON."),
         log_level: str = typer.Option("WARNING", "--log-level",
                                       help="INFO lists each slide as it is planned.")
         ) -> None:
    """Before a long run: per slide whether it opens, MPP, read level and patch count;
    totals with features size and device hours (nothing is written)."""
    from dataclasses import asdict

    from .plan import device_kind as kind_of
    from .plan import plan_slides, totals
    from .tiling import TileConfig

    _setup_logging(log_level)
    dim = None
    if encoder is not None:
        from .encoders import PRESETS

        if encoder not in PRESETS:
            raise UsageError(f"unknown --encoder {encoder!r}; `wsi-embed encoders` lists them")
        dim = PRESETS[encoder].dim
    jobs = _jobs(slides, slide_list, recursive, ext, shard)
    params = _tile_params(Path("."), len(jobs), target_mpp, magnification, patch_size,
                          overlap, min_tissue, tissue, tissue_mask, slide_mpp, pen_filter, edge,
                          check_out=False)
    rows = plan_slides(jobs, TileConfig(Path("."), params, slide_mpp, tissue_mask,
                                        max_plain_pixels=max_plain_pixels))
    itemsize = 2 if dtype == FeatureDtype.FLOAT16 else 4
    summary = totals(rows, encoder, dim, itemsize, device_kind or kind_of())
    if as_json:
        typer.echo(json.dumps({"slides": [asdict(r) for r in rows], "totals": summary},
                              indent=2))
        return
    for r in rows:
        typer.echo(f"{r.slide_id}\t{r.status}\t{r.n_patches} patches\tlevel {r.read_level}"
                   f"\t{r.mpp} µm/px ({r.mpp_source})" + (f"\t{r.error}" if r.error else ""))
    typer.echo("total: " + ", ".join(f"{k} {v}" for k, v in summary.items()))


@_command
def encoders(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """The encoder registry: name, architecture, dim, input size, µm/px, weights, licence
    (--json: every fact a pipeline needs: output, preprocessing, precision, ...)."""
    from .encoders import registry_table

    _print_table(registry_table(), as_json,
                 f"{'name':16} {'architecture':32} {'dim':>5} {'input':>5} {'µm/px':>5}  "
                 f"{'weights':58} licence",
                 lambda r: f"{r.name:16} {r.arch:32} {r.dim:>5} {r.input_size:>5} "
                           f"{r.target_mpp:>5g}  {r.weights + (' (gated)' if r.gated else ''):58} "
                           f"{r.licence}")


def _print_table(rows: list, as_json: bool, header: str, line) -> None:
    """A registry as JSON (every field) or as a header and one line per row."""
    from dataclasses import asdict

    if as_json:
        typer.echo(json.dumps([asdict(r) for r in rows], indent=2))
        return
    typer.echo(header)
    for r in rows:
        typer.echo(line(r))


@_command
def extract(slides: list[Path] = typer.Argument(None, help="Slide files or folders."),
            out: Path = OUT, encoder: str = typer.Option(..., "--encoder",
                                                         help="Preset name (see `encoders`)."),
            weights: str = typer.Option(None, "--weights",
                                        help="PATH to a checkpoint, or 'random' (tests only)."),
            coords: Path = typer.Option(None, "--coords",
                                        help="Folder of coords files from `tile` (default OUT)."),
            device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:1 ..."),
            devices: str = typer.Option(None, "--devices",
                                        help="Several devices, one process each: "
                                             "cuda:0,cuda:1 or 'all' (default: --device)."),
            batch_size: int = typer.Option(None, "--batch-size", help="Default: by device."),
            precision: Precision = typer.Option(None, "--precision",
                                                help="On CUDA (CPU is fp32); default: the "
                                                     "preset's."),
            dtype: FeatureDtype = typer.Option(FeatureDtype.FLOAT32, "--dtype",
                                               help="Stored features."),
            compile: bool = typer.Option(False, "--compile", help="torch.compile the encoder."),
            reader: Reader = typer.Option(Reader.AUTO, "--reader",
                                          help="auto: raw TIFF tiles where possible, else "
                                               "OpenSlide; fast insists on raw tiles."),
            decode: Decode = typer.Option(Decode.AUTO, "--decode",
                                          help="JPEG tiles of the fast reader: auto or cpu "
                                               "(reader processes), or gpu (batched nvJPEG on "
                                               "the device for YCbCr JPEG; on --device cpu the "
                                               "same path with libjpeg-turbo)."),
            slide_list: Path = SLIDE_LIST, recursive: bool = RECURSIVE, ext: str = EXT,
            target_mpp: float = TARGET_MPP, magnification: float = MAGNIFICATION,
            patch_size: int = PATCH_SIZE, overlap: int = OVERLAP,
            min_tissue: float = MIN_TISSUE, slide_mpp: float = SLIDE_MPP,
            tissue: TissueMethod = TISSUE, tissue_mask: Path = TISSUE_MASK,
            pen_filter: bool = PEN_FILTER, edge: Edge = EDGE,
            overwrite: bool = OVERWRITE, shard: str = SHARD, num_workers: int = NUM_WORKERS,
            slide_timeout: float = SLIDE_TIMEOUT, max_plain_pixels: int = MAX_PLAIN_PIXELS,
            log_level: str = LOG_LEVEL) -> None:
    """Per-patch embeddings with a pathology encoder (tiles slides that have no coords)."""
    from .devices import parse_devices, pick_device
    from .encoders import get_config
    from .extract import EXTRACT_COLUMNS, ExtractConfig, run_extract
    from .h5io import remove_stale_tmp
    from .report import RunReport
    from .tiling import TileConfig

    _setup_logging(log_level)
    get_config(encoder)
    try:
        device_list = parse_devices(devices, device)
    except ValueError as e:
        raise UsageError(str(e)) from None
    for d in device_list or (device,):  # before any slide: no CUDA is one line, not a trace
        pick_device(d)
    _workers(num_workers)
    jobs = _jobs(slides, slide_list, recursive, ext, shard)
    params = _tile_params(out, len(jobs), target_mpp, magnification, patch_size, overlap,
                          min_tissue, tissue, tissue_mask, slide_mpp, pen_filter, edge)
    tile_cfg = TileConfig(out, params, slide_mpp, tissue_mask, overwrite=False,
                          max_plain_pixels=max_plain_pixels)
    cfg = ExtractConfig(out=out, encoder=encoder, weights=weights, device=device,
                        batch_size=batch_size, num_workers=num_workers, precision=precision,
                        dtype=dtype, compile=compile, overwrite=overwrite, reader=reader,
                        decode=decode, devices=device_list,
                        slide_timeout=_timeout(slide_timeout),
                        max_plain_pixels=max_plain_pixels)
    remove_stale_tmp(cfg.layout.features_dir(encoder))
    with RunReport(cfg.layout.extract_report(encoder), EXTRACT_COLUMNS,
                   f"extract {encoder}") as report:
        run_extract(jobs, cfg, tile_cfg, coords, report)
    _say_what_extract_made(report, cfg, get_config(encoder).dim)
    _finish(report)


def _say_what_extract_made(report, cfg, dim: int) -> None:
    """Where the features are and their shape; random weights named for what they are."""
    patches = sum(int(r.get("n_patches") or 0) for r in report.rows if r.get("status") == "ok")
    done = sum(r.get("status") == "ok" for r in report.rows)
    log.info("features: %s/<slide_id>.h5 (%d slide%s this run, %d patches; each file: "
             "'features' patches × %d %s, 'coords' patches × 2 in level-0 px)",
             cfg.layout.features_dir(cfg.encoder), done, "" if done == 1 else "s", patches,
             dim, cfg.dtype)
    if cfg.weights == "random":
        log.warning("--weights random: an untrained encoder; these features are for testing "
                    "the pipeline only, not for analysis")


@_command
def train(features: Path = typer.Option(..., "--features",
                                        help="Folder of <slide_id>.h5 features files."),
          labels: Path = typer.Option(..., "--labels",
                                      help="CSV: slide_id,label[,patient_id][,split]."),
          out: Path = OUT,
          task: Task = typer.Option(Task.CLASSIFICATION, "--task",
                                    help="classification (--target), regression (--target, "
                                         "numeric) or survival (--time, --event)."),
          target: str = typer.Option("label", "--target", help="The labels CSV's target column."),
          targets: str = typer.Option(None, "--targets",
                                      help="col1,col2,...: one model per target column, on "
                                           "shared splits (a slide without one target still "
                                           "trains the others)."),
          time: str = typer.Option(None, "--time", help="Survival: the follow-up time column."),
          event: str = typer.Option(None, "--event",
                                    help="Survival: the event column (1 event, 0 censored)."),
          survival_loss: SurvivalLoss = typer.Option(SurvivalLoss.COX, "--survival-loss",
                                                     help="cox (partial likelihood) or nll "
                                                          "(discrete time, --bins)."),
          bins: int = typer.Option(4, "--bins", help="Time intervals of --survival-loss nll."),
          regression_loss: RegressionLoss = typer.Option(RegressionLoss.MSE,
                                                         "--regression-loss",
                                                         help="mse or huber (on standardised "
                                                              "targets)."),
          multi_head: bool = typer.Option(False, "--multi-head",
                                          help="With --targets: one model, a head per "
                                               "target (shared attention), not one per "
                                               "target."),
          patient_bags: bool = typer.Option(False, "--patient-bags",
                                            help="Pool each patient's slides into one bag; "
                                                 "patients are predicted (needs patient_id)."),
          head: str = typer.Option("abmil", "--head",
                                   help="abmil, resampler, transmil, clam-sb, mean; for slide "
                                        "embeddings linear or mlp."),
          folds: int = typer.Option(5, "--folds", help="Patient-level stratified folds."),
          epochs: int = typer.Option(200, "--epochs",
                                     help="The most epochs; early stopping on the validation "
                                          "loss usually ends sooner."),
          lr: float = typer.Option(2e-4, "--lr", help="Peak learning rate (AdamW, warm-up "
                                                      "then cosine decay)."),
          weight_decay: float = typer.Option(1e-2, "--weight-decay", help="AdamW's."),
          bag_size: int | None = typer.Option(None, "--bag-size",
                                              help="Random patches per training bag, drawn "
                                                   "afresh each epoch (0 = all); default 512, "
                                                   "transmil 256."),
          batch_size: int = typer.Option(8, "--batch-size", help="Bags per step (padded)."),
          feature_norm: FeatureNorm = typer.Option(FeatureNorm.ZSCORE_CLIP, "--feature-norm",
                                                   help="zscore; zscore-clip: the same, "
                                                        "clipped to ±5 σ (rare outliers); "
                                                        "quantile: each dimension through its "
                                                        "training quantiles to a normal "
                                                        "(heavy-tailed features)."),
          patience: int = typer.Option(20, "--patience",
                                       help="Epochs without a better validation loss before "
                                            "stopping."),
          seeds: int = typer.Option(0, "--seeds",
                                    help="Models per fold, averaged (an ensemble); 0: 5 for "
                                         "cohorts under 300 slides, else 1."),
          tune: bool = typer.Option(False, "--tune",
                                    help="Pick lr, weight decay, dropout and bag size on "
                                         "each fold's validation part (24 settings, fewer when "
                                         "bags are small or --bag-size is given; slow)."),
          seed: int = typer.Option(0, "--seed", help="Seed of splits and training."),
          device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, ..."),
          cache_gb: float = typer.Option(8.0, "--cache-gb",
                                         help="RAM for cached bags; the rest stream from disk."),
          overwrite: bool = typer.Option(False, "--overwrite",
                                         help="Replace the model folder --out if it holds a "
                                              "finished model."),
          log_level: str = LOG_LEVEL) -> None:
    """Train a slide-level head with cross-validation; writes model.pt and metrics."""
    from .bags import scan_features
    from .train import TrainConfig, run_train

    _setup_logging(log_level)
    done = next((p for p in (out / "model.pt", out / "metrics.json") if p.exists()), None)
    if done and not overwrite:
        raise UsageError(f"{done} exists; use another --out or --overwrite")
    if seeds < 0:
        raise UsageError("--seeds must be 0 (automatic) or more")
    names = tuple(c.strip() for c in targets.split(",") if c.strip()) if targets else (target,)
    if not names:
        raise UsageError("--targets names no column; give col1,col2,...")
    cfg = TrainConfig(out, head, folds, epochs, lr, weight_decay,
                      "head" if bag_size is None else bag_size or None, batch_size,
                      seed, device, patience, cache_gb=cache_gb, seeds=seeds, tune=tune,
                      task=task, targets=names, time=time, event=event,
                      survival_loss=survival_loss, bins=bins, regression_loss=regression_loss,
                      patient_bags=patient_bags, multi_head=multi_head,
                      feature_norm=feature_norm)
    result = run_train(scan_features(features), labels, cfg)
    summaries = (result.get("per_target") or result["summary"] if len(names) > 1
                 else {names[0]: result["summary"]})
    for name, summary in summaries.items():
        log.info(f"done ({name}): " + ", ".join(f"{k} {v['mean']:.3f} ± {v['sd']:.3f}"
                                                for k, v in summary.items()))
    log.info("models and statistics in %s", out)


@_command
def classify(features: Path = typer.Option(..., "--features",
                                           help="Folder of <slide_id>.h5 features files."),
             model: Path = typer.Option(..., "--model", help="model.pt from `train`."),
             out: Path = OUT,
             slides: Path = typer.Option(None, "--slides",
                                         help="Slide folder: adds heatmaps, patches, GeoJSON."),
             top_k: int = typer.Option(8, "--top-k", help="Patches shown per row."),
             threshold: Threshold = typer.Option(Threshold.ARGMAX, "--threshold",
                                                 help="argmax, or val: a binary model's "
                                                      "threshold chosen on validation data."),
             device: str = DEVICE,
             log_level: str = LOG_LEVEL) -> None:
    """Predict slides with a trained model; per-patch attention, heatmaps, QuPath GeoJSON."""
    from .classify import ClassifyConfig, run_classify

    _setup_logging(log_level)
    _finish(run_classify(ClassifyConfig(features, model, out, slides, top_k, device,
                                        threshold)))


@_command
def deploy(model: list[Path] = typer.Option(..., "--model",
                                            help="model.pt files, or training folders (all "
                                                 "their fold models); repeat the option."),
           features: Path = typer.Option(..., "--features",
                                         help="Folder of <slide_id>.h5 features files."),
           out: Path = OUT, device: str = DEVICE,
           log_level: str = LOG_LEVEL) -> None:
    """Average several models' predictions (an ensemble); per-model predictions too."""
    from .deploy import DeployConfig, run_deploy

    _setup_logging(log_level)
    _finish(run_deploy(DeployConfig(list(model), features, out, device)))


@_command
def statistics(predictions: list[Path] = typer.Option(..., "--predictions",
                                                      help="predictions.csv of train, "
                                                           "classify or deploy; repeatable."),
               labels: Path = typer.Option(..., "--labels", help="The labels CSV."),
               out: Path = OUT,
               target: str = typer.Option("label", "--target",
                                          help="Label column (classification, regression)."),
               time: str = typer.Option(None, "--time", help="Survival: time column."),
               event: str = typer.Option(None, "--event", help="Survival: event column."),
               bootstrap: int = typer.Option(1000, "--bootstrap",
                                             help="Resamples (of patients) per 95 % CI."),
               seed: int = typer.Option(0, "--seed", help="Seed of the bootstrap."),
               log_level: str = LOG_LEVEL) -> None:
    """Metrics with 95 % bootstrap CIs and ROC/PR/calibration, Kaplan–Meier or scatter plots."""
    from .stats import run_statistics

    _setup_logging(log_level)
    if bootstrap < 10:
        raise UsageError("--bootstrap must be at least 10")
    results = run_statistics(list(predictions), labels, out, target, time, event, seed,
                             bootstrap)
    for name, s in results.items():
        log.info("%s: %s", name, _headline(s))
    log.info("statistics and plots in %s", out)


def _headline(s: dict) -> str:
    def ci(d):
        return f"{d['value']:.3f} [{d['ci_low']:.3f}, {d['ci_high']:.3f}]"

    if s["task"] == "classification":
        return ", ".join(f"AUROC {c} {ci(v['auroc'])}" for c, v in s["per_class"].items())
    if s["task"] == "survival":
        return f"C-index {ci(s['c_index'])}"
    return f"Pearson r {ci(s['pearson_r'])}"


@_command
def report(features: Path = typer.Option(..., "--features",
                                         help="CTransPath features: OUT/features/ctranspath."),
           model: str = typer.Option(..., "--model",
                                     help="HistoGPT checkpoint (.pth) or its folder (with the "
                                          "BioGPT tokenizer files); 'random' for tests."),
           out: Path = OUT,
           size: HistoGPTSize = typer.Option(HistoGPTSize.B1, "--size",
                                             help="Head counts when no config.json is beside "
                                                  "the checkpoint; the model of --model random."),
           tokenizer: Path = typer.Option(None, "--tokenizer",
                                          help="Folder with BioGPT's vocab.json and merges.txt "
                                               "(default: the checkpoint's folder)."),
           prompt: str = typer.Option("Final diagnosis:", "--prompt",
                                      help="The report's first words, continued by the model."),
           max_new_tokens: int = typer.Option(256, "--max-new-tokens",
                                              help="The most tokens generated per slide."),
           decoding: DecodingMethod = typer.Option(DecodingMethod.GREEDY, "--decoding",
                                                   help="greedy, sample or beam."),
           num_beams: int = typer.Option(4, "--num-beams", help="Beam search's width."),
           top_k: int = typer.Option(40, "--top-k", help="Sampling: the k likeliest tokens."),
           top_p: float = typer.Option(0.95, "--top-p", help="Sampling: nucleus mass."),
           temperature: float = typer.Option(0.7, "--temperature", help="Sampling."),
           seed: int = typer.Option(0, "--seed", help="Sampling's seed (per slide)."),
           device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, ..."),
           precision: Precision = typer.Option(Precision.FP32, "--precision",
                                               help="CUDA autocast: fp32, bf16, fp16."),
           overwrite: bool = OVERWRITE, log_level: str = LOG_LEVEL) -> None:
    """Write a pathology report per slide with HistoGPT (reports.csv, reports/<id>.txt)."""
    from .histogpt import Decoding
    from .write_reports import ReportConfig, run_report

    _setup_logging(log_level)
    if max_new_tokens < 1 or num_beams < 1 or temperature <= 0 or not 0 < top_p <= 1:
        raise UsageError("--max-new-tokens and --num-beams must be ≥ 1, --temperature > 0, "
                         "--top-p in (0, 1]")
    d = Decoding(str(decoding), max_new_tokens, num_beams, top_k, top_p, temperature, seed)
    _finish(run_report(ReportConfig(features, model, out, str(size), tokenizer, prompt, d,
                                    device, precision, overwrite)))


@_command
def encode_slides(features: Path = typer.Option(..., "--features",
                                                help="Patch features: OUT/features/<encoder>."),
                  slide_encoder: str = typer.Option(..., "--slide-encoder",
                                                    help="Preset (see `slide-encoders`)."),
                  out: Path = OUT,
                  weights: str = typer.Option(None, "--weights",
                                              help="PATH to the checkpoint, or 'random' "
                                                   "(tests); default: $WSI_EMBED_WEIGHTS, hub."),
                  device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, ..."),
                  precision: Precision = typer.Option(None, "--precision",
                                                      help="CUDA autocast (CPU runs fp32)."),
                  overwrite: bool = OVERWRITE, shard: str = SHARD,
                  log_level: str = LOG_LEVEL) -> None:
    """One embedding per slide from its patch features, with a slide foundation model."""
    from .batch import parse_shard
    from .encode_slides import EncodeSlidesConfig, run_encode_slides
    from .slide_encoders import get_slide_config

    _setup_logging(log_level)
    get_slide_config(slide_encoder)
    _finish(run_encode_slides(EncodeSlidesConfig(features, slide_encoder, out, weights, device,
                                                 precision, overwrite, parse_shard(shard))))


@_command
def slide_encoders(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """List the slide-encoder presets and the patch features each needs."""
    from .slide_encoders import slide_registry_table

    _print_table(slide_registry_table(), as_json,
                 f"{'name':16} {'patch encoder':16} {'px':>4} {'µm/px':>5} {'coords':>6} "
                 f"{'dim':>5}  licence",
                 lambda r: f"{r.name:16} {r.patch_encoder:16} {r.patch_px:>4} {r.mpp:>5g} "
                           f"{'yes' if r.needs_coords else 'no':>6} {r.dim:>5}  {r.licence}")


CONCH_WEIGHTS = typer.Option(None, "--weights",
                             help="CONCH's full checkpoint (text tower included), or 'random' "
                                  "(tests); default: $WSI_EMBED_WEIGHTS/conch_v1, the hub.")
TOKENIZER = typer.Option(None, "--tokenizer",
                         help="CONCH's conch_byte_level_bpe_uncased.json (default: beside the "
                              "checkpoint or in $WSI_EMBED_WEIGHTS/conch_v1).")
CONCH_FEATURES = typer.Option(..., "--features",
                              help="Folder of conch_v1 features (OUT/features/conch_v1).")


@_command
def zero_shot(features: Path = CONCH_FEATURES,
              classes: Path = typer.Option(..., "--classes",
                                           help="YAML: classes (each with names) and optional "
                                                "templates with CLASSNAME."),
              out: Path = OUT, weights: str = CONCH_WEIGHTS, tokenizer: Path = TOKENIZER,
              top_k: int = typer.Option(50, "--top-k", help="Patches pooled per class (topk)."),
              pooling: Pooling = typer.Option(Pooling.TOPK, "--pooling",
                                              help="topk (MI-Zero) or mean."),
              slides: Path = typer.Option(None, "--slides",
                                          help="Slide folder: adds heatmaps, patches, GeoJSON."),
              labels: Path = typer.Option(None, "--labels",
                                          help="CSV slide_id,label: adds metrics.json."),
              log_level: str = LOG_LEVEL) -> None:
    """Classify slides from CONCH features and class prompts, no training (MI-Zero)."""
    from .zeroshot import ZeroShotConfig, run_zero_shot

    _setup_logging(log_level)
    _finish(run_zero_shot(ZeroShotConfig(features, classes, out, weights, tokenizer, top_k,
                                         pooling, slides, labels)))


@_command
def search(features: Path = CONCH_FEATURES,
           text: str = typer.Option(..., "--text", help="What to look for, in words."),
           out: Path = OUT, weights: str = CONCH_WEIGHTS, tokenizer: Path = TOKENIZER,
           top: int = typer.Option(50, "--top", help="How many patches."),
           slides: Path = typer.Option(None, "--slides",
                                       help="Slide folder: adds an image grid of the patches."),
           log_level: str = LOG_LEVEL) -> None:
    """The patches over all slides that best match a text (CONCH)."""
    from .zeroshot import SearchConfig, run_search

    _setup_logging(log_level)
    hits = run_search(SearchConfig(features, text, out, weights, tokenizer, top, slides))
    log.info("%d patches from %d slides in %s", len(hits), len({h.slide_id for h in hits}),
             out / "search.csv")


@_command
def status(out: Path = typer.Argument(..., help="An output folder of tile/extract/classify.")
           ) -> None:
    """Each slide's latest status over every run into OUT, and how each run ended."""
    from .report import status_lines

    if not out.is_dir():
        raise UsageError(f"{out} is not a folder")
    for line in status_lines(out):
        typer.echo(line)


@_command
def version() -> None:
    """Print the version."""
    typer.echo(__version__)


def main() -> None:
    """The `wsi-embed` entry point. After a write failed on a full disk, HDF5 would crash
    (SIGSEGV) closing that file as the process ends: the process then ends at once, with
    its exit code, once its logs are flushed."""
    from . import h5io
    from .run_config import hoist_config

    try:
        app(args=hoist_config(sys.argv[1:]))
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    if h5io.UNCLOSED:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    main()
