"""Seconds per training epoch of slide-level heads, and `classify` time for one big bag.

    python benchmarks/train_speed.py --slides 500 --patches 8000 --dim 1024 --heads abmil,resampler

Writes synthetic witness bags (float16 features files) under --work once and reuses them.
The first epoch reads bags from disk; later epochs come from the bag cache.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from wsi_embed.bags import BagStore, scan_features
from wsi_embed.devices import pick_device
from wsi_embed.slide_model import ModelSpec, SlideModel, predict_bag
from wsi_embed.synthetic import write_witness_bags
from wsi_embed.train import pad_bags


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slides", type=int, default=500)
    ap.add_argument("--patches", type=int, default=8000)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--heads", default="abmil,resampler")
    ap.add_argument("--bag-size", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--classify-patches", type=int, default=50_000)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--work", type=Path, default=Path("out/bench_train"))
    args = ap.parse_args()
    device = pick_device(args.device)
    folder = args.work / f"bags_{args.slides}x{args.patches}x{args.dim}"
    if not (folder / "labels.csv").exists():
        t = time.perf_counter()
        write_witness_bags(folder, args.slides, dim=args.dim,
                           patches=(args.patches, args.patches + 1))
        print(f"wrote {args.slides} bags in {time.perf_counter() - t:.0f} s")
    fs = scan_features(folder)
    store = BagStore(fs.metas, 16 << 30)
    ids = sorted(fs.metas)
    y = torch.tensor([int(s[-4:]) % 2 for s in ids])
    rng = np.random.default_rng(0)
    print(f"device {device}, torch threads {torch.get_num_threads()}, {len(ids)} slides x "
          f"{args.patches} patches x {args.dim}-d, bag size {args.bag_size}, "
          f"batch {args.batch_size}")
    for head in args.heads.split(","):
        model = SlideModel(ModelSpec(head, fs.dim, ["0", "1"], None, None)).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=2e-4)
        for epoch in range(args.epochs):
            t = time.perf_counter()
            model.train()
            for s in range(math.ceil(len(ids) / args.batch_size)):
                part = range(s * args.batch_size, min(len(ids), (s + 1) * args.batch_size))
                x, mask = pad_bags([store.sample(ids[i], args.bag_size, rng) for i in part], device)
                out = model(x, mask, y[list(part)].to(device))
                loss = F.cross_entropy(out.logits, y[list(part)].to(device))
                opt.zero_grad()
                loss.backward()
                opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            print(f"{head}: epoch {epoch} ({'cold' if epoch == 0 else 'cached'}) "
                  f"{time.perf_counter() - t:.1f} s")
        big = np.random.default_rng(1).standard_normal((args.classify_patches, fs.dim),
                                                       dtype=np.float32)
        predict_bag(model, big[:100], device)
        t = time.perf_counter()
        predict_bag(model, big, device)
        print(f"{head}: classify one {args.classify_patches}-patch bag "
              f"{time.perf_counter() - t:.2f} s")


if __name__ == "__main__":
    main()
