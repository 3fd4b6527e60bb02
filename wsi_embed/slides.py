"""Opening slides, their resolution (MPP) and the choice of pyramid level to read from.

Everything downstream works in level-0 pixel coordinates and micrometres per pixel, so this
module is the one place that knows where an MPP came from and how a level is picked.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import SlideError

#: A level whose MPP is within this ratio of the target is read natively (no resize).
MPP_TOLERANCE = 0.02
#: Plausible level-0 MPP for a brightfield or fluorescence WSI; outside it the metadata is
#: treated as absent (a 72 dpi TIFF default is ~353 µm/px, not a scan resolution).
PLAUSIBLE_MPP = (0.05, 20.0)
#: Plain images are decoded whole into memory; larger ones are refused (--max-plain-pixels)
#: rather than swapping: 500 M px is 1.5 GB of RGB.
MAX_PLAIN_PIXELS = 500_000_000
#: A thumbnail is made from the pyramid level nearest its scale; a level larger than this
#: (a slide without a pyramid, or whose header lies about its size) is not read whole.
MAX_THUMBNAIL_SOURCE_PIXELS = 1 << 30
#: Declared pixels per stored byte beyond which a file lies about its size: a blank image
#: compresses about 1000:1, a header claiming 39,000 x 39,000 px in 5 KB is 300,000:1.
MAX_PIXELS_PER_BYTE = 10_000

SLIDE_EXTENSIONS = (
    ".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif",
    ".dcm", ".qptiff", ".czi", ".isyntax",
)
#: Formats that look like slides but that no reader here understands, with what to do.
UNSUPPORTED_HINTS = {
    ".czi": "Zeiss CZI is not readable by OpenSlide; convert it to OME-TIFF (e.g. bfconvert)",
    ".isyntax": "Philips iSyntax is not readable by OpenSlide; convert it to TIFF first",
}


@dataclass(frozen=True)
class Level:
    width: int
    height: int
    downsample: float
    mpp: float


@dataclass(frozen=True)
class PatchGeometry:
    """How a patch of `patch_size` px at `target_mpp` maps onto the slide."""

    patch_size: int
    target_mpp: float
    level: int
    read_size: int  # pixels read at `level`, then resized to patch_size
    patch_size_level0: int
    downsample: float  # downsample of `level`

    @property
    def native(self) -> bool:
        return self.read_size == self.patch_size


@dataclass
class Slide:
    """An open slide: metadata plus an RGB region reader. Close it (or use `with`)."""

    path: Path
    vendor: str
    width: int
    height: int
    level_dims: list[tuple[int, int]]
    level_downsamples: list[float]
    metadata_mpp: float | None
    metadata_mpp_source: str  # where it came from, or why none was taken
    objective_power: float | None
    properties: dict[str, str] = field(default_factory=dict)
    associated_images: list[str] = field(default_factory=list)
    mpp: float | None = None
    mpp_source: str = ""
    _handle: object = None
    _pixels: np.ndarray | None = None

    # -- resolution -------------------------------------------------------------------
    def set_mpp(self, override: float | None = None, override_source: str = "") -> float:
        """Fix the level-0 MPP: a user value wins over metadata; none at all is an error."""
        fix = ("Give it with --slide-mpp MPP, or an 'mpp' column in the --slide-list CSV for "
               "this slide.")
        if override is not None:
            why = mpp_problem(override)
            if why:
                raise SlideError(f"{self.path}: MPP {override!r} from {override_source} {why}")
            self.mpp, self.mpp_source = float(override), override_source
        elif self.metadata_mpp is not None:
            self.mpp, self.mpp_source = self.metadata_mpp, self.metadata_mpp_source
        elif self.metadata_mpp_source:  # found, but not a scan's resolution
            raise SlideError(f"{self.path}: the slide's metadata MPP is not usable: "
                             f"{self.metadata_mpp_source}. {fix}")
        else:
            raise SlideError(f"{self.path}: no microns-per-pixel (MPP) in the slide's "
                             f"metadata. {fix}")
        return self.mpp

    @property
    def levels(self) -> list[Level]:
        if self.mpp is None:
            raise SlideError(f"{self.path}: MPP not set")
        return [
            Level(w, h, float(d), self.mpp * float(d))
            for (w, h), d in zip(self.level_dims, self.level_downsamples, strict=True)
        ]

    def geometry(self, patch_size: int, target_mpp: float) -> PatchGeometry:
        """Pick the coarsest level still at least as fine as the target (DESIGN.md)."""
        levels = self.levels
        ok = [i for i, lv in enumerate(levels) if lv.mpp <= target_mpp * (1 + MPP_TOLERANCE)]
        level = max(ok, key=lambda i: levels[i].downsample) if ok else 0
        lv = levels[level]
        if abs(lv.mpp / target_mpp - 1) <= MPP_TOLERANCE:
            read = patch_size
            ps0 = round(patch_size * lv.downsample)
        else:
            ps0 = round(patch_size * target_mpp / self.mpp)
            read = max(1, round(patch_size * target_mpp / lv.mpp))
        return PatchGeometry(patch_size, target_mpp, level, read, ps0, lv.downsample)

    # -- pixels -----------------------------------------------------------------------
    def read_region(self, x: int, y: int, level: int, w: int, h: int) -> np.ndarray:
        """RGB uint8 (h, w, 3) at `level`, top-left (x, y) in level-0 px; outside is white."""
        if self._pixels is not None:
            return crop_padded(self._pixels, x, y, w, h)
        region = np.asarray(self._handle.read_region((int(x), int(y)), level, (int(w), int(h))))
        rgb = region[..., :3].copy()
        rgb[region[..., 3] == 0] = 255  # transparent = no scanned data: treat as glass
        return rgb

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        self._pixels = None

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def crop_padded(img: np.ndarray, x: int, y: int, w: int, h: int,
                out: np.ndarray | None = None) -> np.ndarray:
    """(h, w, 3) of `img` at top-left (x, y), white outside it; into `out` when given."""
    x0, y0 = max(x, 0), max(y, 0)
    x1, y1 = min(x + w, img.shape[1]), min(y + h, img.shape[0])
    if out is None:
        out = np.full((h, w, 3), 255, np.uint8)
    elif (x0, y0, x1, y1) != (x, y, x + w, y + h):
        out[:] = 255
    if x1 > x0 and y1 > y0:
        out[y0 - y : y1 - y, x0 - x : x1 - x] = img[y0:y1, x0:x1]
    return out


def _float(v: str | None) -> float | None:
    try:
        f = float(v) if v not in (None, "") else None
    except ValueError:
        return None
    return f if f is not None and math.isfinite(f) and f > 0 else None


def mpp_problem(mpp: float) -> str | None:
    """Why `mpp` cannot be a slide scan's level-0 resolution, or None when it can."""
    if not (isinstance(mpp, int | float) and math.isfinite(mpp) and mpp > 0):
        return "is not a positive number"
    lo, hi = PLAUSIBLE_MPP
    if not lo <= mpp <= hi:
        return (f"is outside the plausible range {lo:g}-{hi:g} µm/px of a slide scan "
                "(20x is about 0.5, 40x about 0.25)")
    return None


