"""Choices of the slide-level commands that the CLI lists (how zero-shot pools patch
similarities, how classify decides), apart from the model code: no torch import for --help."""

from enum import StrEnum


class Pooling(StrEnum):
    TOPK = "topk"  # MI-Zero: mean of the top-k patch similarities per class
    MEAN = "mean"


class Threshold(StrEnum):
    ARGMAX = "argmax"
    VAL = "val"  # the binary threshold chosen on validation data (Youden), stored in the model
