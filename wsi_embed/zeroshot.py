"""`wsi-embed zero-shot` and `wsi-embed search`: CONCH's contrastive space over stored
`conch_v1` features, so no slide is read again (except to draw figures).

Zero-shot follows MI-Zero as CONCH's code runs it: each patch's cosine similarity to each
class's prompt-ensembled text embedding, the slide's class score the mean of its top-k patch
similarities, probabilities the softmax of those scores times CONCH's logit scale.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .bags import BagStore, FeatureSet, scan_features
from .choices import Pooling
from .classify import (
    coords_for_maps,
    predict_slides,
    prediction_row,
    slide_paths,
    write_attention,
)
from .conch_text import ConchText, load_conch_text
from .errors import FeatureFileError, ModelError, UsageError, one_line
from .h5io import atomic_file
from .layout import OutputLayout
from .report import RunReport

log = logging.getLogger(__name__)

#: features these commands accept: CONCH's image tower, unprojected (TRIDENT's convention)
CONCH_IMAGE_ENCODERS = ("conch_v1",)
EXTRACT_HINT = "wsi-embed extract SLIDES --out OUT --encoder conch_v1"
#: prompt templates when the classes file gives none; CLASSNAME is replaced by each name
DEFAULT_TEMPLATES = [
    "CLASSNAME.", "an image of CLASSNAME.", "a histology image of CLASSNAME.",
    "a photomicrograph of CLASSNAME.", "an H&E image showing CLASSNAME.",
    "a microscopy image of CLASSNAME.", "tissue with CLASSNAME.", "CLASSNAME is present.",
]


@dataclass(frozen=True)
class ZeroShotConfig:
    features: Path
    classes: Path
    out: Path
    weights: str | None = None
    tokenizer: Path | None = None
    top_k: int = 50
    pooling: Pooling = Pooling.TOPK
    slides: Path | None = None
    labels: Path | None = None
    grid_k: int = 8  # patches per row of the top/bottom figure


def read_classes(path: Path) -> tuple[dict[str, list[str]], list[str]]:
    """The classes file (YAML): `classes: {name: [names...]}` and optional `templates`,
    or the class mapping alone. Returns (class → names, templates)."""
    import yaml

    if not path.is_file():
        raise UsageError(f"--classes {path}: no such file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: not a readable YAML file ({one_line(e)})") from None
    if not isinstance(data, dict) or not data:
        raise UsageError(f"{path}: no classes; write `classes:` with one line per class, "
                         "e.g. `tumor: [tumor, carcinoma]`")
    templates = data.get("templates", DEFAULT_TEMPLATES)
    raw = data.get("classes", {k: v for k, v in data.items() if k != "templates"})
    if not isinstance(raw, dict) or len(raw) < 2:
        raise UsageError(f"{path}: zero-shot needs at least two classes (found "
                         f"{len(raw) if isinstance(raw, dict) else 0})")
    classes = {}
    for name, names in raw.items():
        names = [names] if isinstance(names, str) else names
        names = [str(n).strip() for n in names or [] if str(n).strip()]
        if not names:
            raise UsageError(f"{path}: class {name!r} has no names; give it at least one "
                             "(e.g. its own name)")
        classes[str(name)] = names
    if not isinstance(templates, list) or not templates or \
            not all(isinstance(t, str) and "CLASSNAME" in t for t in templates):
        raise UsageError(f"{path}: templates must be a list of strings, each containing "
                         "CLASSNAME")
    return classes, templates


def conch_features(folder: Path) -> FeatureSet:
    fs = scan_features(folder, lenient=True)
    if fs.encoder not in CONCH_IMAGE_ENCODERS:
        raise FeatureFileError(
            f"features in {folder} come from encoder {fs.encoder!r}; CONCH's text tower only "
            f"matches CONCH image features: {EXTRACT_HINT}")
    return fs


def check_same_weights(fs: FeatureSet, conch: ConchText, folder: Path) -> None:
    if fs.weights != conch.weights_id:
        raise ModelError(f"features in {folder} were extracted with weights {fs.weights!r} but "
                         f"the CONCH checkpoint given is {conch.weights_id!r}; use the "
                         "checkpoint the features were extracted with")


def slide_scores(image: torch.Tensor, classes: torch.Tensor, scale: float, pooling: Pooling,
                 top_k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(patch × class cosine similarities, slide probabilities, patch probabilities)."""
    sim = image @ classes.T
    if pooling == Pooling.TOPK:
        k = min(top_k, len(sim))
        pooled = sim.topk(k, dim=0).values.mean(0)
    else:
        pooled = sim.mean(0)
    probs = torch.softmax(pooled * scale, dim=-1)
    patch_probs = torch.softmax(sim * scale, dim=-1)
    return sim.numpy(), probs.numpy(), patch_probs.numpy()


