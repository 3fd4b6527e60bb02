"""`wsi-embed classify`: apply a trained model to a features folder; write predictions,
per-patch attention, and (given the slides) heatmaps, top/bottom patches and QuPath GeoJSON.

One slide's bad file is a row in the report, never the end of the run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .bags import BagStore, FeatureSet, scan_features
from .batch import discover
from .choices import Task
from .devices import pick_device
from .errors import FeatureFileError, ModelError, UsageError, describe_error, one_line
from .h5io import (
    WRITE_ERRORS,
    atomic_h5,
    read_patch_coords,
    remove_stale_tmp,
    set_attrs,
    write_coords_dataset,
)
from .heads import ATTENTION_MAPS
from .layout import OutputLayout
from .report import RunReport
from .slide_model import decide, load_model, patch_contributions, predict_bag
from .tasks import is_multi, output_cells, output_columns, segments

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClassifyConfig:
    features: Path
    model: Path
    out: Path
    slides: Path | None = None
    top_k: int = 8
    device: str = "auto"
    threshold: str = "argmax"  # or "val": the model's validation threshold (binary)


def check_compatible(spec, fs, features: Path) -> None:
    """Refuse features the model was not trained on (dim, encoder, weights)."""
    if fs.dim != spec.in_dim:
        raise ModelError(f"features in {features} are {fs.dim}-d but the model was trained on "
                         f"{spec.in_dim}-d features ({spec.encoder or 'unknown encoder'}); "
                         "use features from the model's encoder")
    for what, have, want in (("encoder", fs.encoder, spec.encoder),
                             ("weights", fs.weights, spec.weights)):
        if have != want:
            raise ModelError(f"features in {features} come from {what} {have!r} but the model "
                             f"was trained on {what} {want!r}; extract features with the "
                             "same encoder and weights as the training features")


#: how each per-patch score on the maps is made (the heatmap legend and attention/<id>.h5)
MAP_METHODS = {"attention": "the head's attention weights (sum to 1 over the slide)",
               "gradient × input": "d(score)/d(features) · features per patch, summed over "
                                   "features (+ raises the score)",
               "leave-one-out": "the score of the whole bag minus the score without the "
                                "patch (+ raises the score)"}


def write_attention(path: Path, coords: np.ndarray, coords_attrs: dict, attention, patch_probs,
                    probs: np.ndarray, classes: list[str], head: str,
                    extra: dict[str, np.ndarray] | None = None,
                    task: Task = Task.CLASSIFICATION, map_score: str | None = None,
                    groups=None, map_method: str | None = None) -> None:
    """`attention/<id>.h5`: coords, the head's attention, per-patch outputs, other per-patch
    scores (`extra`), the prediction; `map_score` names the dataset the maps show."""
    with atomic_h5(path) as f:
        attrs = {"schema": "wsi-embed/attention/1", "head": head, "task": str(task),
                 "classes": np.array(classes, dtype=object)}
        if is_multi(groups):
            attrs |= {"prediction": "; ".join(f"{n}: {cl[int(probs[s].argmax())]}"
                                              for n, s, cl in segments(groups)),
                      "probabilities": probs.astype(np.float32)}
        elif task == Task.CLASSIFICATION:
            attrs |= {"prediction": classes[int(probs.argmax())],
                      "probabilities": probs.astype(np.float32)}
        else:
            attrs |= {"prediction": float(probs[0]), "output": classes[0]}
        if map_score:
            method = map_method or map_score
            attrs |= {"map_score": map_score,
                      "map_method": f"{method}: {MAP_METHODS.get(method, '')}"}
        set_attrs(f, attrs)
        write_coords_dataset(f, coords, coords_attrs)
        if attention is not None:
            f.create_dataset("attention", data=attention.astype(np.float32))
        if patch_probs is not None:
            f.create_dataset("patch_probabilities", data=patch_probs.astype(np.float32))
        for name, data in (extra or {}).items():
            f.create_dataset(name, data=np.asarray(data, np.float32))


def slide_paths(folder: Path) -> dict[str, Path]:
    try:
        return {j.slide_id: j.path for j in discover([folder], recursive=True)}
    except UsageError as e:
        raise FeatureFileError(f"--slides: {e}") from None


def predict_slides(fs: FeatureSet, out: Path, classes: list[str], command: str,
                   predict_one: Callable[[str, OutputLayout], dict],
                   task: Task = Task.CLASSIFICATION, groups=None) -> RunReport:
    """The per-slide loop of `classify` and `zero-shot`: `predictions.csv` through a run
    report, one row per slide, a slide's failure (a bad file, a full disk) its row only."""
    layout = OutputLayout(out)
    out.mkdir(parents=True, exist_ok=True)
    for folder in layout.classify_dirs():
        remove_stale_tmp(folder)
    columns = ["slide_id", "n_patches", *output_columns(task, classes, groups), "status",
               "error"]
    with RunReport(layout.predictions, columns, command) as report:
        report.expect(sorted({*fs.metas, *fs.unreadable}))
        for sid, why in sorted(fs.unreadable.items()):
            report.add({"slide_id": sid, "status": "failed", "error": why})
        for sid in sorted(fs.metas):
            row = {"slide_id": sid, "n_patches": fs.metas[sid].n}
            try:
                row |= predict_one(sid, layout)
            except WRITE_ERRORS as e:  # a full disk, a file-size limit
                row |= {"status": "failed", "error": f"cannot write its outputs in {out} "
                        f"({one_line(e)[:300]}): free disk space and rerun"}
            except Exception as e:  # noqa: BLE001 - one slide never stops the run
                row |= {"status": "failed", "error": describe_error(e)}
            report.add(row)
    return report


