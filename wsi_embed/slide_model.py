"""A trained slide-level model: the head, the feature standardisation fitted on its training
split, its temperature (calibration on validation data), and what it was trained on
(classes, feature encoder, weights, dim). A model file holds an ensemble of such members
(seeds) and the decision threshold chosen on validation data. `train` saves it, `classify`
loads it; `predict_bag` is the one prediction path both use."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import __version__
from .errors import ModelError, one_line
from .h5io import atomic_file
from .heads import HeadOutput, build_head

MODEL_FORMAT = "wsi-embed/model/2"  # /1: one member, no temperature nor threshold
READABLE_FORMATS = ("wsi-embed/model/1", MODEL_FORMAT)


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a model and to check the features it is given."""

    head: str
    in_dim: int
    classes: list[str]
    encoder: str | None  # of the training features; None when those files did not say
    weights: str | None
    dropout: float = 0.25


class SlideModel(nn.Module):
    """Standardise features with the training split's statistics, then apply the head."""

    def __init__(self, spec: ModelSpec, mean: np.ndarray | None = None,
                 std: np.ndarray | None = None):
        super().__init__()
        self.spec = spec
        self.head = build_head(spec.head, spec.in_dim, len(spec.classes), spec.dropout)
        self.register_buffer("mean", torch.as_tensor(
            np.zeros(spec.in_dim, np.float32) if mean is None else mean))
        self.register_buffer("std", torch.as_tensor(
            np.ones(spec.in_dim, np.float32) if std is None else std))
        # calibration on validation data: logits / temperature + class_bias
        self.register_buffer("temperature", torch.ones(()))
        self.register_buffer("class_bias", torch.zeros(len(spec.classes)))

    def forward(self, x: torch.Tensor, mask: torch.Tensor, labels=None) -> HeadOutput:
        return self.head((x - self.mean) / self.std, mask, labels)


class Ensemble(nn.Module):
    """Members trained with different seeds on the same split; their calibrated
    probabilities are averaged. `threshold`: the probability of the second class above which
    a binary model says that class (chosen on validation data; None: argmax)."""

    def __init__(self, members: list[SlideModel], threshold: float | None = None):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.threshold = threshold

    @property
    def spec(self) -> ModelSpec:
        return self.members[0].spec


def save_model(path: Path, model: Ensemble, extra: dict | None = None) -> None:
    """Write atomically: a killed run never leaves a half-written model.pt."""
    blob = {"format": MODEL_FORMAT, "wsi_embed_version": __version__,
            "spec": asdict(model.spec), "members": [m.state_dict() for m in model.members],
            "threshold": model.threshold, **(extra or {})}
    with atomic_file(path) as tmp:
        torch.save(blob, tmp)


def load_model(path: Path, device: torch.device | str = "cpu") -> tuple[Ensemble, dict]:
    if not Path(path).is_file():
        raise ModelError(f"--model {path}: no such file (give the model.pt written by "
                         "`wsi-embed train`)")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for bad files
        raise ModelError(f"{path}: not a readable model file ({e})") from None
    if not isinstance(blob, dict) or blob.get("format") not in READABLE_FORMATS:
        raise ModelError(f"{path}: not a wsi-embed model (format {MODEL_FORMAT!r} expected)")
    try:
        members = []
        for sd in blob.get("members") or [blob["state_dict"]]:
            m = SlideModel(ModelSpec(**blob["spec"]))
            m.load_state_dict({"temperature": torch.ones(()),
                               "class_bias": torch.zeros(len(blob["spec"]["classes"])), **sd})
            members.append(m)
        model = Ensemble(members, blob.get("threshold"))
    except (TypeError, KeyError, ValueError, RuntimeError) as e:
        raise ModelError(f"{path}: its description does not fit its weights ({one_line(e)[:300]});"
                         " the file was edited or damaged: use the model.pt `wsi-embed train` "
                         "wrote, or train again") from None
    return model.to(device).eval(), blob


@torch.inference_mode()
def bag_logits(model: SlideModel, x: np.ndarray, device: torch.device | str = "cpu"
               ) -> HeadOutput:
    """The member's raw output for one whole bag (before its temperature)."""
    model.eval()
    t = torch.as_tensor(x, dtype=torch.float32, device=device).unsqueeze(0)
    return model(t, torch.ones(t.shape[:2], dtype=torch.bool, device=device))


@torch.inference_mode()
def predict_bag(model: SlideModel | Ensemble, x: np.ndarray,
                device: torch.device | str = "cpu"
                ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Calibrated class probabilities (C,), attention (N,) or None, and per-patch class
    probabilities (N, C) or None, for one whole bag; an ensemble's are its members' means."""
    members = model.members if isinstance(model, Ensemble) else [model]
    probs, attns, patches = [], [], []
    for m in members:
        out = bag_logits(m, x, device)
        t, b = m.temperature.float(), m.class_bias.float()
        probs.append(torch.softmax(out.logits.float() / t + b, -1)[0])
        if out.attention is not None:
            attns.append(out.attention[0].float())
        if out.patch_logits is not None:
            patches.append(torch.softmax(out.patch_logits.float() / t + b, -1)[0])

    def mean(xs):
        return torch.stack(xs).mean(0).cpu().numpy() if xs else None

    return mean(probs), mean(attns), mean(patches)


def decide(probs: np.ndarray, threshold: float | None) -> int:
    """The predicted class: argmax, or for a binary model with a threshold, class 1 when its
    probability reaches it."""
    if threshold is not None and len(probs) == 2:
        return int(probs[1] >= threshold)
    return int(np.argmax(probs))
