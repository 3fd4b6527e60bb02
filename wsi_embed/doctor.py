"""`wsi-embed doctor`: check an installation before a long run, one line per check with
the fix. Nothing is downloaded: the hub is only asked whether it answers."""

from __future__ import annotations

import os
import platform
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

#: what one reader pool needs in /dev/shm at the defaults (slots of 256 px RGB batches)
SHM_NEEDED = 1 << 30


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""

    def line(self) -> str:
        mark = "✓" if self.ok else "✗"
        return f"{mark} {self.name}: {self.detail}" + ("" if self.ok else f" — fix: {self.fix}")


def check_python() -> Check:
    v = sys.version_info
    return Check("python", v >= (3, 11), platform.python_version(),
                 "use Python 3.11 or newer")


def check_torch() -> Iterator[Check]:
    try:
        import torch
    except ImportError as e:
        yield Check("torch", False, str(e), "pip install wsi-embed (it brings torch)")
        return
    yield Check("torch", True, torch.__version__)
    if not torch.cuda.is_available():
        yield Check("cuda", True, "no CUDA device: extract runs on the CPU (slow; fine for "
                    "tests)")
        return
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        yield Check(f"cuda:{i}", True, f"{p.name}, {p.total_memory / 2**30:.0f} GiB, bf16 "
                    f"{'yes' if torch.cuda.is_bf16_supported() else 'no (use --precision fp16)'}")


def check_openslide() -> Check:
    try:
        import openslide

        return Check("openslide", True, f"library {openslide.__library_version__}, python "
                     f"{openslide.__version__}")
    except Exception as e:  # noqa: BLE001 - a missing shared library raises OSError too
        return Check("openslide", False, str(e).splitlines()[0],
                     "pip install openslide-bin openslide-python")


def check_codecs() -> Iterator[Check]:
    try:
        import imagecodecs
    except ImportError as e:
        yield Check("imagecodecs", False, str(e), "pip install imagecodecs")
        return
    for codec, what in (("JPEG8", "JPEG tiles"), ("JPEG2K", "JPEG 2000 (Aperio 33003/5)"),
                        ("LZW", "LZW"), ("ZLIB", "Deflate")):
        ok = bool(getattr(getattr(imagecodecs, codec, None), "available", False))
        yield Check(f"codec {codec.lower()}", ok, f"{what} {'available' if ok else 'missing'}",
                    "reinstall imagecodecs from PyPI wheels")


def check_weights(names: list[str], env: dict[str, str] | None = None) -> Iterator[Check]:
    from .encoders import gated_advice, get_config, local_weights

    env = os.environ if env is None else env
    for name in names:
        cfg = get_config(name)
        local = local_weights(name, cfg.hf_file, env)
        cached = None
        if local is None and cfg.hf_repo:
            try:
                from huggingface_hub import try_to_load_from_cache

                hit = try_to_load_from_cache(cfg.hf_repo, cfg.hf_file)
                cached = Path(hit) if isinstance(hit, str) else None
            except Exception:  # noqa: BLE001 - no hub library, no cache
                cached = None
        where = local or cached
        yield Check(f"weights {name}", where is not None,
                    f"{where}" if where else "not on this machine",
                    f"download {cfg.hf_file} from "
                    f"{'https://huggingface.co/' + cfg.hf_repo if cfg.hf_repo else 'its source'}"
                    f" to $WSI_EMBED_WEIGHTS/{name}/{cfg.hf_file}"
                    + (f" ({gated_advice(cfg.hf_repo)})" if cfg.gated else ""))


def check_hub(need_token: bool, timeout: float = 3.0) -> Iterator[Check]:
    import urllib.request

    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    try:
        from huggingface_hub import get_token

        token = token or get_token()
    except Exception:  # noqa: BLE001
        pass
    try:
        urllib.request.urlopen(urllib.request.Request("https://huggingface.co", method="HEAD"),
                               timeout=timeout)
        yield Check("hub", True, "huggingface.co answers")
    except Exception as e:  # noqa: BLE001 - offline, proxy, DNS
        yield Check("hub", False, f"huggingface.co does not answer ({str(e)[:80]})",
                    "download weights elsewhere and place them under $WSI_EMBED_WEIGHTS")
    yield Check("hub token", bool(token) or not need_token,
                "set" if token else "none" + ("" if need_token else " (only gated models "
                                                                  "need one)"),
                "gated models (UNI, CONCH, Virchow, ...) need HF_TOKEN after accepting their "
                "licences")


def check_out(out: Path, need_gb: float = 10.0) -> Check:
    probe = out if out.exists() else next((p for p in out.parents if p.exists()), Path("/"))
    writable = os.access(probe, os.W_OK)
    free = shutil.disk_usage(probe).free / 1e9
    return Check(f"--out {out}", writable and free >= need_gb,
                 f"{'writable' if writable else 'not writable'}, {free:.1f} GB free",
                 f"choose a writable folder with at least {need_gb:g} GB free")


def check_shm(path: Path = Path("/dev/shm")) -> Check:
    if not path.exists():
        return Check("shared memory", False, f"no {path}", "readers need POSIX shared memory")
    free = shutil.disk_usage(path).free
    return Check("shared memory", free >= SHM_NEEDED, f"{path} {free / 2**30:.1f} GiB free",
                 "give containers more (docker --shm-size=8g; SLURM: request memory) or "
                 "lower --num-workers / --batch-size")


def run_doctor(encoders: list[str], out: Path | None, hub: bool = True) -> list[Check]:
    checks = [check_python(), *check_torch(), check_openslide(), *check_codecs(),
              *check_weights(encoders)]
    if hub:
        from .encoders import get_config

        checks += list(check_hub(any(get_config(e).gated for e in encoders)))
    if out is not None:
        checks.append(check_out(out))
    checks.append(check_shm())
    return checks
