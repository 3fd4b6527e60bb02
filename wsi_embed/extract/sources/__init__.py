"""Reading patches for `extract`: the one place a way of reading is chosen and implemented.

- `choose_source` picks, per slide, a frozen `SourceSpec` (the kind, the level, sizes, why);
- `host` holds one class per way of reading on the host (`HOST_SOURCES`), `device_jpeg` the
  batched JPEG decoder on the device;
- `ReaderPool` runs the reads (reader processes, shared-memory slots, crash recovery) and
  hands back typed chunks (`HostChunk` in a slot, `DeviceChunk` on the device).

Imports only `slides`, `errors` and itself; names load on first use (the choices are
torch-free).
"""

from importlib import import_module

_NAMES = {"choose_source": "choose", "HOST_SOURCES": "host", "HostSource": "host",
          "read_patches": "host", "ReaderPool": "pool", "MAX_DEATHS": "pool",
          "Decode": "choices", "Reader": "choices", "DeviceChunk": "spec",
          "HostChunk": "spec", "ReadResult": "spec", "ReadTask": "spec", "SourceKind": "spec",
          "SourceSpec": "spec"}
__all__ = sorted(_NAMES)


def __getattr__(name: str):
    if name in _NAMES:
        return getattr(import_module(f".{_NAMES[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