def run_zero_shot(cfg: ZeroShotConfig) -> RunReport:
    """Everything is checked before anything is written: a bad classes file, features of
    another encoder, a checkpoint without a text tower or a missing tokenizer end the run
    with one line."""
    classes, templates = read_classes(cfg.classes)
    if cfg.top_k < 1:
        raise UsageError("--top-k must be at least 1")
    fs = conch_features(cfg.features)
    conch = load_conch_text(cfg.weights, cfg.tokenizer)
    check_same_weights(fs, conch, cfg.features)
    slides = slide_paths(cfg.slides) if cfg.slides else {}
    names = list(classes)
    class_emb = conch.class_embeddings(classes, templates)
    scale = float(conch.model.logit_scale.exp())
    store = BagStore(fs.metas, cache_bytes=0)
    head = f"zero-shot conch_v1 ({cfg.pooling}{f' {cfg.top_k}' if cfg.pooling == 'topk' else ''})"
    probs_by_slide: dict[str, np.ndarray] = {}

    def one(sid: str, layout: OutputLayout) -> dict:
        if fs.metas[sid].n == 0:
            raise FeatureFileError("no patches (no tissue found); nothing to classify")
        with torch.inference_mode():
            image = conch.model.project_image(torch.from_numpy(store.get(sid)))
        sim, probs, patch_probs = slide_scores(image, class_emb, scale, cfg.pooling, cfg.top_k)
        coords, attrs = coords_for_maps(fs.metas[sid].path, len(sim), slides.get(sid))
        write_attention(layout.classify_output("attention", sid), coords, attrs, None,
                        patch_probs, probs, names, head, {"similarity": sim})
        probs_by_slide[sid] = probs
        row = prediction_row(names, probs)
        if sid in slides and len(coords):
            from .viz import slide_figures

            pred = int(probs.argmax())  # map what MI-Zero pooled: the similarities
            row["error"] = slide_figures(layout, sid, slides[sid], coords, attrs, sim[:, pred],
                                         patch_probs, probs, names, cfg.grid_k,
                                         "similarity") or ""
        return row

    report = predict_slides(fs, cfg.out, names, "zero-shot", one)
    if cfg.labels is not None:
        _write_metrics(cfg, fs, names, probs_by_slide)
    return report


def _write_metrics(cfg: ZeroShotConfig, fs: FeatureSet, names: list[str],
                   probs_by_slide: dict[str, np.ndarray]) -> None:
    """The same metrics as `train` on the slides whose label is one of the classes."""
    from .labels import read_labels
    from .tasks import classification_metrics

    table = read_labels(cfg.labels, fs)
    index = {n: i for i, n in enumerate(names)}
    y, rows, unknown = [], [], set()
    for sid, label in zip(table.slide_ids, (table.classes[i] for i in table.y), strict=True):
        if label not in index:
            unknown.add(label)
        elif sid in probs_by_slide:
            y.append(index[label])
            rows.append(probs_by_slide[sid])
    if unknown:
        log.warning("labels that are not classes of %s are left out of the metrics: %s",
                    cfg.classes, ", ".join(sorted(unknown)))
    if not rows:
        log.warning("no labelled slide was predicted: no metrics")
        return
    result = classification_metrics(np.array(y), np.stack(rows), len(names))
    with atomic_file(cfg.out / "metrics.json") as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
    log.info("zero-shot on %d labelled slides: AUC %.3f, balanced accuracy %.3f", result["n"],
             result["auc"], result["balanced_accuracy"])


# -- text search -----------------------------------------------------------------------------
@dataclass(frozen=True)
class SearchConfig:
    features: Path
    text: str
    out: Path
    weights: str | None = None
    tokenizer: Path | None = None
    top: int = 50
    slides: Path | None = None


@dataclass(frozen=True)
class Hit:
    score: float
    slide_id: str
    x: int
    y: int
    size0: int


