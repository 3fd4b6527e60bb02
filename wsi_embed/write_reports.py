"""`wsi-embed report`: a pathology report per slide from its CTransPath features with
HistoGPT. One slide's failure is its row; the others go on. The tokenizer is transformers'
BioGptTokenizer (as the reference), from files placed beside the checkpoint: nothing is
downloaded at run time."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .bags import scan_features
from .devices import pick_device
from .errors import ModelError, UsageError, describe_error
from .extract.config import Precision
from .h5io import atomic_file, read_features, remove_stale_tmp
from .histogpt import (
    SIZES,
    Decoding,
    HistoGPT,
    HistoGPTConfig,
    config_from_state_dict,
    generate,
    heads_for,
    read_configs,
)
from .report import RunReport

log = logging.getLogger(__name__)

#: HistoGPT reads CTransPath features of 256 px patches at about 1 µm/px (its tutorial
#: patches 40× scans downscaled 4×), resized to 224
FEATURES_HINT = ("wsi-embed extract SLIDES --out OUT --encoder ctranspath --patch-size 256 "
                 "--target-mpp 1.0")
TOKENIZER_FILES = ("vocab.json", "merges.txt")


@dataclass(frozen=True)
class ReportConfig:
    features: Path
    model: str  # a checkpoint file or folder, or "random"
    out: Path
    size: str = "histogpt-1b"
    tokenizer: Path | None = None
    prompt: str = "Final diagnosis:"
    decoding: Decoding = Decoding()
    device: str = "auto"
    precision: Precision = Precision.FP32
    overwrite: bool = False


def load_tokenizer(folder: Path, where: str):
    try:
        import sacremoses  # noqa: F401 - BioGptTokenizer needs it; say so before it fails
        from transformers import BioGptTokenizer
    except ImportError:
        raise UsageError("wsi-embed report needs transformers and sacremoses: "
                         "pip install 'wsi-embed[report]'") from None
    missing = [f for f in TOKENIZER_FILES if not (folder / f).is_file()]
    if missing:
        raise UsageError(f"no BioGPT tokenizer in {folder} ({', '.join(missing)} missing; "
                         f"{where}): download vocab.json and merges.txt of microsoft/biogpt "
                         "(HistoGPT-1B) or microsoft/BioGPT-Large (3B) from the Hugging Face "
                         "hub and place them beside the checkpoint, or pass --tokenizer DIR")
    return BioGptTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))


def _checkpoint(path: Path) -> Path:
    if path.is_file():
        return path
    if path.is_dir():
        found = sorted(path.glob("*.pth")) + sorted(path.glob("*.pt"))
        if len(found) == 1:
            return found[0]
        raise ModelError(f"--model {path}: {'no' if not found else 'several'} .pth "
                         "checkpoints in the folder; give the file (e.g. "
                         "histogpt-1b-6k-pruned.pth)")
    raise ModelError(f"--model {path}: no such file or folder; download the HistoGPT "
                     "checkpoint (marr-peng-lab/histogpt on the Hugging Face hub)")


def load_histogpt(cfg: ReportConfig) -> tuple[HistoGPT, object, str]:
    """The model (eval), its tokenizer, and what to call its weights in the outputs."""
    if cfg.model == "random":
        if cfg.tokenizer is None:
            raise UsageError("--model random needs --tokenizer DIR (vocab.json, merges.txt)")
        torch.manual_seed(0)
        model = HistoGPT(SIZES[cfg.size])
        tok = load_tokenizer(cfg.tokenizer, "--tokenizer")
        weights = f"random ({cfg.size}: for tests only)"
    else:
        path = _checkpoint(Path(cfg.model))
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - torch raises many types for bad files
            raise ModelError(f"{path}: not a readable checkpoint ({e})") from None
        sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
        if not isinstance(sd, dict) or "histogpt.embed_tokens.weight" not in sd:
            raise ModelError(f"{path}: not a HistoGPT checkpoint (no histogpt.embed_tokens"
                             ".weight); give the official histogpt-*.pth")
        hidden = sd["histogpt.embed_tokens.weight"].shape[1]
        base = read_configs(path.parent, HistoGPTConfig(
            num_attention_heads=heads_for(hidden) or SIZES[cfg.size].num_attention_heads))
        try:
            config = config_from_state_dict(sd, base)
            model = HistoGPT(config)
            model.load_state_dict(sd, strict=True)
        except (KeyError, RuntimeError, ZeroDivisionError) as e:
            raise ModelError(f"{path}: does not load as HistoGPT ({str(e)[:300]}); use the "
                             "official checkpoint, with its config.json (e.g. "
                             "biogpt-large-config.json renamed) beside it for 3B") from None
        tok = load_tokenizer(cfg.tokenizer or path.parent, "--tokenizer or the checkpoint's "
                             "folder")
        weights = path.name
    if len(tok) != model.config.vocab_size:
        raise UsageError(f"the tokenizer has {len(tok)} tokens but the model "
                         f"{model.config.vocab_size}: use the tokenizer of this model's BioGPT")
    return model.eval(), tok, weights


def _check_features(fs, features: Path, config: HistoGPTConfig) -> None:
    if fs.encoder not in (None, "ctranspath"):
        raise UsageError(f"features in {features} come from encoder {fs.encoder!r}; HistoGPT "
                         f"reads CTransPath features: {FEATURES_HINT}")
    if fs.encoder is None:
        log.warning("%s: the features files do not name their encoder; HistoGPT needs "
                    "CTransPath features (%s)", features, FEATURES_HINT)
    if fs.dim != config.dim_feats:
        raise UsageError(f"features in {features} are {fs.dim}-d; HistoGPT reads "
                         f"{config.dim_feats}-d CTransPath features: {FEATURES_HINT}")
    if fs.weights == "random":
        log.warning("%s: features from random weights: reports for testing only", features)


def run_report(cfg: ReportConfig) -> RunReport:
    device = pick_device(cfg.device)
    model, tok, weights = load_histogpt(cfg)
    fs = scan_features(cfg.features, lenient=True)
    _check_features(fs, cfg.features, model.config)
    model = model.to(device)
    prompt = tok.encode(cfg.prompt)
    texts = cfg.out / "reports"
    texts.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(texts)
    autocast = (torch.autocast("cuda", dtype=cfg.precision.torch_dtype)
                if device.type == "cuda" and cfg.precision != Precision.FP32
                else contextlib.nullcontext())
    log.info("HistoGPT (%s, %d layers, width %d) on %s, %s decoding", weights,
             model.config.num_hidden_layers, model.config.hidden_size, device,
             cfg.decoding.method)
    columns = ["slide_id", "n_patches", "report", "status", "error"]
    with RunReport(cfg.out / "reports.csv", columns, "report") as report:
        report.expect(sorted({*fs.metas, *fs.unreadable}))
        for sid, why in sorted(fs.unreadable.items()):
            report.add({"slide_id": sid, "status": "failed", "error": why})
        for sid, meta in sorted(fs.metas.items()):
            row = {"slide_id": sid, "n_patches": meta.n}
            path = texts / f"{sid}.txt"
            try:
                if path.is_file() and not cfg.overwrite:
                    row |= {"report": path.read_text(), "status": "skipped",
                            "error": "report exists (--overwrite redoes it)"}
                elif meta.n == 0:
                    row |= {"status": "failed", "error": "no patches (no tissue found); "
                            "nothing to report on"}
                else:
                    x = torch.from_numpy(np.asarray(read_features(meta.path, meta.key),
                                                    np.float32))
                    with autocast:
                        ids = generate(model, x, prompt, cfg.decoding)
                    text = tok.decode(prompt[1:] + ids, skip_special_tokens=True).strip()
                    with atomic_file(path) as tmp:
                        tmp.write_text(text + "\n")
                    row |= {"report": text, "status": "ok", "error": ""}
            except Exception as e:  # noqa: BLE001 - one slide never stops the run
                row |= {"status": "failed", "error": describe_error(e)}
            report.add(row)
    return report
