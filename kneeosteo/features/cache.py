"""On-disk tensor cache for preprocessed inputs and frozen-backbone features.

Keys are sha256 digests of a descriptor naming *everything* that shaped the tensors (image
content id, preprocessing, augmentation and seed, backbone and the sha256 of its weights), so a
change in any of them can never reuse a stale entry. Each entry stores the sha256 of its own
tensor bytes; an entry that fails that check (a torn write, bit rot) is deleted and recomputed.
Entries are written atomically, so processes sharing a cache (data-parallel ranks) never read a
partial one. A cache that cannot be written (full, read-only) only costs speed: a warning, then
tensors are computed without being kept.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from kneeosteo.utils.atomic import atomic_path

log = logging.getLogger(__name__)


def cache_key(**descriptor) -> str:
    return hashlib.sha256(json.dumps(descriptor, sort_keys=True, default=str).encode()).hexdigest()


def backbone_cache_id(name: str, module, weights_sha256: str | None) -> str:
    """Names the frozen backbone that computed cached features.

    A pretrained backbone is named by the sha256 of its weights file. One without a file
    (``--backbone-weights none``) is a random initialisation that depends on the seed, so it is
    named by a digest of its own parameters and buffers: two different random backbones must
    never share feature entries.
    """
    if weights_sha256:
        return f"{name}:{weights_sha256}"
    state = {k: v.detach().cpu().reshape(-1) for k, v in module.state_dict().items()}
    return f"{name}:state-{_digest(state)}"


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode() + str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class TensorCache:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.hits = 0
        self.misses = 0
        self.write_error: str | None = None
        self._warn_once = threading.Lock()  # prepare's threads may all fail at once: one warning

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        path = self._path(key)
        if not path.is_file():
            self.misses += 1
            return None
        try:
            with safe_open(str(path), "pt") as fh:
                meta = fh.metadata() or {}
            tensors = load_file(path)
            if meta.get("sha256") != _digest(tensors):
                raise ValueError("checksum mismatch")
        except (OSError, ValueError, SafetensorError) as exc:
            log.warning("cache entry %s is damaged (%s); recomputing", path, exc)
            path.unlink(missing_ok=True)
            self.misses += 1
            return None
        self.hits += 1
        return tensors

    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        if self.write_error is not None:
            return
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        try:
            with atomic_path(self._path(key)) as tmp:
                save_file(tensors, str(tmp), metadata={"sha256": _digest(tensors)})
        except (OSError, SafetensorError) as exc:
            with self._warn_once:
                first = self.write_error is None
                self.write_error = self.write_error or str(exc)
            if first:
                log.warning("tensor cache %s cannot be written (%s); going on without caching", self.root, exc)
