"""End-to-end extraction throughput next to the encoder-only ceiling, in one run (not a test).

1. makes (or takes) a synthetic SVS and tiles it with `--tissue none` (every grid patch);
2. runs the real `wsi-embed extract` CLI in a child process (random weights) over
   `--copies` links to the slide, and takes from its log the steady rate (patches after the
   first batch over the time since it, so process start, imports, reader start-up, model
   load and warm-up stay out) and how long its main thread waited for readers and for the
   device; from its report the first slide's rate with all of that in; its peak RSS;
3. in this process, measures the ceiling: the same preset, batch size and precision on
   random tensors already on the device (no reading, no copies, no preprocessing);
4. prints end-to-end patches/s, the ceiling and their ratio. With `--small-too`, also the peak
   RSS of a slide 1/25 the size, to show that host memory does not grow with the slide.

    python benchmarks/extract_throughput.py --encoder uni_v1 --num-workers 16      # on a GPU
    python benchmarks/extract_throughput.py --encoder kaiko_vits16 --side 8192 \\
        --num-workers 2 --batch-size 32                                           # on CPU
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from wsi_embed.batch import SlideJob
from wsi_embed.devices import pick_device
from wsi_embed.encoders import get_config
from wsi_embed.extract import EXTRACT_COLUMNS, ExtractConfig, encoder_setup, run_precision
from wsi_embed.extract.device import DeviceRunner
from wsi_embed.extract.pipeline import pipeline
from wsi_embed.h5io import read_coords_file
from wsi_embed.report import RunReport
from wsi_embed.tiling import TileParams


def make_slide(path: Path, side: int, mpp: float = 0.5) -> Path:
    """In a child process: a forked child inherits its parent's RSS high-water mark, so
    building the slide here would inflate the peak RSS measured for `extract`."""
    code = ("import sys; from pathlib import Path; from wsi_embed.synthetic import blob_slide; "
            "blob_slide(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[2]), "
            "mpp=float(sys.argv[3]))")
    subprocess.run([sys.executable, "-c", code, str(path), str(side), str(mpp)], check=True)
    return path


STEADY = re.compile(r"steady rate: (\d+) patches in ([\d.]+) s .*? waited ([\d.]+) s for "
                    r"readers, ([\d.]+) s for the device")


def run_extract(slide: Path, out: Path, args, copies: int = 1) -> dict:
    """A child `wsi-embed extract` over `copies` links to the slide (distinct slide ids):
    its steady rate after the first batch and the main thread's waits (from its log), the
    first slide's patches/s with every start-up cost inside (from its report), peak RSS."""
    folder = out / "slides"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(copies):
        link = folder / f"{slide.stem}_{i}{slide.suffix}"
        if not link.exists():
            link.symlink_to(slide.resolve())
    base = [sys.executable, "-m", "wsi_embed.cli"]
    subprocess.run(base + ["tile", str(folder), "--out", str(out), "--tissue", "none",
                           "--num-workers", "0", "--log-level", "WARNING"], check=True)
    cmd = base + ["extract", str(folder), "--out", str(out), "--encoder", args.encoder,
                  "--weights", "random", "--num-workers", str(args.num_workers),
                  "--device", args.device, "--log-level", "INFO"]
    if args.batch_size:
        cmd += ["--batch-size", str(args.batch_size)]
    if args.precision:
        cmd += ["--precision", args.precision]
    if args.compile:
        cmd += ["--compile"]
    cmd += ["--reader", args.reader, "--decode", args.decode]
    log = out / "extract.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stderr=fh, stdout=fh)
        _, status, usage = os.wait4(proc.pid, 0)
    text = log.read_text()
    if status != 0:
        raise SystemExit(f"extract failed with status {status}:\n{text[-3000:]}")
    with open(out / f"extract_report_{args.encoder}.csv") as fh:
        rows = list(csv.DictReader(fh))
    m = STEADY.search(text)
    if m is None:
        raise SystemExit(f"no steady-rate line in the extract log:\n{text[-3000:]}")
    n, secs, wait_read, wait_dev = (float(v) for v in m.groups())
    return {"steady": n / secs, "n": int(n), "secs": secs, "wait_readers": wait_read,
            "wait_device": wait_dev, "first": float(rows[0]["patches_per_s"]),
            "rss_mb": usage.ru_maxrss / 1024}


