"""Shared fixtures: real slides, synthetic slides with known content, a CLI runner."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from wsi_embed.cli import app
from wsi_embed.synthetic import array_tile_fn, tissue_phantom, write_slide

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
CMU = ROOT / "sample_data" / "CMU-1-Small-Region.svs"
TCGA = DATA / "tcga-cr-7395-01a-01-ts1.svs"
NDPI = DATA / "fluorescence-dapi-40x.ndpi"
KIDNEY = DATA / "kidney-ihc-1493x901.tif"
DICOM = DATA / "bone-marrow-957x715.dcm"


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


def small_slide(path: Path, width: int = 2048, height: int = 1536, mpp: float = 0.5,
                aperio: bool = True, seed: int = 0, tile: int = 256, blur: float = 0.0) -> Path:
    """A small noisy slide (tissue-like colour everywhere) for geometry and batch tests.
    With `blur` (px), colour varies over a few pixels as stained tissue does, at full
    contrast: decoder comparisons then measure more than chroma upsampling of pure noise."""
    rng = np.random.default_rng(seed)
    if blur:
        img = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
        img = cv2.normalize(cv2.GaussianBlur(img, (0, 0), blur), None, 0, 255, cv2.NORM_MINMAX)
    else:
        img = rng.integers(120, 230, (height, width, 3), dtype=np.uint8)
    return write_slide(path, width, height, mpp, array_tile_fn(img), tile=tile, aperio=aperio,
                       downsamples=(1, 4))


@pytest.fixture
def slide_folder(tmp_path):
    """A folder of five small synthetic slides with distinct content."""
    folder = tmp_path / "slides"
    for i in range(5):
        small_slide(folder / f"s{i}.svs", 1024 + 256 * i, 1024, seed=i)
    return folder


def copy(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(src, dst)
    return dst
