"""Time and peak memory of `wsi-embed tile` on one large synthetic slide (not a test).

Makes (once) a 40,000 x 30,000 px, 0.25 µm/px Aperio-style SVS with four pyramid levels and
tissue-like regions, then runs the real CLI in a child process on one core and reports wall
time and the child's peak RSS, thumbnail and coords file included.

    python benchmarks/tile_speed.py [--slide PATH] [--width 40000 --height 30000]
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from wsi_embed.synthetic import blob_slide


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--slide", type=Path, default=None)
    ap.add_argument("--width", type=int, default=40_000)
    ap.add_argument("--height", type=int, default=30_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--make-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.make_only:
        blob_slide(args.slide, args.width, args.height)
        return
    work = Path(tempfile.mkdtemp(prefix="wsi-embed-bench-"))
    slide = args.slide or work / "big.svs"
    if not slide.exists():
        t0 = time.perf_counter()
        # in a child: a forked process inherits its parent's RSS high-water mark, so making
        # the slide here would inflate the peak RSS measured for `tile`
        subprocess.run([sys.executable, __file__, "--make-only", "--slide", str(slide),
                        "--width", str(args.width), "--height", str(args.height)], check=True)
        print(f"made {slide} ({slide.stat().st_size / 1e6:.0f} MB) in "
              f"{time.perf_counter() - t0:.0f} s")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENCV_NUM_THREADS": "1"}
    times = []
    for i in range(args.repeats):
        out = work / f"out{i}"
        cmd = ["taskset", "-c", "0", sys.executable, "-m", "wsi_embed.cli", "tile", str(slide),
               "--out", str(out), "--num-workers", "0", "--log-level", "WARNING"]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, env=env)
        times.append(time.perf_counter() - t0)
    rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    import h5py

    with h5py.File(work / "out0" / "coords" / f"{slide.stem}.h5") as f:
        n = len(f["coords"])
    print(f"tile, one core: {min(times):.2f} s best of {len(times)} "
          f"({', '.join(f'{t:.2f}' for t in times)}), process start and imports included; "
          f"peak RSS {rss_mb:.0f} MB; {n} patches")


if __name__ == "__main__":
    main()
