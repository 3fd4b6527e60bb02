"""The labels CSV of `train` and `statistics`: which unit (a slide, or with patient bags a
patient) has which target, for each task (a class, a number, a survival time and event),
checked row by row so a wrong column or value is one line naming the file and the fix."""

from __future__ import annotations

import csv
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .choices import Task
from .errors import TrainError
from .layout import slide_id_problem

log = logging.getLogger(__name__)

#: cells that mean "no value" in the CSVs people export (pandas' default NA strings)
MISSING = {"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND",
           "1.#QNAN", "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"}
SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val",
               "test": "test"}
EVENT_VALUES = {"1": 1, "0": 0, "true": 1, "false": 0, "yes": 1, "no": 0, "1.0": 1, "0.0": 0}


@dataclass(frozen=True)
class TargetSpec:
    """Which columns hold the target of a task."""

    task: Task = Task.CLASSIFICATION
    target: str = "label"  # classification and regression
    time: str | None = None  # survival
    event: str | None = None

    def columns(self) -> list[str]:
        return [self.time or "time", self.event or "event"] if self.task == Task.SURVIVAL \
            else [self.target]


@dataclass
class LabelTable:
    slide_ids: list[str]  # the units predicted: slides, or patients with patient bags
    y: np.ndarray  # class index; a float; or (time, event) rows for survival
    patients: list[str]
    splits: list[str] | None  # train/val/test per unit when the CSV has a split column
    classes: list[str]  # class names; the output's name for survival and regression
    strata: np.ndarray  # what folds are stratified by: class, event, or value quartile
    task: Task = Task.CLASSIFICATION
    members: dict[str, list[str]] | None = None  # patient bags: unit → its slides
    groups: list | None = None  # multi-head: [(target, classes)]; y then (n, targets), -1 NA


def class_order(labels: list[str]) -> list[str]:
    """Numeric labels sort as numbers (0, 1, 2, 10), others alphabetically."""
    uniq = sorted(set(labels))
    try:
        return sorted(uniq, key=float)
    except ValueError:
        return uniq


def normalise_label(label: str) -> str:
    """Numbers are compared as numbers: "0", "0.0" and "+0" are one class, "0"."""
    try:
        x = float(label)
    except ValueError:
        return label
    if not math.isfinite(x):
        return label
    return str(int(x)) if x.is_integer() else repr(x)


def read_csv_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    if not path.is_file():
        raise TrainError(f"{path}: no such file")
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            cols = [c.strip() for c in reader.fieldnames or []]
            rows = [{k.strip(): (v or "").strip() for k, v in r.items() if k} for r in reader]
    except UnicodeDecodeError as e:
        raise TrainError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); save it as "
                         "UTF-8, e.g. `iconv -f latin1 -t utf-8 in.csv > out.csv`") from None
    except csv.Error as e:
        raise TrainError(f"{path}: not a readable CSV ({e})") from None
    return cols, rows


def _number(path: Path, line: int, col: str, value: str, task: Task) -> float:
    try:
        x = float(value)
    except ValueError:
        hint = (" (it holds class names: use --task classification)"
                if task == Task.REGRESSION else "")
        raise TrainError(f"{path} line {line}: column {col!r} is {value!r}, not a number; "
                         f"--task {task} needs numbers there{hint}") from None
    if not math.isfinite(x):
        raise TrainError(f"{path} line {line}: column {col!r} is {value!r}, not a finite "
                         "number")
    return x


def _target(path: Path, line: int, r: dict[str, str], spec: TargetSpec):
    """The row's target (None when missing): a class name, a float, or (time, event)."""
    if spec.task == Task.SURVIVAL:
        tcol, ecol = spec.columns()
        if r[tcol] in MISSING or r[ecol] in MISSING:
            return None
        time = _number(path, line, tcol, r[tcol], spec.task)
        if time < 0:
            raise TrainError(f"{path} line {line}: {tcol} is {time:g}, a negative time; "
                             "survival times count from diagnosis (or study entry) and are ≥ 0")
        event = EVENT_VALUES.get(r[ecol].lower())
        if event is None:
            raise TrainError(f"{path} line {line}: {ecol} is {r[ecol]!r}; the event column "
                             "holds 1 (event observed) or 0 (censored)")
        return (time, float(event))
    value = r[spec.target]
    if value in MISSING:
        return None
    if spec.task == Task.REGRESSION:
        return _number(path, line, spec.target, value, spec.task)
    return normalise_label(value)


def _check_columns(path: Path, cols: list[str], spec: TargetSpec) -> None:
    if "slide_id" not in cols:
        raise TrainError(f"{path}: no 'slide_id' column (columns: {', '.join(cols) or 'none'})")
    if spec.task == Task.SURVIVAL:
        for opt, col in (("--time", spec.time), ("--event", spec.event)):
            if col is None:
                raise TrainError(f"--task survival needs {opt} COL naming a column of {path} "
                                 f"(columns: {', '.join(cols)})")
            if col not in cols:
                raise TrainError(f"{path}: no {col!r} column for {opt} (columns: "
                                 f"{', '.join(cols)})")
    elif spec.target not in cols:
        raise TrainError(f"{path}: no {spec.target!r} column (columns: "
                         f"{', '.join(cols) or 'none'}); expected slide_id,{spec.target}"
                         "[,patient_id][,split], or name the column with --target")


