"""`wsi-embed extract`: patch embeddings, from slides through reader processes and the device
into HDF5 features files.

- `config`: the run's settings (`ExtractConfig`) and its choices as enums;
- `run`: orchestration, coords, resume, several devices;
- `plan`: a frozen plan per slide (coords, provenance, the source that reads it);
- `pipeline`: the hot loop; `device`: batches onto the device and the encoder on them;
- `writer`: features into each slide's file (the only mutable per-slide state);
- `sources/`: the one place a way of reading patches is chosen and implemented.

Names are loaded on first use, so the CLI can list the choices without importing torch.
"""

from importlib import import_module

_NAMES = {"ExtractConfig": "config", "Precision": "config", "FeatureDtype": "config",
          "Reader": "config", "Decode": "config", "EXTRACT_COLUMNS": "run",
          "encoder_setup": "run", "run_extract": "run", "run_precision": "run"}
__all__ = sorted(_NAMES)


def __getattr__(name: str):
    if name in _NAMES:
        return getattr(import_module(f".{_NAMES[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
