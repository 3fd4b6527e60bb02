"""`wsi-embed weights fetch|list`: official checkpoints downloaded once into the
$WSI_EMBED_WEIGHTS layout (<dir>/<name>/<file>, found there by every command), with their
sha256 in a manifest, so array jobs read local files and never race on the hub."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from .encoders import PRESETS, gated_advice, hub_download, sha256_file
from .errors import UsageError
from .h5io import atomic_file

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"


def known() -> dict[str, tuple[str, str, bool]]:
    """Every patch and slide encoder with weights on the hub: name → (repo, file, gated)."""
    from .slide_encoders import SLIDE_PRESETS

    out = {n: (c.hf_repo, c.hf_file, c.gated) for n, c in PRESETS.items()}
    out |= {n: (c.hf_repo, c.hf_file, getattr(c, "gated", False))
            for n, c in SLIDE_PRESETS.items()}
    return out


def weights_dir(to: Path | None) -> Path:
    folder = to or (Path(os.environ["WSI_EMBED_WEIGHTS"]) if os.environ.get("WSI_EMBED_WEIGHTS")
                    else None)
    if folder is None:
        raise UsageError("give --to DIR or set $WSI_EMBED_WEIGHTS (the folder every command "
                         "looks in)")
    return folder


def read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else {}


def fetch(names: list[str], to: Path | None) -> dict:
    """Download each checkpoint (hub cache → copied into <to>/<name>/<file>) and record its
    sha256; one already there with its recorded sha256 is kept."""
    table = known()
    unknown = [n for n in names if n not in table]
    if unknown:
        raise UsageError(f"unknown encoder {', '.join(unknown)}; `wsi-embed encoders` and "
                         "`wsi-embed slide-encoders` list them")
    folder = weights_dir(to)
    manifest = read_manifest(folder)
    for name in names:
        repo, file, gated = table[name]
        if not repo:
            raise UsageError(f"{name}: no hub repository; download it by hand (see "
                             "`wsi-embed encoders`) to {folder}/{name}/")
        dest = folder / name / file
        entry = manifest.get(name)
        if dest.is_file() and entry and entry.get("sha256") == sha256_file(dest):
            log.info("%s: already at %s", name, dest)
            continue
        src, reason = hub_download(repo, file)
        if src is None:
            raise UsageError(f"{name}: cannot download {file} from {repo} ({reason}). "
                             + (gated_advice(repo) if gated else ""))
        dest.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(dest, dest.suffix) as tmp:
            shutil.copyfile(src, tmp)
        manifest[name] = {"file": f"{name}/{file}", "repo": repo, "sha256": sha256_file(dest),
                          "bytes": dest.stat().st_size}
        with atomic_file(folder / MANIFEST) as tmp:
            tmp.write_text(json.dumps(manifest, indent=2) + "\n")
        log.info("%s: %s (%d bytes)", name, dest, dest.stat().st_size)
    return manifest


def listing(to: Path | None) -> list[dict]:
    """What is in the folder: each recorded checkpoint, whether it is there and intact."""
    folder = weights_dir(to)
    manifest = read_manifest(folder)
    rows = []
    for name, entry in sorted(manifest.items()):
        path = folder / entry["file"]
        state = ("missing" if not path.is_file() else
                 "ok" if sha256_file(path) == entry["sha256"] else "changed (sha256 differs)")
        rows.append({"name": name, "file": str(path), "state": state,
                     "bytes": entry.get("bytes")})
    return rows
