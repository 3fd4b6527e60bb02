"""Ilse et al. 2018's classic-MIL protocol, re-implemented in plain torch, on the features
folders `mil_classic.py` writes: what the paper's accuracy needs, next to `train`'s defaults.

Protocol (the paper's benchmark network and optimiser, as in the mi-Net code it follows):
instances standardised with the training bags' mean and std; 166→256→128→64 ReLU layers with
dropout 0.5, attention pooling (64 tanh units), a linear bag classifier; Adam (lr 5e-4, L2
weight decay 5e-3 in the gradient), one bag per step, a fixed number of epochs, the last
epoch's model tested; 10-fold CV (shuffled), accuracy at probability 0.5, repeated with
seeds. `--holdout 0.2` trains on 80 % of each training part (the rest, stratified, held
out); `--early-stop` then keeps the epoch with the lowest held-out loss (patience 20) as
`train` does, and `--refit` trains again on the whole training part for that many epochs.

    python benchmarks/mil_paper_protocol.py /tmp/milb/musk1 [--epochs 50] [--repeats 5]
        [--holdout 0.2 [--early-stop [--refit]]]
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import KFold
from torch import nn
from torch.nn.functional import binary_cross_entropy_with_logits as bce

from wsi_embed.h5io import read_features


class PaperNet(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        layers: list[nn.Module] = []
        for a, b in ((dim, 256), (256, 128), (128, 64)):
            layers += [nn.Linear(a, b), nn.ReLU(), nn.Dropout(0.5)]
        self.embed = nn.Sequential(*layers)
        self.attention = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))
        self.classifier = nn.Linear(64, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        a = torch.softmax(self.attention(h).T, 1)
        return self.classifier(a @ h).squeeze()


def load(folder: Path) -> tuple[list[np.ndarray], np.ndarray]:
    with open(folder / "labels.csv", newline="") as fh:
        label = {r["slide_id"]: int(r["label"]) for r in csv.DictReader(fh)}
    ids = sorted(label)
    return [read_features(folder / f"{i}.h5") for i in ids], np.array([label[i] for i in ids])


def run_epochs(model, opt, xs, y, fit, epochs: int, seed: int, held=None, patience=20):
    """Trains `epochs` epochs; with `held` bags, stops once their loss has not improved for
    `patience` epochs, restores the best epoch and returns its index."""
    best = (np.inf, None, -1)
    for ep in range(epochs):
        model.train()
        for i in np.random.RandomState(seed * 1000 + ep).permutation(fit):
            loss = bce(model(xs[i]), torch.tensor(float(y[i])))
            opt.zero_grad()
            loss.backward()
            opt.step()
        if held is None:
            continue
        model.eval()
        with torch.no_grad():
            val = np.mean([bce(model(xs[i]), torch.tensor(float(y[i]))).item() for i in held])
        if val < best[0]:
            best = (val, {k: v.clone() for k, v in model.state_dict().items()}, ep)
        elif ep - best[2] >= patience:
            break
    if held is not None:
        model.load_state_dict(best[1])
    return best[2]


def held_out(tr: np.ndarray, y: np.ndarray, share: float, seed: int) -> list[int]:
    rs = np.random.RandomState(seed)
    out: list[int] = []
    for c in (0, 1):
        members = rs.permutation([i for i in tr if y[i] == c])
        out += list(members[:max(1, int(len(members) * share))])
    return out


def repeat(bags, y, seed: int, args) -> tuple[float, float]:
    torch.manual_seed(seed)
    pred = np.zeros(len(y))
    for tr, te in KFold(10, shuffle=True, random_state=seed).split(bags):
        stacked = np.concatenate([bags[i] for i in tr])
        mu, sd = stacked.mean(0), stacked.std(0) + 1e-6
        xs = [torch.tensor((b - mu) / sd, dtype=torch.float32) for b in bags]

        def fresh():
            m = PaperNet(bags[0].shape[1])
            return m, torch.optim.Adam(m.parameters(), lr=5e-4, weight_decay=5e-3)

        model, opt = fresh()
        held = held_out(tr, y, args.holdout, seed) if args.holdout else []
        fit = np.setdiff1d(tr, held)
        best = run_epochs(model, opt, xs, y, fit, args.epochs, seed,
                          held if args.early_stop else None)
        if args.refit:
            torch.manual_seed(seed * 7 + 1)
            model, opt = fresh()
            run_epochs(model, opt, xs, y, tr, best + 1, seed)
        model.eval()
        with torch.no_grad():
            for i in te:
                pred[i] = torch.sigmoid(model(xs[i])).item()
    return float(((pred > 0.5) == y).mean()), float(roc_auc_score(y, pred))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folder", type=Path, help="a dataset folder of mil_classic.py")
    ap.add_argument("--epochs", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--holdout", type=float, default=0.0)
    ap.add_argument("--early-stop", action="store_true")
    ap.add_argument("--refit", action="store_true")
    args = ap.parse_args()
    if (args.early_stop or args.refit) and not args.holdout:
        ap.error("--early-stop and --refit need --holdout")
    torch.set_num_threads(1)
    bags, y = load(args.folder)
    accs, aucs = [], []
    for seed in range(args.first_seed, args.first_seed + args.repeats):
        acc, auc = repeat(bags, y, seed, args)
        accs.append(acc)
        aucs.append(auc)
        print(f"seed {seed}: accuracy {acc:.3f}, AUC {auc:.3f}", flush=True)
    print(f"accuracy {np.mean(accs):.3f} ± {np.std(accs):.3f}, "
          f"AUC {np.mean(aucs):.3f} ± {np.std(aucs):.3f}")


if __name__ == "__main__":
    main()