class ChannelMean(torch.nn.Module):
    """Stands in for the encoder in the reading-only run: reading, batching, the copy to the
    device and the preprocessing all stay."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().mean(dim=(2, 3))


def reading_only(slide: Path, coords: Path, reader: str, decode: str, args,
                 device: torch.device, batch: int = 512) -> tuple[float, str]:
    """Patches/s delivered to the device with no encoder behind them: `extract`'s own
    pipeline (reader processes or device decode, batches of `batch`, copy and preprocessing
    for `args.encoder`) with a per-channel mean for an encoder; its steady rate after the
    first batch, so reader start-up stays out."""
    out = Path(tempfile.mkdtemp(prefix="wsi-embed-reading-"))
    geom = read_coords_file(coords).attrs
    ecfg = replace(get_config(args.encoder), dim=3)
    precision = run_precision(args.precision, ecfg, device)
    runner = DeviceRunner(ChannelMean(), ecfg, device, precision.torch_dtype, batch, False)
    cfg = ExtractConfig(out=out, encoder="reading_only", num_workers=args.num_workers,
                        reader=reader, decode=decode)
    params = TileParams(float(geom["target_mpp"]), int(geom["patch_size"]))
    with RunReport(out / "report.csv", EXTRACT_COLUMNS, "reading only") as report:
        rate = pipeline([(SlideJob(slide, slide.stem), coords)], cfg, params, runner, batch,
                        {}, report)
    row = report.rows[0]
    if row["status"] != "ok":
        raise SystemExit(f"reading only failed: {row['error']}")
    if not rate.n:
        raise SystemExit(f"reading only: {slide} fills a single batch of {batch}, which gives "
                         "no steady rate; use a bigger --side")
    return rate.per_s, row["reader"]


@torch.inference_mode()
def ceiling(args, seconds: float = 10.0) -> tuple[float, int, str]:
    """The encoder as `extract` sets it up and calls it, on preprocessed random input
    already on the device."""
    device = pick_device(args.device)
    cfg = ExtractConfig(out=Path(tempfile.gettempdir()), encoder=args.encoder,
                        weights="random", device=args.device, batch_size=args.batch_size,
                        precision=args.precision, compile=args.compile)
    runner, attrs, batch = encoder_setup(cfg, device)
    s = runner.cfg.input_size
    x = torch.randn(batch, 3, s, s, device=device,
                    dtype=runner.dtype).contiguous(memory_format=torch.channels_last)
    for _ in range(3):
        runner(x)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        runner(x)
        n += batch
    sync()
    return n / (time.perf_counter() - t0), batch, attrs["precision"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoder", default="kaiko_vitb16")
    ap.add_argument("--slide", type=Path)
    ap.add_argument("--side", type=int, default=36_864,
                    help="square slide side in px at 0.5 µm/px (36,864 → 20,736 patches)")
    ap.add_argument("--num-workers", type=int, default=os.cpu_count())
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--precision")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--small-too", action="store_true")
    ap.add_argument("--reader", default="auto", help="auto, fast or openslide")
    ap.add_argument("--decode", default="auto", help="auto, cpu or gpu (the e2e run)")
    ap.add_argument("--copies", type=int, default=3,
                    help="links to the slide in the end-to-end run")
    ap.add_argument("--no-reading", action="store_true",
                    help="skip the reading-only figures (they do not depend on the encoder)")
    ap.add_argument("--mpp", type=float, default=0.5,
                    help="of the made slide; 0.25 reads 512 px at level 0 per 256 px patch "
                         "at the default 0.5 µm/px (4 tiles each) and downsamples them")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    work = Path(tempfile.mkdtemp(prefix="wsi-embed-extract-bench-"))
    slide = args.slide or make_slide(work / "big.svs", args.side, args.mpp)
    device = pick_device(args.device)
    for reader, decode in () if args.no_reading else (
            ("openslide", "cpu"), ("fast", "cpu"), ("fast", "gpu")):
        coords = work / "out" / "coords" / f"{slide.stem}.h5"
        if not coords.exists():
            subprocess.run([sys.executable, "-m", "wsi_embed.cli", "tile", str(slide), "--out",
                            str(work / "out"), "--tissue", "none", "--num-workers", "0",
                            "--log-level", "WARNING"], check=True)
        if decode == "gpu" and device.type != "cuda":
            continue
        rate, kind = reading_only(slide, coords, reader, decode, args, device)
        print(f"reading only, --reader {reader} --decode {decode} ({kind}), "
              f"{args.num_workers} workers: {rate:.0f} patches/s", flush=True)
    r = run_extract(slide, work / "e2e", args, args.copies)
    line = (f"{args.encoder} --decode {args.decode}: end-to-end {r['steady']:.1f} patches/s "
            f"steady ({r['n']} patches in {r['secs']:.1f} s after the first batch; the main "
            f"thread waited {r['wait_readers']:.1f} s for readers, {r['wait_device']:.1f} s "
            f"for the device); first slide with warm-up: {r['first']:.1f} patches/s; peak "
            f"RSS {r['rss_mb']:.0f} MB")
    if args.small_too:
        small = make_slide(work / "small.svs", args.side // 5)
        rs = run_extract(small, work / "out_small", args)
        line += f"; small slide peak RSS {rs['rss_mb']:.0f} MB"
    ceil, batch, precision = ceiling(args)
    print(line)
    print(f"encoder-only ceiling ({precision}, batch {batch}, {pick_device(args.device)}): "
          f"{ceil:.1f} patches/s; ratio end-to-end / ceiling = {r['steady'] / ceil:.3f}")


if __name__ == "__main__":
    main()
