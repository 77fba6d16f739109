"""Explaining why a set of tensors does not fit a model: shared by weights files and checkpoints."""

from __future__ import annotations

from collections.abc import Mapping

import torch


def mismatch_report(
    expected: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor], ignore_missing: tuple[str, ...] = ()
) -> list[str]:
    """Sentences naming missing keys, unexpected keys and shape mismatches; empty when it fits."""
    missing = sorted(k for k in set(expected) - set(got) if not k.endswith(ignore_missing))
    unexpected = sorted(set(got) - set(expected))
    bad = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in got.items()
        if k in expected and v.shape != expected[k].shape
    ]

    def show(keys: list[str]) -> str:
        return ", ".join(keys[:6]) + (f", ... ({len(keys)} in all)" if len(keys) > 6 else "")

    out = []
    if missing:
        out.append(f"Missing keys: {show(missing)}.")
    if unexpected:
        out.append(f"Unexpected keys: {show(unexpected)}.")
    if bad:
        out.append(f"Shape mismatches: {show(bad)}.")
    return out