def run_search(cfg: SearchConfig) -> list[Hit]:
    """The `top` patches over all slides closest to the text, best first: search.csv, one
    GeoJSON per slide with hits, and (with --slides) an image grid of the patches."""
    from .viz import patch_size_level0, write_geojson

    if not cfg.text.strip():
        raise UsageError("--text is empty")
    if cfg.top < 1:
        raise UsageError("--top must be at least 1")
    fs = conch_features(cfg.features)
    conch = load_conch_text(cfg.weights, cfg.tokenizer)
    check_same_weights(fs, conch, cfg.features)
    slides = slide_paths(cfg.slides) if cfg.slides else {}
    query = conch.text_embedding(cfg.text)
    store = BagStore(fs.metas, cache_bytes=0)
    hits: list[Hit] = []
    by_slide: dict[str, tuple[np.ndarray, np.ndarray, int]] = {}
    for sid, meta in sorted(fs.metas.items()):
        if meta.n == 0:
            continue
        try:
            with torch.inference_mode():
                score = (conch.model.project_image(torch.from_numpy(store.get(sid))) @ query)
            coords, attrs = coords_for_maps(meta.path, meta.n, slides.get(sid))
        except FeatureFileError as e:
            log.warning("%s: left out of the search (%s)", sid, e)
            continue
        if not len(coords):
            continue
        best = torch.topk(score, min(cfg.top, len(score))).indices.numpy()
        size0 = patch_size_level0(coords, attrs)
        hits += [Hit(float(score[i]), sid, int(coords[i, 0]), int(coords[i, 1]), size0)
                 for i in best]
        by_slide[sid] = (coords, score.numpy(), size0)
    hits = sorted(hits, key=lambda h: -h.score)[: cfg.top]
    if not hits:
        raise FeatureFileError(f"no patch with coords in {cfg.features} to search")
    layout = OutputLayout(cfg.out)
    cfg.out.mkdir(parents=True, exist_ok=True)
    with atomic_file(cfg.out / "search.csv") as tmp:
        lines = ["rank,slide_id,x,y,score"] + [f"{r},{h.slide_id},{h.x},{h.y},{h.score:.6f}"
                                               for r, h in enumerate(hits, start=1)]
        tmp.write_text("\n".join(lines) + "\n")
    for sid in sorted({h.slide_id for h in hits}):
        mine = [(r, h) for r, h in enumerate(hits, start=1) if h.slide_id == sid]
        write_geojson(layout.classify_output("geojson", sid),
                      np.array([[h.x, h.y] for _, h in mine]), by_slide[sid][2],
                      {"score": np.array([h.score for _, h in mine]),
                       "rank": np.array([r for r, _ in mine], float)}, f"{sid} search")
    if slides:
        _hit_grid(cfg.out / "search_patches.png", hits, slides, cfg.text)
    return hits


def _hit_grid(path: Path, hits: list[Hit], slides: dict[str, Path], text: str) -> None:
    """The hits as a grid of patches read from their slides, labelled rank and score."""
    import cv2

    from .slides import SlideError, open_slide
    from .viz import GRID_PX, write_png

    cols = 10
    cell = GRID_PX + 4
    rows = (len(hits) + cols - 1) // cols
    img = np.full((30 + rows * (cell + 16), cols * cell, 3), 255, np.uint8)
    cv2.putText(img, f"search: {text[:80]}", (6, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.55,
                (0, 0, 0), 1)
    for r, h in enumerate(hits):
        if h.slide_id not in slides:
            continue
        try:
            with open_slide(slides[h.slide_id]) as s:
                tile = s.read_region(h.x, h.y, 0, h.size0, h.size0)
        except (SlideError, OSError) as e:
            log.warning("%s: patch not drawn (%s)", h.slide_id, e)
            continue
        y0, x0 = 30 + (r // cols) * (cell + 16), (r % cols) * cell
        img[y0 + 16:y0 + 16 + GRID_PX, x0:x0 + GRID_PX] = cv2.resize(
            tile, (GRID_PX, GRID_PX), interpolation=cv2.INTER_AREA)
        cv2.putText(img, f"{r + 1} {h.score:.3f}", (x0 + 2, y0 + 12), cv2.FONT_HERSHEY_SIMPLEX,
                    0.4, (0, 0, 0), 1)
    write_png(path, img)
