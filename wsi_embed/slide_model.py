"""A trained slide-level model: the head, the feature standardisation fitted on its training
split, and what it was trained on (classes, feature encoder, weights, dim). `train` saves it,
`classify` loads it; `predict_bag` is the one prediction path both use."""

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

MODEL_FORMAT = "wsi-embed/model/1"


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

    def forward(self, x: torch.Tensor, mask: torch.Tensor, labels=None) -> HeadOutput:
        return self.head((x - self.mean) / self.std, mask, labels)


def save_model(path: Path, model: SlideModel, extra: dict | None = None) -> None:
    """Write atomically: a killed run never leaves a half-written model.pt."""
    blob = {"format": MODEL_FORMAT, "wsi_embed_version": __version__,
            "spec": asdict(model.spec), "state_dict": model.state_dict(), **(extra or {})}
    with atomic_file(path) as tmp:
        torch.save(blob, tmp)


def load_model(path: Path, device: torch.device | str = "cpu") -> tuple[SlideModel, dict]:
    if not Path(path).is_file():
        raise ModelError(f"--model {path}: no such file (give the model.pt written by "
                         "`wsi-embed train`)")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for bad files
        raise ModelError(f"{path}: not a readable model file ({e})") from None
    if not isinstance(blob, dict) or blob.get("format") != MODEL_FORMAT:
        raise ModelError(f"{path}: not a wsi-embed model (format {MODEL_FORMAT!r} expected)")
    try:
        model = SlideModel(ModelSpec(**blob["spec"]))
        model.load_state_dict(blob["state_dict"])
    except (TypeError, KeyError, ValueError, RuntimeError) as e:
        raise ModelError(f"{path}: its description does not fit its weights ({one_line(e)[:300]});"
                         " the file was edited or damaged: use the model.pt `wsi-embed train` "
                         "wrote, or train again") from None
    return model.to(device).eval(), blob


@torch.inference_mode()
def predict_bag(model: SlideModel, x: np.ndarray, device: torch.device | str = "cpu"
                ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Class probabilities (C,), attention (N,) or None, and per-patch class
    probabilities (N, C) or None, for one whole bag."""
    model.eval()
    t = torch.as_tensor(x, dtype=torch.float32, device=device).unsqueeze(0)
    out = model(t, torch.ones(t.shape[:2], dtype=torch.bool, device=device))
    probs = torch.softmax(out.logits.float(), -1)[0].cpu().numpy()
    attn = None if out.attention is None else out.attention[0].float().cpu().numpy()
    patch = (None if out.patch_logits is None
             else torch.softmax(out.patch_logits.float(), -1)[0].cpu().numpy())
    return probs, attn, patch
