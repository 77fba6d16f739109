"""The saliency sanity check (Adebayo et al., 2018, "model parameter randomisation test").

A map that explains what a model *learned* must change when the learned weights are replaced by
random ones. Here the learned weights are the ones training changed (the attention module, the
head, and a fine-tuned backbone's trainable stages; a frozen backbone keeps its pretrained
weights, as it did in training): they are re-initialised with each layer's own
``reset_parameters``, and the maps of the trained and the randomised network are compared image
by image with Spearman's rank correlation on the maps' own grids. Low correlation is what a
meaningful map needs; high correlation means the map shows the input's or the frozen backbone's
structure whatever the head learned. The number is reported whatever it says.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
from scipy.stats import spearmanr
from torch import nn

__all__ = ["randomised_copy", "rank_correlation", "sanity_check", "trained_modules"]


def trained_modules(model: nn.Module) -> list[nn.Module]:
    """Modules holding weights that training updates (those with ``requires_grad`` parameters)."""
    return [
        m
        for m in model.modules()
        if hasattr(m, "reset_parameters") and any(p.requires_grad for p in m.parameters(recurse=False))
    ]


def randomised_copy(model: nn.Module, seed: int = 0) -> nn.Module:
    """A deep copy of ``model`` whose trained weights are re-initialised (seeded); frozen ones kept."""
    twin = copy.deepcopy(model)
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        mods = trained_modules(twin)
        if not mods:
            raise ValueError("the model has no trained weights to randomise")
        for m in mods:
            m.reset_parameters()
    finally:
        torch.random.set_rng_state(gen_state)
    return twin.eval()


def rank_correlation(a: np.ndarray | None, b: np.ndarray | None) -> float:
    """Spearman's rho between two maps of the same shape; nan when either is constant or absent."""
    if a is None or b is None:
        return math.nan
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"maps differ in shape: {a.shape} vs {b.shape}")
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan
    return float(spearmanr(a, b).statistic)


def _summary(values: list[float]) -> dict:
    v = np.array([x for x in values if not math.isnan(x)])
    if not len(v):
        return {"n": 0, "median": None, "q1": None, "q3": None, "undefined": len(values)}
    q1, med, q3 = np.percentile(v, [25, 50, 75])
    return {
        "n": int(len(v)),
        "median": float(med),
        "q1": float(q1),
        "q3": float(q3),
        "share_below_0.5": float((np.abs(v) < 0.5).mean()),
        "undefined": len(values) - int(len(v)),
    }


def sanity_check(explained: list[tuple[str, np.ndarray, object]], random_explainer) -> dict:
    """Per image rho(trained map, randomised map) for Grad-CAM and the attention map, and a summary.

    ``explained``: (name, canonical greyscale pixels, the trained model's ``Explanation`` of them,
    already made for the gallery: each trained map is computed once); ``random_explainer``: an
    :class:`~kneeosteo.inference.explain.Explainer` of ``randomised_copy`` of the model."""
    rows = []
    for name, pixels, a in explained:
        b = random_explainer.explain(pixels)
        rows.append(
            {
                "path": name,
                "gradcam_rho": rank_correlation(a.gradcam_raw, b.gradcam_raw),
                "attention_rho": rank_correlation(a.attention_raw, b.attention_raw)
                if a.attention_raw is not None
                else None,
            }
        )
    out = {"images": rows, "gradcam": _summary([r["gradcam_rho"] for r in rows])}
    if any(r["attention_rho"] is not None for r in rows):
        out["attention"] = _summary([r["attention_rho"] for r in rows if r["attention_rho"] is not None])
    return out


def verdict(summary: dict | None) -> str:
    """One honest sentence on a map kind's summary."""
    if not summary or not summary.get("n"):
        return "undefined: the maps were constant (no rank correlation exists)"
    med = summary["median"]
    if abs(med) < 0.3:
        return f"passes: median rho {med:.2f}, the maps depend on the trained weights"
    if abs(med) < 0.6:
        return f"weak: median rho {med:.2f}, the maps partly survive randomising the trained weights"
    return (
        f"fails: median rho {med:.2f}, the maps barely change when the trained weights are random; "
        "they show the input or the frozen backbone more than what the model learned"
    )