def _plausible(mpp: float, source: str) -> tuple[float | None, str]:
    """(mpp, its source), or (None, why it is not used) when it is implausible (a 72 dpi
    TIFF default is ~353 µm/px, not a scan resolution)."""
    why = mpp_problem(mpp)
    return (None, f"{mpp:g} µm/px from {source} {why}") if why else (mpp, source)


def mpp_from_properties(props: dict[str, str]) -> tuple[float | None, str]:
    """MPP from OpenSlide properties, else from TIFF resolution tags (cm or inch): (mpp,
    where from), or (None, why none was taken: "" when there is none at all)."""
    mx, my = _float(props.get("openslide.mpp-x")), _float(props.get("openslide.mpp-y"))
    if mx and my:
        return _plausible((mx + my) / 2, "openslide.mpp-x/y")
    if mx:
        return _plausible(mx, "openslide.mpp-x")
    res, unit = _float(props.get("tiff.XResolution")), props.get("tiff.ResolutionUnit", "")
    per_um = {"centimeter": 1e4, "inch": 25400.0}.get(unit.lower())
    if res and per_um:
        return _plausible(per_um / res, f"TIFF resolution tags ({unit})")
    return None, ""


def dicom_series_uid(path: Path) -> str | None:
    """The series a DICOM file belongs to, as OpenSlide sees it, or None when it cannot be
    opened. A DICOM slide is a series of files (one per level, plus label and overview) and
    OpenSlide opens the whole series from any one of them."""
    try:
        with open_slide(path) as slide:
            return slide.properties.get("dicom.SeriesInstanceUID")
    except SlideError:
        return None


