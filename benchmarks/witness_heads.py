"""Every head on synthetic witness cohorts (`synthetic.write_witness_bags`: Gaussian patches,
2-5 % witnesses shifted by `--shift` σ along a class direction) with `train`'s defaults:
cross-validated AUC per head.

    python benchmarks/witness_heads.py --out /tmp/witness --slides 80 --shift 8 [--heads ...]
        [--extra --seeds 1]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from wsi_embed.synthetic import write_witness_bags


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--slides", type=int, default=80)
    ap.add_argument("--shift", type=float, default=8.0)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--heads", nargs="*",
                    default=["abmil", "resampler", "transmil", "clam-sb", "mean"])
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                    help="more `wsi-embed train` options")
    args = ap.parse_args()
    bags = write_witness_bags(args.out / "bags", args.slides, dim=args.dim, shift=args.shift)
    print(f"| head | AUC (mean ± sd over {args.folds} folds) | balanced accuracy |")
    print("|---|---|---|")
    for head in args.heads:
        out = args.out / f"model-{head}"
        subprocess.run([sys.executable, "-m", "wsi_embed.cli", "train", "--features",
                        str(bags.labels_csv.parent), "--labels", str(bags.labels_csv), "--out",
                        str(out), "--head", head, "--folds", str(args.folds), "--device",
                        "cpu", "--overwrite", "--log-level", "WARNING", *args.extra],
                       check=True)
        s = json.loads((out / "metrics.json").read_text())["summary"]
        print(f"| {head} | {s['auc']['mean']:.3f} ± {s['auc']['sd']:.3f} | "
              f"{s['balanced_accuracy']['mean']:.3f} ± {s['balanced_accuracy']['sd']:.3f} |",
              flush=True)


if __name__ == "__main__":
    main()
