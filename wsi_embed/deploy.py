"""`wsi-embed deploy`: apply several trained models (or every fold model of a training
folder) to a features folder and average their outputs: probabilities, risks or values.
Models that disagree on what they predict or on the features they take are refused before
anything is written."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .bags import BagStore, scan_features
from .choices import Task
from .classify import check_compatible, predict_slides, prediction_row
from .devices import pick_device
from .errors import ModelError
from .h5io import atomic_file
from .slide_model import Ensemble, load_model, predict_bag
from .train import write_predictions

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeployConfig:
    models: list[Path]
    features: Path
    out: Path
    device: str = "auto"


def model_files(paths: list[Path]) -> list[Path]:
    """model.pt files as given; a training folder stands for all its fold models."""
    files = []
    for p in paths:
        if p.is_dir():
            folds = sorted(p.glob("folds/fold_*/model.pt"))
            if not folds:
                raise ModelError(f"--model {p}: a folder without folds/fold_*/model.pt; give "
                                 "a training folder of `wsi-embed train` or model.pt files")
            files += folds
        else:
            files.append(p)
    return files


def _same(models: list[tuple[Path, Ensemble]]) -> None:
    (p0, m0), *rest = models
    s0 = m0.spec
    for p, m in rest:
        s = m.spec
        for what, a, b in (("task", s0.task, s.task), ("classes", s0.classes, s.classes),
                           ("loss", s0.loss if s0.task == "survival" else None,
                            s.loss if s.task == "survival" else None),
                           ("feature encoder", s0.encoder, s.encoder),
                           ("feature weights", s0.weights, s.weights),
                           ("feature dim", s0.in_dim, s.in_dim)):
            if a != b:
                raise ModelError(f"--model {p} predicts with {what} {b!r} but {p0} with "
                                 f"{a!r}; an ensemble needs models of one task, one set of "
                                 "classes and one feature encoder")


def run_deploy(cfg: DeployConfig):
    device = pick_device(cfg.device)
    files = model_files(cfg.models)
    models = [(p, load_model(p, device)[0]) for p in files]
    _same(models)
    spec = models[0][1].spec
    task = Task(spec.task)
    fs = scan_features(cfg.features, lenient=True)
    check_compatible(spec, fs, cfg.features)
    store = BagStore(fs.metas, cache_bytes=0)
    per_model: dict[str, list[np.ndarray]] = {}

    def one(sid: str, layout) -> dict:
        if store.n_patches(sid) == 0:
            return {"status": "failed", "error": "no patches (no tissue found)"}
        x = store.get(sid)
        outs = [predict_bag(m, x, device)[0] for _, m in models]
        per_model[sid] = outs
        return prediction_row(spec.classes, np.mean(outs, axis=0), task=task,
                              groups=spec.groups)

    report = predict_slides(fs, cfg.out, spec.classes, "deploy", one, task, spec.groups)
    ids = sorted(per_model)
    names = [f"model_{i}" for i in range(len(models))]
    for i, name in enumerate(names):
        if ids:
            write_predictions(cfg.out / "per_model" / f"{name}.csv", ids, None,
                              np.stack([per_model[s][i] for s in ids]), spec.classes,
                              task=task, groups=spec.groups)
    with atomic_file(cfg.out / "models.json") as tmp:
        tmp.write_text(json.dumps({n: str(p) for n, (p, _) in zip(names, models, strict=True)},
                                  indent=2) + "\n")
    log.info("%d models averaged over %d slides", len(models), len(ids))
    return report