def open_slide(path: str | os.PathLike, max_plain_pixels: int | None = MAX_PLAIN_PIXELS
               ) -> Slide:
    """Open with OpenSlide, else as a plain (non-pyramidal) image (decoded whole, refused
    above `max_plain_pixels`); SlideError if neither."""
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise SlideError(f"{path}: a symbolic link to nothing (its target is missing, or the "
                         "links form a loop); fix or remove the link")
    if not path.is_file():
        raise SlideError(f"{path}: no such file")
    hint = UNSUPPORTED_HINTS.get(path.suffix.lower())
    if hint:
        raise SlideError(f"{path}: unsupported format. {hint}")
    import openslide

    try:
        handle = openslide.OpenSlide(str(path))
    except openslide.OpenSlideUnsupportedFormatError:
        return _open_plain(path, max_plain_pixels)
    except openslide.OpenSlideError as e:
        raise SlideError(f"{path}: OpenSlide cannot read it ({e}); the file may be corrupt or "
                         "truncated") from e
    props = dict(handle.properties)
    if props.get("openslide.vendor") == "generic-tiff":
        why = multiplex_problem(path)
        if why:
            handle.close()
            raise SlideError(why)
    mpp, source = mpp_from_properties(props)
    return Slide(
        path=path,
        vendor=props.get("openslide.vendor", "unknown"),
        width=handle.dimensions[0],
        height=handle.dimensions[1],
        level_dims=list(handle.level_dimensions),
        level_downsamples=list(handle.level_downsamples),
        metadata_mpp=mpp,
        metadata_mpp_source=source,
        objective_power=_float(props.get("openslide.objective-power")),
        properties=props,
        associated_images=list(handle.associated_images),
        _handle=handle,
    )


def _open_plain(path: Path, max_pixels: int | None) -> Slide:
    """Fallback for ordinary images (stripped TIFF, PNG, JPEG): one level, held in memory."""
    pixels, props = read_plain_image(path, max_pixels)
    mpp, source = mpp_from_properties(props)
    h, w = pixels.shape[:2]
    return Slide(path=path, vendor="plain-image", width=w, height=h, level_dims=[(w, h)],
                 level_downsamples=[1.0], metadata_mpp=mpp, metadata_mpp_source=source,
                 objective_power=None, properties=props, _pixels=pixels)


