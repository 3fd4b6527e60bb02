"""Peak memory and time of a slide encoder on one large slide (CPU), and its embedding against
a dense (unblocked) computation on a slide small enough for both.

Each measurement runs in a fresh process, so its peak RSS (`ru_maxrss`) is its own:

    python benchmarks/slide_encoder_memory.py --encoder titan --patches 20000
    python benchmarks/slide_encoder_memory.py --encoder gigapath_slide --patches 20000 \
        --compare 2000

The slide is synthetic: random features (published input width, random weights at the
published sizes) on a roughly square grid of patches with 15 % of the cells empty. The
comparison's "one block" run is the unblocked computation (a block cap beyond any size);
equality with the reference code itself is what tests/test_slide_encoders.py checks.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np
import torch


def slide(n: int, dim: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    side = int(np.ceil(np.sqrt(n / 0.85)))
    cells = rng.choice(side * side, n, replace=False)
    coords = np.stack([cells // side, cells % side], 1) * 512
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return torch.from_numpy(x), torch.from_numpy(coords)


def run_one(encoder: str, n: int, block: int | None) -> dict:
    from wsi_embed import slide_gigapath, slide_titan
    from wsi_embed.slide_encoders import SLIDE_PRESETS, load_slide_encoder

    if block is not None:  # the attention's block caps (floats): one block = unblocked
        slide_titan.BIAS_BLOCK = slide_gigapath.SCORE_BLOCK = block
    model, _ = load_slide_encoder(encoder, "random")
    x, coords = slide(n, SLIDE_PRESETS[encoder].default_sizes["in_dim"])
    t0 = time.perf_counter()
    with torch.inference_mode():
        z = model.encode(x, coords, 512)
    return {"seconds": time.perf_counter() - t0, "z": z.tolist(),
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def in_child(encoder: str, n: int, block: int | None) -> dict:
    code = ("import json, sys; sys.path.insert(0, 'benchmarks'); "
            "from slide_encoder_memory import run_one; "
            f"print(json.dumps(run_one({encoder!r}, {n}, {block})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--encoder", default="titan")
    ap.add_argument("--patches", type=int, default=20000)
    ap.add_argument("--compare", type=int, default=0,
                    help="also this many patches blocked vs in one block (dense)")
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    big = in_child(args.encoder, args.patches, None)
    print(f"{args.encoder}: {args.patches} patches, {big['seconds']:.1f} s, peak RSS "
          f"{big['peak_rss_gb']:.2f} GB")
    if args.compare:
        blocked = in_child(args.encoder, args.compare, None)
        dense = in_child(args.encoder, args.compare, 1 << 62)
        a, b = torch.tensor(blocked["z"]), torch.tensor(dense["z"])
        cos = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
        print(f"{args.encoder}: {args.compare} patches, blocked {blocked['seconds']:.1f} s / "
              f"{blocked['peak_rss_gb']:.2f} GB, one block {dense['seconds']:.1f} s / "
              f"{dense['peak_rss_gb']:.2f} GB, cosine {cos:.6f}")


if __name__ == "__main__":
    main()
