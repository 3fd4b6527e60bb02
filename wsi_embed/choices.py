"""Choices the CLI lists (how tissue is found, how zero-shot pools patch similarities, how
classify decides), apart from the code that uses them: no torch import for --help."""

from enum import StrEnum


class TissueMethod(StrEnum):
    AUTO = "auto"  # detect tissue on a thumbnail
    NONE = "none"  # the whole slide is tissue


class Edge(StrEnum):
    """Tissue at the slide's right and bottom edges, where a last patch would stick out."""

    DROP = "drop"  # only patches lying wholly inside the slide
    PAD = "pad"  # also the partial last row and column, padded with white (as glass)


class Pooling(StrEnum):
    TOPK = "topk"  # MI-Zero: mean of the top-k patch similarities per class
    MEAN = "mean"


class Threshold(StrEnum):
    ARGMAX = "argmax"
    VAL = "val"  # the binary threshold chosen on validation data (Youden), stored in the model


class FeatureNorm(StrEnum):
    """How features are scaled before a head (fitted on the training split, kept in the model)."""

    ZSCORE = "zscore"  # per-dimension mean and std
    ZSCORE_CLIP = "zscore-clip"  # the same, clipped to ±feature_norm.Z_CLIP σ
    QUANTILE = "quantile"  # per-dimension training quantiles to a standard normal


class Task(StrEnum):
    """What a slide-level model predicts."""

    CLASSIFICATION = "classification"
    SURVIVAL = "survival"  # a risk score from (time, event)
    REGRESSION = "regression"  # a number


class SurvivalLoss(StrEnum):
    COX = "cox"  # Cox partial likelihood over each batch (one risk output)
    NLL = "nll"  # discrete-time hazards over --bins time intervals (Zadeh & Schmid 2021)


class RegressionLoss(StrEnum):
    MSE = "mse"
    HUBER = "huber"


class DecodingMethod(StrEnum):
    GREEDY = "greedy"
    SAMPLE = "sample"  # top-k, top-p, temperature; seeded
    BEAM = "beam"


class HistoGPTSize(StrEnum):
    """HistoGPT's published sizes (head counts, which the weights do not hold), and the
    test fixture's."""

    B1 = "histogpt-1b"
    B3 = "histogpt-3b"
    TINY = "tiny"
