"""Every path under `--out`, built in one place and proven to stay inside it.

Slide ids come from file names, slide lists, features files and labels CSVs, and each becomes
a file name here. An id such as `../../x` or `/etc/x` would otherwise write (or overwrite)
files outside the output folder, so ids are checked against one rule and every path is
resolved (symlinks followed) and checked to lie under the output folder.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .errors import SlideError, UsageError

#: The longest slide id: file systems allow 255 bytes a name, and outputs add suffixes.
MAX_ID_BYTES = 200
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def slide_id_problem(slide_id: str) -> str | None:
    """Why `slide_id` cannot name a file of its own, or None when it can."""
    if not slide_id or not slide_id.strip():
        return "it is empty"
    if "/" in slide_id or "\\" in slide_id:
        return "it holds a path separator ('/' or '\\'); an id is one file name"
    if slide_id.startswith("."):
        return "it starts with '.' (hidden or relative names are not slide ids)"
    if _CONTROL.search(slide_id):
        return "it holds a control character"
    if len(slide_id.encode("utf-8", "surrogateescape")) > MAX_ID_BYTES:
        return f"it is longer than {MAX_ID_BYTES} bytes"
    return None


def check_slide_id(slide_id: str, where: str) -> str:
    """`slide_id` when it is safe; else a usage error naming `where` it came from."""
    why = slide_id_problem(slide_id)
    if why:
        raise UsageError(f"{where}: slide id {slide_id!r} is not usable: {why}. Give a plain "
                         "name (letters, digits, '-', '_', '.') in a slide_id column.")
    return slide_id


@dataclass(frozen=True)
class OutputLayout:
    """The output folder of a run and the names of everything in it."""

    root: Path

    def inside(self, path: Path) -> Path:
        """`path`, after proving it resolves to a place under the output folder."""
        root = self.root.resolve()
        real = path.resolve()
        if real != root and root not in real.parents:
            raise SlideError(f"{path} resolves to {real}, outside the output folder {root}; "
                             "refusing to write there")
        return path

    def _per_slide(self, folder: Path, slide_id: str, suffix: str) -> Path:
        why = slide_id_problem(slide_id)
        if why:
            raise SlideError(f"slide id {slide_id!r} cannot name an output file: {why}")
        return self.inside(folder / f"{slide_id}{suffix}")

    # -- tile --------------------------------------------------------------------------
    @property
    def coords_dir(self) -> Path:
        return self.root / "coords"

    def coords(self, slide_id: str) -> Path:
        return self._per_slide(self.coords_dir, slide_id, ".h5")

    @property
    def thumbnails_dir(self) -> Path:
        return self.root / "thumbnails"

    def thumbnail(self, slide_id: str) -> Path:
        return self._per_slide(self.thumbnails_dir, slide_id, ".png")

    @property
    def tile_report(self) -> Path:
        return self.root / "tile_report.csv"

    # -- extract -----------------------------------------------------------------------
    def features_dir(self, encoder: str) -> Path:
        return self.inside(self.root / "features" / encoder)

    def features(self, encoder: str, slide_id: str) -> Path:
        return self._per_slide(self.features_dir(encoder), slide_id, ".h5")

    def extract_report(self, encoder: str) -> Path:
        return self.root / f"extract_report_{encoder}.csv"

    # -- encode-slides -----------------------------------------------------------------
    def slide_features_dir(self, slide_encoder: str) -> Path:
        return self.inside(self.root / "slide_features" / slide_encoder)

    def slide_features(self, slide_encoder: str, slide_id: str) -> Path:
        return self._per_slide(self.slide_features_dir(slide_encoder), slide_id, ".h5")

    def encode_slides_report(self, slide_encoder: str) -> Path:
        return self.root / f"encode_slides_report_{slide_encoder}.csv"

    # -- classify ----------------------------------------------------------------------
    @property
    def predictions(self) -> Path:
        return self.root / "predictions.csv"

    #: per-slide folders of `classify`, each with its file suffix
    CLASSIFY_DIRS = {"attention": ".h5", "heatmaps": ".png", "patches": ".png",
                     "geojson": ".geojson"}

    def classify_output(self, kind: str, slide_id: str) -> Path:
        return self._per_slide(self.root / kind, slide_id, self.CLASSIFY_DIRS[kind])

    def classify_dirs(self) -> list[Path]:
        return [self.root / kind for kind in self.CLASSIFY_DIRS]


def coords_in(folder: Path, slide_id: str) -> Path:
    """A coords file given with `--coords DIR`: `DIR/coords/<id>.h5` (a `tile` output folder)
    or `DIR/<id>.h5` (the coords folder itself); the first that exists, else the former."""
    nested = OutputLayout(folder).coords(slide_id)
    flat = folder / f"{slide_id}.h5"
    return flat if not nested.exists() and flat.exists() else nested
