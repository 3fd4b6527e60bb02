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
from .choices import FeatureNorm
from .errors import ModelError, one_line
from .feature_norm import Z_CLIP, to_normal
from .h5io import atomic_file
from .heads import HeadOutput, build_head
from .heads.mean import MeanMIL
from .tasks import decide, outputs

__all__ = ["Ensemble", "ModelSpec", "SlideModel", "decide", "load_model", "predict_bag",
           "save_model"]

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
    task: str = "classification"  # classes: the class names; else the output's name
    loss: str | None = None  # survival: cox or nll; regression: mse or huber
    n_out: int = 0  # head outputs; 0: one per class
    #: a multi-head model: [(target, its classes), ...]; `classes` then holds "target:class"
    groups: list | None = None
    feature_norm: str = "zscore"  # see choices.FeatureNorm; model files before it: zscore

    def __post_init__(self):
        """A classifier has one output per class (each head's classes adding up)."""
        FeatureNorm(self.feature_norm)  # ValueError for a value this version does not know
        if self.task == "classification":
            if self.n_out not in (0, len(self.classes)):
                raise ValueError(f"{len(self.classes)} classes but {self.n_out} outputs")
            if self.groups and sum(len(c) for _, c in self.groups) != len(self.classes):
                raise ValueError("the targets' classes do not add up to the model's")

    @property
    def outputs(self) -> int:
        return self.n_out or len(self.classes)


class SlideModel(nn.Module):
    """Standardise features with the training split's statistics (z-scores, clipped or not,
    or its quantiles mapped to a normal), then apply the head."""

    def __init__(self, spec: ModelSpec, mean: np.ndarray | None = None,
                 std: np.ndarray | None = None, quantiles: np.ndarray | None = None):
        super().__init__()
        self.spec = spec
        self.head = build_head(spec.head, spec.in_dim, spec.outputs, spec.dropout)
        self.register_buffer("mean", torch.as_tensor(
            np.zeros(spec.in_dim, np.float32) if mean is None else mean))
        self.register_buffer("std", torch.as_tensor(
            np.ones(spec.in_dim, np.float32) if std is None else std))
        # calibration on validation data: logits / temperature + class_bias
        self.register_buffer("temperature", torch.ones(()))
        self.register_buffer("class_bias", torch.zeros(spec.outputs))
        # regression: the training targets' scale (the head predicts standardised values)
        self.register_buffer("target_mean", torch.zeros(()))
        self.register_buffer("target_std", torch.ones(()))
        if spec.feature_norm == FeatureNorm.QUANTILE:
            if quantiles is None:
                raise ValueError("a quantile-normalised model without its quantile table")
            self.register_buffer("quantiles", torch.as_tensor(quantiles))

    def standardise(self, x: torch.Tensor) -> torch.Tensor:
        """Features as the head was trained to see them."""
        if self.spec.feature_norm == FeatureNorm.QUANTILE:
            return to_normal(x, self.quantiles)
        z = (x - self.mean) / self.std
        return z.clamp(-Z_CLIP, Z_CLIP) if self.spec.feature_norm == FeatureNorm.ZSCORE_CLIP else z

    def forward(self, x: torch.Tensor, mask: torch.Tensor, labels=None) -> HeadOutput:
        return self.head(self.standardise(x), mask, labels)

    def output(self, logits: torch.Tensor) -> torch.Tensor:
        """What it reports: calibrated probabilities, a risk or a value (see tasks)."""
        return outputs(self.spec, logits, self.temperature.float(), self.class_bias.float(),
                       self.target_mean.float(), self.target_std.float())


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
            m = SlideModel(ModelSpec(**blob["spec"]), quantiles=sd.get("quantiles"))
            m.load_state_dict({"temperature": torch.ones(()),
                               "class_bias": torch.zeros(m.spec.outputs),
                               "target_mean": torch.zeros(()), "target_std": torch.ones(()),
                               **sd})
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
    """The output (calibrated class probabilities (C,), or a risk or value (1,)), attention
    (N,) or None, and per-patch outputs (N, C) or None, for one whole bag; an ensemble's are
    its members' means."""
    members = model.members if isinstance(model, Ensemble) else [model]
    probs, attns, patches = [], [], []
    for m in members:
        out = bag_logits(m, x, device)
        probs.append(m.output(out.logits)[0])
        if out.attention is not None:
            attns.append(out.attention[0].float())
        if out.patch_logits is not None:
            patches.append(m.output(out.patch_logits)[0])

    def mean(xs):
        return torch.stack(xs).mean(0).cpu().numpy() if xs else None

    return mean(probs), mean(attns), mean(patches)


def _score(m: SlideModel, logits: torch.Tensor, index: int | None) -> torch.Tensor:
    """What a map explains, per row of logits (B, k): the predicted (or `index`) class's
    logit, the risk, or the value."""
    if m.spec.task == "classification":
        k = int(logits[0].argmax()) if index is None else index
        return logits[:, k]
    return m.output(logits)[:, 0]


def patch_contributions(model: SlideModel | Ensemble, x: np.ndarray,
                        device: torch.device | str = "cpu", index: int | None = None
                        ) -> tuple[np.ndarray, str]:
    """How much each patch (N,) pushes the reported score — the predicted class's logit
    (or class `index`), the risk, or the value — up or down; an ensemble's mean, and the
    method's name. The mean head: exactly, the score of the bag minus the score without the
    patch (leave-one-out, one batched call). Every other head: gradient × input over the
    standardised features, summed over dimensions."""
    members = model.members if isinstance(model, Ensemble) else [model]
    scores = []
    t = torch.as_tensor(x, dtype=torch.float32, device=device).unsqueeze(0)
    loo = isinstance(members[0].head, MeanMIL)
    for m in members:
        m.eval()
        z = m.standardise(t)
        if loo:
            with torch.inference_mode():
                n = z.shape[1]
                bag = z.mean(1)  # (1, D)
                without = (n * bag - z[0]) / max(n - 1, 1)  # (N, D)
                whole = m.head.mlp(bag)
                scores.append((_score(m, whole, index) - _score(m, m.head.mlp(without),
                                                                 _pick(m, whole, index)))
                              .float() if n > 1 else torch.zeros(n, device=z.device))
            continue
        with torch.inference_mode(False), torch.enable_grad():
            z = z.detach().clone().requires_grad_(True)
            logits = m.head(z, torch.ones(z.shape[:2], dtype=torch.bool, device=device)).logits
            (grad,) = torch.autograd.grad(_score(m, logits, index)[0], z)
        scores.append((grad * z).sum(-1)[0].detach().float())
    method = "leave-one-out" if loo else "gradient × input"
    return torch.stack(scores).mean(0).cpu().numpy(), method


def _pick(m: SlideModel, whole: torch.Tensor, index: int | None) -> int | None:
    """The class the whole bag's score is of, so the bag without a patch is scored alike."""
    if m.spec.task != "classification":
        return None
    return int(whole[0].argmax()) if index is None else index
