"""End-to-end extraction throughput next to the encoder-only ceiling, in one run (not a test).

1. makes (or takes) a synthetic SVS and tiles it with `--tissue none` (every grid patch);
2. runs the real `wsi-embed extract` CLI in a child process (random weights) and reads
   patches/s of the slide from its report, plus the child's peak RSS;
3. in this process, measures the ceiling: the same preset, batch size and precision on
   random tensors already on the device (no reading, no copies);
4. prints end-to-end patches/s, the ceiling and their ratio. With `--small-too`, also the peak
   RSS of a slide 1/25 the size, to show that host memory does not grow with the slide.

    python benchmarks/extract_throughput.py --encoder uni_v1 --num-workers 16      # on a GPU
    python benchmarks/extract_throughput.py --encoder kaiko_vits16 --side 8192 \\
        --num-workers 2 --batch-size 32                                           # on CPU
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from wsi_embed.devices import pick_device
from wsi_embed.encoders import build_encoder
from wsi_embed.extract import (
    PRECISIONS,
    ReaderPool,
    default_batch_size,
    prepare_slide,
    read_tasks,
    task_size,
)
from wsi_embed.h5io import read_coords_file
from wsi_embed.tiling import SlideJob


def make_slide(path: Path, side: int, mpp: float = 0.5) -> Path:
    """In a child process: a forked child inherits its parent's RSS high-water mark, so
    building the slide here would inflate the peak RSS measured for `extract`."""
    code = ("import sys; from pathlib import Path; from wsi_embed.synthetic import blob_slide; "
            "blob_slide(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[2]), "
            "mpp=float(sys.argv[3]))")
    subprocess.run([sys.executable, "-c", code, str(path), str(side), str(mpp)], check=True)
    return path


def run_extract(slide: Path, out: Path, args, copies: int = 1
                ) -> tuple[float, int, float, float]:
    """(patches/s of the first slide, patches in all, peak RSS MB, wall seconds) from a child
    `wsi-embed extract` over `copies` links to the slide (distinct slide ids)."""
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
                  "--device", args.device, "--log-level", "WARNING"]
    if args.batch_size:
        cmd += ["--batch-size", str(args.batch_size)]
    if args.precision:
        cmd += ["--precision", args.precision]
    if args.compile:
        cmd += ["--compile"]
    cmd += ["--reader", args.reader, "--decode", args.decode]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if status != 0:
        raise SystemExit(f"extract failed with status {status}")
    with open(out / f"extract_report_{args.encoder}.csv") as fh:
        rows = list(csv.DictReader(fh))
    return (float(rows[0]["patches_per_s"]), sum(int(r["n_patches"]) for r in rows),
            usage.ru_maxrss / 1024, wall)


def reading_only(slide: Path, coords: Path, reader: str, decode: str, num_workers: int,
                 device: torch.device, chunk: int = 64) -> tuple[float, str]:
    """Patches/s the reader pool delivers (into shared memory, or decoded on the device),
    with no encoder behind it."""
    patch = int(read_coords_file(coords).attrs["patch_size"])
    st = prepare_slide(SlideJob(slide, slide.stem), coords, patch, reader, decode, device)
    n_slots = max(8, 3 * num_workers)
    t0 = time.perf_counter()
    pool = ReaderPool(num_workers, chunk, patch, n_slots, device)
    print(f"({num_workers} reader processes started in {time.perf_counter() - t0:.1f} s)")
    tasks = list(read_tasks(st, task_size(st, chunk, 512), patch))
    t0, inflight = time.perf_counter(), 0
    for t in tasks:
        if inflight >= n_slots - 1:
            _, slot, err = pool.get()
            assert err is None, err
            pool.release(slot)
            inflight -= 1
        pool.submit(t)
        inflight += 1
    for _ in range(inflight):
        _, slot, err = pool.get()
        assert err is None, err
        pool.release(slot)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    secs = time.perf_counter() - t0
    pool.close()
    return len(st.coords) / secs, st.reader


@torch.inference_mode()
def ceiling(args, seconds: float = 10.0) -> tuple[float, int, str]:
    device = pick_device(args.device)
    model, cfg = build_encoder(args.encoder, "cpu")
    precision = "fp32" if device.type == "cpu" else (args.precision or cfg.precision)
    batch = args.batch_size or default_batch_size(cfg, device)
    model = model.to(device=device, dtype=PRECISIONS[precision]).eval()
    if args.compile:
        model = torch.compile(model)
    x = torch.randn(batch, 3, cfg.input_size, cfg.input_size, device=device,
                    dtype=PRECISIONS[precision]).contiguous(memory_format=torch.channels_last)
    for _ in range(3):
        model(x)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        model(x)
        n += batch
    sync()
    return n / (time.perf_counter() - t0), batch, precision


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
    ap.add_argument("--copies", type=int, default=4,
                    help="slides in the longer of the two end-to-end runs")
    ap.add_argument("--no-reading", action="store_true",
                    help="skip the reading-only figures (they do not depend on the encoder)")
    ap.add_argument("--mpp", type=float, default=0.5,
                    help="of the made slide; 0.25 reads 512 px at level 0 per 256 px patch "
                         "at the default 0.5 µm/px (4 tiles each) and downsamples them")
    args = ap.parse_args()
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
        rate, kind = reading_only(slide, coords, reader, decode, args.num_workers, device)
        print(f"reading only, --reader {reader} --decode {decode} ({kind}), "
              f"{args.num_workers} workers: {rate:.0f} patches/s", flush=True)
    # steady state: the extra slides of a longer run over the extra wall time, so process
    # start, imports, reader start-up, model load and the first batches' warm-up cancel out
    first, n1, rss, wall1 = run_extract(slide, work / "e2e_1", args, 1)
    _, n_k, _, wall_k = run_extract(slide, work / "e2e_k", args, args.copies)
    e2e = (n_k - n1) / (wall_k - wall1)
    line = (f"{args.encoder} --decode {args.decode}: end-to-end {e2e:.1f} patches/s steady "
            f"(({n_k} - {n1} patches) / ({wall_k:.1f} - {wall1:.1f} s)); one slide alone, "
            f"warm-up included: {first:.1f} patches/s; peak RSS {rss:.0f} MB")
    if args.small_too:
        small = make_slide(work / "small.svs", args.side // 5)
        _, n_small, rss_small, _ = run_extract(small, work / "out_small", args)
        line += f"; small slide ({n_small} patches) peak RSS {rss_small:.0f} MB"
    ceil, batch, precision = ceiling(args)
    print(line)
    print(f"encoder-only ceiling ({precision}, batch {batch}, {pick_device(args.device)}): "
          f"{ceil:.1f} patches/s; ratio end-to-end / ceiling = {e2e / ceil:.3f}")


if __name__ == "__main__":
    main()