def read_labels(path: Path, fs, spec: TargetSpec | None = None,
                patient_bags: bool = False) -> LabelTable:
    """The labelled slides that have features (with non-empty bags). Slides without features
    are listed in a warning and skipped; features without labels are counted and ignored;
    missing targets (empty, NA, NaN, ...) are dropped with a warning naming their lines.
    With `patient_bags` a patient's slides form one unit (their targets must agree)."""
    spec = spec or TargetSpec()
    if not path.is_file():
        raise TrainError(f"--labels {path}: no such file")
    cols, rows = read_csv_rows(path)
    _check_columns(path, cols, spec)
    seen: dict[str, object] = {}
    no_features, empty, kept, unlabelled_rows = [], [], [], []
    for i, r in enumerate(rows, start=2):
        sid = r["slide_id"]
        if not sid:
            raise TrainError(f"{path} line {i}: empty slide_id")
        why = slide_id_problem(sid)
        if why:
            raise TrainError(f"{path} line {i}: slide id {sid!r} is not usable: {why}")
        target = _target(path, i, r, spec)
        if target is None:
            unlabelled_rows.append(i)
            continue
        if sid in seen:
            if seen[sid] != target:
                raise TrainError(f"{path}: slide {sid!r} has two targets "
                                 f"({seen[sid]!r}, {target!r})")
            continue
        seen[sid] = target
        if fs is None:  # statistics: predictions, not features, say which slides count
            kept.append((r, target))
        elif sid not in fs.metas:
            no_features.append(sid)
        elif fs.metas[sid].n == 0:
            empty.append(sid)
        else:
            kept.append((r, target))
    if unlabelled_rows:
        log.warning("%s: %d rows have no %s (empty or NA) and are left out: lines %s%s",
                    path, len(unlabelled_rows), " or ".join(spec.columns()),
                    ", ".join(map(str, unlabelled_rows[:10])),
                    " ..." if len(unlabelled_rows) > 10 else "")
    if no_features:
        log.warning("%d labelled slides have no features file and are skipped: %s%s",
                    len(no_features), ", ".join(no_features[:10]),
                    " ..." if len(no_features) > 10 else "")
    if empty:
        log.warning("%d labelled slides have no patches (no tissue) and are skipped: %s",
                    len(empty), ", ".join(empty[:10]))
    unlabelled = len(set(fs.metas) - set(seen)) if fs is not None else 0
    if unlabelled:
        log.info("%d features files have no label and are ignored", unlabelled)
    if not kept:
        raise TrainError(f"none of the slide ids in {path} has a features file; ids are the "
                         "features files' names without .h5")
    splits = None
    if "split" in cols:
        bad = sorted({r["split"] for r, _ in kept if r["split"].lower() not in SPLIT_NAMES})
        if bad:
            raise TrainError(f"{path}: split values must be train, val or test; found "
                             f"{', '.join(map(repr, bad))}")
        splits = [SPLIT_NAMES[r["split"].lower()] for r, _ in kept]
    ids = [r["slide_id"] for r, _ in kept]
    patients = [r.get("patient_id") or r["slide_id"] for r, _ in kept]
    targets = [t for _, t in kept]
    members = None
    if patient_bags:
        ids, targets, splits, members = _pool_patients(path, ids, patients, targets, splits)
        patients = list(ids)
    return _table(path, spec, ids, targets, patients, splits, members)


def _pool_patients(path, ids, patients, targets, splits):
    """One unit per patient: its slides' bags are concatenated; their targets (and split)
    must agree."""
    members: dict[str, list[str]] = {}
    target: dict[str, object] = {}
    split: dict[str, str] = {}
    for k, (sid, p) in enumerate(zip(ids, patients, strict=True)):
        members.setdefault(p, []).append(sid)
        if target.setdefault(p, targets[k]) != targets[k]:
            raise TrainError(f"{path}: patient {p!r} has slides with different targets "
                             f"({target[p]!r}, {targets[k]!r}); --patient-bags needs one per "
                             "patient")
        if splits is not None and split.setdefault(p, splits[k]) != splits[k]:
            raise TrainError(f"{path}: patient {p!r} has slides in different splits")
        if slide_id_problem(p):
            raise TrainError(f"{path}: patient id {p!r} is not usable as a file name: "
                             f"{slide_id_problem(p)}")
    units = list(members)
    return (units, [target[p] for p in units],
            None if splits is None else [split[p] for p in units], members)


def _table(path, spec, ids, targets, patients, splits, members) -> LabelTable:
    if spec.task == Task.CLASSIFICATION:
        classes = class_order(targets)
        if len(classes) < 2:
            raise TrainError(f"{path}: only one class ({classes[0]!r}) among the slides with "
                             "features; a classifier needs at least two")
        index = {c: i for i, c in enumerate(classes)}
        y = np.array([index[c] for c in targets])
        return LabelTable(ids, y, patients, splits, classes, y, spec.task, members)
    if spec.task == Task.REGRESSION:
        y = np.array(targets, dtype=np.float64)
        if len(np.unique(y)) <= 2:
            raise TrainError(f"{path}: column {spec.target!r} holds only "
                             f"{len(np.unique(y))} distinct values "
                             f"({', '.join(f'{v:g}' for v in np.unique(y))}): class labels, not "
                             "a continuous target; use --task classification")
        edges = np.quantile(y, [0.25, 0.5, 0.75])
        return LabelTable(ids, y, patients, splits, [spec.target],
                          np.searchsorted(edges, y, side="right"), spec.task, members)
    y = np.array(targets, dtype=np.float64).reshape(-1, 2)
    n_events = int(y[:, 1].sum())
    if n_events < 2:
        raise TrainError(f"{path}: {n_events} events among the labelled slides; survival "
                         f"needs events (1 in {spec.event!r}) to learn from")
    return LabelTable(ids, y, patients, splits, ["risk"], y[:, 1].astype(int), spec.task,
                      members)
