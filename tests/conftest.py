"""Shared fixtures: real slides, synthetic slides with known content, a CLI runner."""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import sys
import tempfile
from copy import deepcopy
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from wsi_embed.cli import app
from wsi_embed.encoders import PRESETS, EncoderConfig
from wsi_embed.synthetic import array_tile_fn, tissue_phantom, write_slide

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
CMU = ROOT / "sample_data" / "CMU-1-Small-Region.svs"
TCGA = DATA / "tcga-cr-7395-01a-01-ts1.svs"
NDPI = DATA / "fluorescence-dapi-40x.ndpi"
KIDNEY = DATA / "kidney-ihc-1493x901.tif"
DICOM = DATA / "bone-marrow-957x715.dcm"


def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto`: one worker per core, at most 8 (each imports torch; a 64-core server would
    spend more on starting workers than it saves)."""
    return max(1, min(8, os.cpu_count() or 1))


def pytest_configure(config):
    """Under pytest-xdist each worker gets its share of the cores (and so do the processes
    its tests start): two workers of two threads on two cores spin against each other."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        threads = max(1, (os.cpu_count() or 1) // int(workers))
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


def cli(*args: str):
    """Invoke the real Typer app; returns the click Result (exit_code, output)."""
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="session")
def phantom(tmp_path_factory):
    """An 8000x6000 px, 0.5 µm/px Aperio-style slide with known tissue, faint tissue and ink."""
    ph = tissue_phantom()
    path = write_slide(tmp_path_factory.mktemp("phantom") / "phantom.svs", 8000, 6000, 0.5,
                       array_tile_fn(ph.image))
    return path, ph


@functools.cache
def _slides_cache() -> Path:
    """Where this session keeps the slides it made (removed when it ends)."""
    folder = Path(tempfile.mkdtemp(prefix="wsi-embed-test-slides-"))
    atexit.register(shutil.rmtree, folder, True)
    return folder


def small_slide(path: Path, width: int = 2048, height: int = 1536, mpp: float = 0.5,
                aperio: bool = True, seed: int = 0, tile: int = 256, blur: float = 0.0) -> Path:
    """`make_small_slide`, each distinct slide made once per session and copied."""
    made = _slides_cache() / f"{width}-{height}-{mpp}-{aperio}-{seed}-{tile}-{blur}{path.suffix}"
    if not made.exists():
        make_small_slide(made, width, height, mpp, aperio, seed, tile, blur)
    return copy(made, path)


def make_small_slide(path: Path, width: int, height: int, mpp: float, aperio: bool, seed: int,
                     tile: int, blur: float) -> Path:
    """A small noisy slide (tissue-like colour everywhere) for geometry and batch tests.
    With `blur` (px), colour varies over a few pixels as stained tissue does, at full
    contrast: decoder comparisons then measure more than chroma upsampling of pure noise.
    Red rises from left to right and green from top to bottom (±20 grey levels), so
    patches differ in their mean colour and a swapped or shifted patch shows."""
    rng = np.random.default_rng(seed)
    if blur:
        img = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
        img = cv2.normalize(cv2.GaussianBlur(img, (0, 0), blur), None, 20, 235,
                            cv2.NORM_MINMAX)
    else:
        img = rng.integers(120, 230, (height, width, 3), dtype=np.uint8)
    ramp = np.zeros((height, width, 3), np.int16)
    ramp[..., 0] = np.linspace(-20, 20, width, dtype=np.float32).round().astype(np.int16)
    ramp[..., 1] = np.linspace(-20, 20, height, dtype=np.float32).round()[:, None]
    img = (img + ramp).clip(0, 255).astype(np.uint8)
    return write_slide(path, width, height, mpp, array_tile_fn(img), tile=tile, aperio=aperio,
                       downsamples=(1, 4))


def dicom_series(folder: Path, factors: tuple[int, ...] = (1, 2), new_series: bool = False,
                 ) -> list[Path]:
    """A DICOM slide stored as one file per level, as scanners and IDC store them: the
    bone-marrow sample's pixels, downsampled by each factor into 256 px JPEG frames. Files
    are named by instance UID; `new_series` makes it a slide of its own."""
    import pydicom
    from pydicom.encaps import encapsulate
    from pydicom.uid import generate_uid

    from wsi_embed.slides import open_slide

    folder.mkdir(parents=True, exist_ok=True)
    base = pydicom.dcmread(DICOM)
    if new_series:
        base.SeriesInstanceUID = generate_uid()
    with open_slide(DICOM) as s:
        img = s.read_region(0, 0, 0, s.width, s.height)
    paths = []
    for k, f in enumerate(factors):
        h, w = -(-img.shape[0] // f), -(-img.shape[1] // f)
        level = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA) if f > 1 else img
        frames = []
        for y in range(0, h, 256):
            for x in range(0, w, 256):
                fr = np.full((256, 256, 3), 255, np.uint8)
                part = level[y : y + 256, x : x + 256]
                fr[: part.shape[0], : part.shape[1]] = part
                frames.append(cv2.imencode(".jpg", fr[..., ::-1])[1].tobytes())
        ds = deepcopy(base)  # levels must not share the nested pixel spacing
        ds.PixelData = encapsulate(frames)
        ds.NumberOfFrames, ds.InstanceNumber = len(frames), k + 1
        ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows = w, h
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        pm = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
        pm.PixelSpacing = [float(v) * f for v in pm.PixelSpacing]
        paths.append(folder / f"{ds.SOPInstanceUID}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    return paths


class ChannelMean(torch.nn.Module):
    """A test encoder whose output is a known function of the pixels: per-channel means in
    [0, 1]. Features of different patches differ, so a swapped or shifted row shows (random
    weights give nearly equal features for any tissue)."""

    def forward(self, x):
        return x.float().mean(dim=(2, 3))


def channel_mean(**_):
    return ChannelMean()


#: `wsi-embed` in a child process (run from ROOT), with the channel-mean encoder registered
#: as test_means
MEANS_CLI = [sys.executable, "-c",
             "import sys; from tests.conftest import MEANS_PRESET; "
             "from wsi_embed.encoders import PRESETS; PRESETS['test_means'] = MEANS_PRESET; "
             "from wsi_embed.cli import main; sys.argv[0] = 'wsi-embed'; main()"]

#: the channel-mean encoder as a preset: no normalisation, fp32, any device
MEANS_PRESET = EncoderConfig(channel_mean, {}, 3, mean_std=((0, 0, 0), (1, 1, 1)),
                             precision="fp32")


@pytest.fixture
def quick_checks(monkeypatch):
    """The reader pool checks its readers every 0.5 s instead of 5: a test that kills one
    waits less for the pool to notice."""
    import wsi_embed.extract.sources.pool as pool

    monkeypatch.setattr(pool, "CHECK_EVERY", 0.5)


@pytest.fixture
def means_encoder(monkeypatch):
    """The channel-mean encoder registered as `test_means` for this test."""
    monkeypatch.setitem(PRESETS, "test_means", MEANS_PRESET)
    return "test_means"


def patch_means(path: Path, coords: np.ndarray, level: int, read: int) -> np.ndarray:
    """What the channel-mean encoder must give for `coords`: OpenSlide's patches at `level`
    (read × read px), per-channel means in [0, 1]."""
    from wsi_embed.slides import open_slide

    with open_slide(path) as s:
        return np.stack([s.read_region(int(x), int(y), level, read, read).reshape(-1, 3)
                         .mean(0) / 255 for x, y in coords])


@pytest.fixture
def slide_folder(tmp_path):
    """A folder of five small synthetic slides with distinct content."""
    folder = tmp_path / "slides"
    for i in range(5):
        small_slide(folder / f"s{i}.svs", 1024 + 256 * i, 1024, seed=i)
    return folder


def last_run(merged: Path) -> dict[str, dict]:
    """The rows of the newest run's own report behind the merged report `merged` (what
    that run did: "skipped" where the merged view keeps an earlier "ok")."""
    import csv

    from wsi_embed.report import run_reports

    with open(run_reports(merged)[-1], newline="") as fh:
        return {r["slide_id"]: r for r in csv.DictReader(fh)}


def copy(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(src, dst)
    return dst


@pytest.fixture(autouse=True)
def one_seed_by_default(monkeypatch):
    """`train` without --seeds trains 5-seed ensembles on small cohorts, and every test
    cohort is small: tests get one model per fold unless they ask for more."""
    from wsi_embed import stats, train

    monkeypatch.setattr(train, "SMALL_COHORT", 0)
    # and statistics/ with fewer bootstrap resamples (tests of the CIs set their own)
    monkeypatch.setattr(stats, "BOOTSTRAP", 50)
