"""Slide-level MIL heads. Each takes a padded batch of bags `x` (B, N, D) with a boolean
`mask` (B, N) (True = a real patch) and returns a `HeadOutput`. One file per head; the table
below is the only place that names them."""

from __future__ import annotations

from torch import nn

from .abmil import ABMIL
from .base import HeadOutput, masked_softmax
from .clam_sb import CLAMSB
from .linear import LinearProbe
from .mean import MeanMIL
from .resampler import Resampler
from .transmil import TransMIL

HEADS: dict[str, type[nn.Module]] = {
    "abmil": ABMIL,
    "resampler": Resampler,
    "transmil": TransMIL,
    "clam-sb": CLAMSB,
    "mean": MeanMIL,
    # for slide embeddings (bags of one): the linear probe, and the mean head's MLP
    "linear": LinearProbe,
    "mlp": MeanMIL,
}


#: heads meant for slide embeddings (bags of one); the others pool patches
SLIDE_EMBEDDING_HEADS = ("linear", "mlp")

#: heads whose attention weights are what a classifier's maps show; the others' maps (and
#: every head's for survival and regression) are per-patch contributions (gradient × input):
#: TransMIL's last-layer class-token attention ignores its first layer and PPEG's mixing
ATTENTION_MAPS = ("abmil", "resampler", "clam-sb")

#: random patches per training bag unless --bag-size says otherwise; TransMIL memorises
#: whole bags of a few hundred patches, and fresh random subsets each epoch prevent it
BAG_SIZE = {"transmil": 256}
DEFAULT_BAG_SIZE = 512


def default_bag_size(head: str) -> int:
    return BAG_SIZE.get(head, DEFAULT_BAG_SIZE)


def build_head(name: str, in_dim: int, n_classes: int, dropout: float = 0.25) -> nn.Module:
    """A head by name, for `in_dim` features and `n_classes` outputs."""
    if name not in HEADS:
        raise ValueError(f"unknown head {name!r}; choose one of {', '.join(HEADS)}")
    return HEADS[name](in_dim, n_classes, dropout=dropout)


__all__ = ["ATTENTION_MAPS", "BAG_SIZE", "HEADS", "SLIDE_EMBEDDING_HEADS",
           "HeadOutput", "build_head", "default_bag_size", "masked_softmax"]