def prediction_row(classes: list[str], probs: np.ndarray, threshold: float | None = None,
                   task: Task = Task.CLASSIFICATION, groups=None) -> dict:
    single = task == Task.CLASSIFICATION and not is_multi(groups)
    cells = output_cells(task, classes, probs, decide(probs, threshold) if single else None,
                         groups)
    return dict(zip(output_columns(task, classes, groups), cells, strict=True)) | {
        "status": "ok", "error": ""}


def run_classify(cfg: ClassifyConfig) -> RunReport:
    device = pick_device(cfg.device)
    model, _ = load_model(cfg.model, device)
    spec = model.spec
    threshold = None
    if cfg.threshold == "val":
        if model.threshold is None:
            raise ModelError(f"{cfg.model} has no validation threshold (only binary models "
                             "trained by this version have one); use --threshold argmax")
        threshold = model.threshold
    fs = scan_features(cfg.features, lenient=True)
    check_compatible(spec, fs, cfg.features)
    slides = slide_paths(cfg.slides) if cfg.slides else {}
    store = BagStore(fs.metas, cache_bytes=0)  # each bag is used once
    report = predict_slides(fs, cfg.out, spec.classes, "classify", lambda sid, layout:
                            _classify_one(sid, fs.metas[sid].path, store, model, device,
                                          layout, cfg.top_k, slides.get(sid), threshold),
                            Task(spec.task), spec.groups)
    if cfg.slides:
        missing = sorted(set(fs.metas) - set(slides))
        if missing:
            log.warning("no slide file in %s for %d slides (no heatmaps): %s", cfg.slides,
                        len(missing), ", ".join(missing[:10]))
    return report


def _microns_to_level0(path: Path, coords: np.ndarray, attrs: dict, slide_path: Path | None
                       ) -> tuple[np.ndarray, dict]:
    """STAMP writes coords in µm from the slide's origin; attention files, heatmaps and
    GeoJSON are in level-0 px, which takes the slide's MPP. Without it: no coords (and no
    maps), with a warning, rather than µm drawn as pixels."""
    from .errors import SlideError
    from .slides import open_slide

    why = "there is no slide for it (pass --slides)"
    if slide_path is not None:
        try:
            with open_slide(slide_path) as slide:
                mpp = slide.set_mpp()
            px = {"level0_mpp": mpp}
            if "tile_size_um" in attrs:
                px["patch_size_level0"] = round(float(attrs["tile_size_um"]) / mpp)
            return np.round(np.asarray(coords, np.float64) / mpp).astype(np.int64), px
        except (SlideError, OSError) as e:
            why = f"its slide's MPP cannot be read ({e})"
    log.warning("%s: coords are in µm (STAMP) and %s: no attention coords or maps", path, why)
    return np.zeros((0, 2), np.int64), {}


def coords_for_maps(path: Path, n_patches: int, slide_path: Path | None
                    ) -> tuple[np.ndarray, dict]:
    """A features file's patch coords in level-0 px for attention files, heatmaps and GeoJSON;
    none (with a warning) when they do not match the patches."""
    coords, coords_attrs = read_patch_coords(path)
    if coords_attrs.get("unit") == "um":
        coords, coords_attrs = _microns_to_level0(path, coords, coords_attrs, slide_path)
    if not len(coords) and n_patches == 1:  # a slide embedding: nothing to map
        return coords, coords_attrs
    if len(coords) != n_patches:
        log.warning("%s: %d coords for %d patches; no attention map", path, len(coords),
                    n_patches)
        coords = np.zeros((0, 2), np.int64)
    return coords, coords_attrs


def _classify_one(sid: str, path: Path, store: BagStore, model, device,
                  layout: OutputLayout, top_k: int, slide_path: Path | None,
                  threshold: float | None) -> dict:
    spec = model.spec
    if store.n_patches(sid) == 0:
        return {"status": "failed", "error": "no patches (no tissue found); nothing to classify"}
    task = Task(spec.task)
    x = store.get(sid)
    probs, attn, patch_probs = predict_bag(model, x, device)
    # the map: attention where a classifier has it; else each patch's contribution
    contribution, method = None, "attention"
    if spec.head not in ATTENTION_MAPS or task != Task.CLASSIFICATION:
        first = segments(spec.groups)[0] if is_multi(spec.groups) else None
        contribution, method = patch_contributions(  # multi-head: the first target's class
            model, x, device, None if first is None else
            first[1].start + int(np.argmax(probs[first[1]])))
    map_score = "attention" if contribution is None else "patch_contribution"
    coords, coords_attrs = coords_for_maps(path, store.n_patches(sid), slide_path)
    write_attention(layout.classify_output("attention", sid), coords, coords_attrs, attn,
                    patch_probs, probs, spec.classes, spec.head,
                    None if contribution is None else {"patch_contribution": contribution},
                    task, map_score if len(x) > 1 else None, spec.groups, method)
    row = prediction_row(spec.classes, probs, threshold, task, spec.groups)
    if slide_path is not None and len(coords):
        from .viz import slide_figures

        score = attn if contribution is None else contribution
        name = method
        headline = None if task == Task.CLASSIFICATION else [
            f"{sid}: predicted {spec.classes[0]} {float(probs[0]):.4g}",
            f"colour = {name} rank ({'risk' if task == Task.SURVIVAL else 'value'})"]
        if is_multi(spec.groups):
            headline = [f"{sid}: " + "; ".join(
                f"{n} {cl[int(probs[s].argmax())]} ({probs[s].max():.3f})"
                for n, s, cl in segments(spec.groups)), f"colour = {name} rank"]
        warn = slide_figures(layout, sid, slide_path, coords, coords_attrs, score,
                             patch_probs if task == Task.CLASSIFICATION else None,
                             probs, spec.classes, top_k, name, headline)
        if warn:
            row["error"] = warn
    return row
