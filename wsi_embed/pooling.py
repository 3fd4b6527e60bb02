"""How zero-shot pools patch similarities into slide scores: a choice the CLI lists, so it
lives apart from the model code (no torch import to print --help)."""

from enum import StrEnum


class Pooling(StrEnum):
    TOPK = "topk"  # MI-Zero: mean of the top-k patch similarities per class
    MEAN = "mean"