def multiplex_problem(path: Path) -> str | None:
    """Why a TIFF is no brightfield slide: several full-size grey-level pages are the
    channels of a multiplex (fluorescence) image, of which OpenSlide would read the first."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tf:
            first = tf.pages[0]
            if first.samplesperpixel != 1:
                return None
            channels = sum(1 for p in tf.pages if p.shape[:2] == first.shape[:2]
                           and p.samplesperpixel == 1)
    except (tifffile.TiffFileError, OSError, IndexError):
        return None
    if channels < 2:
        return None
    return (f"{path}: a multiplex image of {channels} grey-level channels (e.g. Akoya "
            "qptiff), of which only the first would be read; the encoders take RGB "
            "brightfield images: export an RGB composite (e.g. from QuPath) and use that")


def read_plain_image(path: str | os.PathLike, max_pixels: int | None = MAX_PLAIN_PIXELS
                     ) -> tuple[np.ndarray, dict[str, str]]:
    """The RGB uint8 pixels of a non-pyramidal image, decoded whole, and its resolution tags
    as OpenSlide-style properties. SlideError, before anything is decoded, when the file
    cannot hold the size it declares or the image is larger than `max_pixels`."""
    import tifffile

    path = Path(path)
    props: dict[str, str] = {}
    try:
        tif = tifffile.TiffFile(path)
    except Exception:  # noqa: BLE001 - not a TIFF: PNG, JPEG, ... below
        tif = None
    if tif is not None:
        with tif:
            page = tif.pages[0]
            h, w = page.shape[:2] if len(page.shape) >= 2 else (0, 0)
            _check_plain_size(path, w, h, max_pixels, sum(page.databytecounts),
                              max((o + c for o, c in zip(page.dataoffsets, page.databytecounts,
                                                         strict=True)), default=0))
            pixels = page.asarray()
            tags = page.tags
            if "XResolution" in tags and "ResolutionUnit" in tags:
                num, den = tags["XResolution"].value
                props["tiff.XResolution"] = str(num / den if den else 0)
                unit = tags["ResolutionUnit"].value
                props["tiff.ResolutionUnit"] = {2: "inch", 3: "centimeter"}.get(int(unit), "none")
    else:
        import cv2
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as im:  # reads the header only
                w, h = im.size
        except (UnidentifiedImageError, OSError):
            w = h = 0
        if w and h:
            _check_plain_size(path, w, h, max_pixels, path.stat().st_size, 0)
        pixels = cv2.imread(str(path), cv2.IMREAD_COLOR) if w and h else None
        if pixels is None:
            raise SlideError(f"{path}: not a slide or image format that OpenSlide, tifffile or "
                             "OpenCV can read (unsupported or corrupt file)") from None
        pixels = pixels[..., ::-1]
    return np.ascontiguousarray(_to_rgb8(pixels, path)), props


def _check_plain_size(path: Path, w: int, h: int, max_pixels: int | None, stored: int,
                      data_end: int) -> None:
    """Refuse, before decoding, an image whose file cannot hold what it declares, or one
    larger than `max_pixels` (decoded whole, it would take 3 bytes a pixel of memory)."""
    n = w * h
    size = path.stat().st_size
    if data_end > size:
        raise SlideError(f"{path}: its image data runs to byte {data_end} but the file has "
                         f"{size} bytes (truncated or damaged file)")
    if n > MAX_PIXELS_PER_BYTE * max(stored, 1):
        raise SlideError(f"{path}: declares {w} x {h} px but holds only {stored} bytes of "
                         "image data: the file lies about its size (damaged or crafted)")
    if max_pixels is not None and n > max_pixels:
        raise SlideError(f"{path}: a non-pyramidal image of {w} x {h} px would be decoded whole "
                         f"({3 * n / 2**30:.1f} GiB of memory), more than --max-plain-pixels "
                         f"{max_pixels}; convert it to a tiled pyramidal TIFF (e.g. `vips "
                         "tiffsave in.tif out.tif --tile --pyramid --compression jpeg`) or "
                         "raise --max-plain-pixels")


def _to_rgb8(a: np.ndarray, path: Path) -> np.ndarray:
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] not in (3, 4):
        raise SlideError(f"{path}: image of shape {a.shape} is not an RGB(A) picture")
    a = a[..., :3]
    if a.dtype != np.uint8:
        hi = float(a.max()) or 1.0
        a = (a.astype(np.float32) * (255.0 / hi)).clip(0, 255).astype(np.uint8)
    return a


def slide_info(slide: Slide) -> dict:
    """Everything `wsi-embed info` prints, as plain data (JSON-ready)."""
    levels = []
    for (w, h), d in zip(slide.level_dims, slide.level_downsamples, strict=True):
        levels.append({"width": w, "height": h, "downsample": round(float(d), 4),
                       "mpp": round(slide.metadata_mpp * d, 5) if slide.metadata_mpp else None})
    return {
        "path": str(slide.path),
        "vendor": slide.vendor,
        "width": slide.width,
        "height": slide.height,
        "mpp": slide.metadata_mpp,
        "mpp_source": slide.metadata_mpp_source or "none",
        "objective_power": slide.objective_power,
        "objective_power_source": "openslide.objective-power" if slide.objective_power else "none",
        "levels": levels,
        "associated_images": slide.associated_images,
        "size_bytes": slide.path.stat().st_size,
    }


def read_thumbnail(slide: Slide, downsample: float, chunk: int = 4096) -> np.ndarray:
    """RGB image of the whole slide at `downsample` (level-0 px per thumbnail px).

    Reads the coarsest level that is still at least as fine, in chunks, resizing each, so
    memory stays bounded by the output plus one chunk whatever the slide size.
    """
    import cv2

    downsample = max(float(downsample), 1.0)
    out_w = max(1, math.ceil(slide.width / downsample))
    out_h = max(1, math.ceil(slide.height / downsample))
    fine = [i for i, d in enumerate(slide.level_downsamples) if d <= downsample * 1.001]
    level = max(fine, key=lambda i: slide.level_downsamples[i]) if fine else 0
    lw, lh = slide.level_dims[level]
    if lw * lh > MAX_THUMBNAIL_SOURCE_PIXELS:
        raise SlideError(
            f"{slide.path}: the coarsest level to make a thumbnail from is {lw} x {lh} px "
            f"(a {slide.path.stat().st_size / 2**20:.1f} MB file): no pyramid to read it "
            "from in reasonable time, or a header that lies about the size. Re-save it as "
            "a pyramidal TIFF (e.g. `vips tiffsave in out.tif --tile --pyramid "
            "--compression jpeg`)")
    ld = float(slide.level_downsamples[level])
    scale = ld / downsample  # level px -> thumbnail px
    thumb = np.full((out_h, out_w, 3), 255, np.uint8)
    for ly in range(0, lh, chunk):
        for lx in range(0, lw, chunk):
            cw, ch = min(chunk, lw - lx), min(chunk, lh - ly)
            tx0, ty0 = round(lx * scale), round(ly * scale)
            tx1 = min(out_w, round((lx + cw) * scale))
            ty1 = min(out_h, round((ly + ch) * scale))
            if tx1 <= tx0 or ty1 <= ty0:
                continue
            region = slide.read_region(round(lx * ld), round(ly * ld), level, cw, ch)
            thumb[ty0:ty1, tx0:tx1] = cv2.resize(region, (tx1 - tx0, ty1 - ty0),
                                                 interpolation=cv2.INTER_AREA)
    return thumb
