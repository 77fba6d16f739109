"""The cached training step (attention module + head on cached features): the paper's block order
(conv -> ReLU -> max-pool) against ours (conv -> max-pool -> ReLU), which gives the same values.

This is the step that bounds the cached-vs-naive ratio of the training benchmark, so its cost
and the effect of the reordering are measured on their own:

    python benchmarks/bench_am_step.py [--iters 8] [--out docs/results/benchmarks/am_step.json]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/bench_am_step.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import REPO, latency_stats, section, set_threads, time_calls, write_results  # noqa: E402


def _papers_order(am):
    """The same AttentionModule with its blocks in the paper's order (shares the parameters)."""
    from torch import nn

    convs = [m for m in am.features if isinstance(m, nn.Conv2d)]
    am.features = nn.Sequential(*[m for c in convs for m in (c, nn.ReLU(), nn.MaxPool2d(2, 2))])
    return am


def _index_free_pools(am):
    """The AM's 2x2 max-pools as a max over a view of each 2x2 window: no argmax indices are kept,
    and the backward pass (amax's) sends the gradient to every maximum of a window (a tie splits
    it) where max_pool2d's sends it to the first: the same values but for ties. A lever measured by
    bench_fp32_path.py (issue 17), not used by the package."""
    import torch
    from torch import nn

    class IndexFreeMaxPool(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            n, c, h, w = x.shape
            return x.unflatten(3, (w // 2, 2)).unflatten(2, (h // 2, 2)).amax(dim=(3, 5))

    am.features = nn.Sequential(*[IndexFreeMaxPool() if isinstance(m, nn.MaxPool2d) else m for m in am.features])
    return am


def step_fn(order: str, precision: str, batch: int, size: int, pool: str = "max_pool2d"):
    """One optimiser step of AM + head on a fixed batch, as ``run_epoch`` does it (channels-last);
    ``pool="index-free"`` swaps the max-pools for :func:`_index_free_pools`'."""
    import torch
    import torch.nn.functional as F

    from kneeosteo.models import build_model

    torch.manual_seed(0)
    model, _ = build_model("efficientnet_lite0", weights="none", image_size=size)
    if order == "paper":
        _papers_order(model.attention)
    if pool == "index-free":
        _index_free_pools(model.attention)
    model = model.to(memory_format=torch.channels_last)
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-4)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    feats = torch.randn(batch, model.feature_dim)
    y = torch.randint(0, 2, (batch,)).float()
    amp = torch.bfloat16 if precision == "bf16" else None

    def step():
        with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
            logits = model(images=x, features=feats).float()
            loss = F.binary_cross_entropy_with_logits(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def run(iters: int = 8, batch: int = 32, size: int = 224, precisions=("bf16", "fp32")) -> dict:
    doc: dict = {
        "settings": {
            "batch": batch,
            "image_size": size,
            "iters": iters,
            "channels_last": True,
            "threads": set_threads(None),
        },
        "rows": [],
    }
    with section(doc):
        for precision in precisions:
            ms = {}
            for order in ("paper", "ours"):
                times = time_calls(
                    step_fn(order, precision, batch, size), warmup=2, min_iters=iters, max_iters=iters, target_s=0
                )
                stats = latency_stats(times, batch)
                ms[order] = stats["p50_ms"]
                doc["rows"].append({"precision": precision, "order": order, **stats})
            doc["rows"][-1]["speedup_vs_paper_order"] = round(ms["paper"] / ms["ours"], 2)
    return doc


def markdown(doc: dict) -> str:
    st = doc["settings"]
    lines = [
        "# AM + head training step: block order",
        "",
        f"Measured {doc['started']}, load average {doc['loadavg_start']} -> {doc['loadavg_end']}; batch "
        f"{st['batch']}, {st['image_size']} px, channels-last, threads {st['threads']}, {st['iters']} timed steps "
        "after 2 warm-up steps. paper = conv -> ReLU -> max-pool; ours = conv -> max-pool -> ReLU (same values).",
        "",
        "| precision | block order | step p50 (ms) | step p95 (ms) | images/s | speed-up |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in doc["rows"]:
        lines.append(
            f"| {r['precision']} | {r['order']} | {r['p50_ms']:.0f} | {r['p95_ms']:.0f} | "
            f"{r['images_per_s']:.1f} | {r.get('speedup_vs_paper_order', '')} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iters", type=int, default=8)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "benchmarks" / "am_step.json")
    args = ap.parse_args(argv)
    doc = run(args.iters, args.batch, args.size)
    return write_results(args.out, doc, markdown)


if __name__ == "__main__":
    main()
