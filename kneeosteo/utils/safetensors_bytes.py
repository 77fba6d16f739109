"""One byte string per content for safetensors files that carry metadata.

safetensors writes its ``__metadata__`` map in the order of a Rust ``HashMap``, which is random per
process and per map: the same tensors and the same metadata gave files with different bytes, so a
weights file's sha256 (kneeosteo's model id) changed from one identical training run to the next.
:func:`canonical` rewrites the header with the metadata keys sorted; the tensor entries keep the
writer's (deterministic) order and every data offset is unchanged, so any safetensors reader
loads the result exactly as the original.
"""

from __future__ import annotations

import json

__all__ = ["canonical"]


def canonical(data: bytes) -> bytes:
    """``data`` (a whole safetensors file) with its header's metadata keys in sorted order."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    meta = header.pop("__metadata__", None)
    ordered = {"__metadata__": dict(sorted(meta.items()))} if meta is not None else {}
    ordered.update(header)
    text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the format pads the header to a multiple of 8 with spaces
    return len(text).to_bytes(8, "little") + text + data[8 + n :]
