"""Materialise a partition as tensors: preprocessed AM inputs and frozen-backbone features.

This is where the CPU time of the naive loop goes (decode a 2-megapixel radiograph, augment,
resize, run DenseNet); done once and cached, every later epoch and run only reads tensors.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from kneeosteo.data.augment import WORK_SIZE, AugmentParams, offline_versions, shrink
from kneeosteo.data.preprocess import Preprocess
from kneeosteo.data.reader import ImageReadError, LoadedImage, read_image
from kneeosteo.data.scan import describe_and_read
from kneeosteo.errors import DataError
from kneeosteo.features.cache import TensorCache, cache_key
from kneeosteo.utils.progress import progress_bar

log = logging.getLogger(__name__)


@dataclass
class PreparedSet:
    grey: torch.Tensor  # (N, 1, S, S) float16 in [0, 1]; normalised per batch
    targets: torch.Tensor  # (N,) float32, 1 = positive
    paths: list[str]  # source file of each row, relative to the data root
    versions: list[int]  # 0 = the original, k > 0 = augmented copy k
    features: torch.Tensor | None = None  # (N, D) frozen-backbone features
    bad: list[dict] = field(default_factory=list)  # files that could not be read

    def __len__(self) -> int:
        return len(self.paths)

    def originals(self) -> PreparedSet:
        keep = [i for i, v in enumerate(self.versions) if v == 0]
        return self.subset(keep)

    def batches(self, prep: Preprocess, device: str = "cpu", batch_size: int = 64):
        """(normalised inputs, cached features or None) per batch, in row order, as a model eats them."""
        for start in range(0, len(self), batch_size):
            sl = slice(start, start + batch_size)
            x = prep.normalise(self.grey[sl].float()).to(device).contiguous(memory_format=torch.channels_last)
            yield x, None if self.features is None else self.features[sl].to(device)

    def subset(self, idx: list[int]) -> PreparedSet:
        t = torch.as_tensor(idx, dtype=torch.long)
        return PreparedSet(
            self.grey[t],
            self.targets[t],
            [self.paths[i] for i in idx],
            [self.versions[i] for i in idx],
            None if self.features is None else self.features[t],
            self.bad,
        )


def _input_key(cid: str, prep: Preprocess) -> str:
    return cache_key(kind="input", content=cid, prep=prep.key())


def _small_key(cid: str) -> str:
    """The augmentation's working copy (``augment.shrink``) of one image: all it needs of the pixels."""
    return cache_key(kind="shrunk", content=cid, longest=WORK_SIZE)


def precache(cid: str, pixels, prep: Preprocess, cache: TensorCache) -> None:
    """Store what ``prepare`` needs of a decoded image (its network input and the augmentation's
    working copy), so that a scan that decodes it anyway spares ``prepare`` a second decode."""
    cache.put(_input_key(cid, prep), {"grey": prep.geometry(pixels)[None].half()})
    cache.put(_small_key(cid), {"pixels": torch.from_numpy(shrink(pixels).astype("float32", copy=False))})


def _inputs_for(
    path: Path,
    cid: str,
    prep: Preprocess,
    aug: AugmentParams | None,
    seed: int,
    cache: TensorCache,
    img: LoadedImage | None = None,
):
    """Grey (V, 1, S, S) tensors for one image: the original, then its augmented copies; ``img`` is
    the file already decoded, if it was, so it is not decoded again (nor when ``precache`` kept
    what is needed)."""
    keys = [_input_key(cid, prep)]
    if aug is not None and aug.copies > 0:
        keys.append(cache_key(kind="input-aug", content=cid, prep=prep.key(), aug=aug.key(), seed=seed))
    found = [cache.get(k) for k in keys]
    if all(f is not None for f in found):
        return keys, [f["grey"] for f in found]
    small = cache.get(_small_key(cid)) if (img is None and found[0] is not None) else None
    if small is not None:  # only the augmented copies are missing, and they start from the small copy
        aug_pixels = small["pixels"].numpy()
        out = [found[0]["grey"]]
    else:
        pixels = (img if img is not None else read_image(path)).pixels
        aug_pixels = pixels
        out = [prep.geometry(pixels)[None].half()]
    if len(keys) > 1:  # offline_versions shrinks first; shrinking the small copy again changes nothing
        out.append(torch.stack([prep.geometry(v) for v in offline_versions(aug_pixels, cid, seed, aug)]).half())
    for k, t, hit in zip(keys, out, found):
        if hit is None:
            cache.put(k, {"grey": t})
    return keys, out


@torch.no_grad()
def _features_for(
    keys: list[str],
    grey: list[torch.Tensor],
    prep: Preprocess,
    backbone: nn.Module,
    backbone_id: str,
    cache: TensorCache,
    batch_size: int,
    device: str,
    label: str,
) -> torch.Tensor:
    fkeys = [cache_key(kind="features", input=k, backbone=backbone_id) for k in keys]
    feats: list[torch.Tensor | None] = [None] * len(keys)
    for i, fk in enumerate(fkeys):
        hit = cache.get(fk)
        feats[i] = None if hit is None else hit["features"]
    todo = [i for i, f in enumerate(feats) if f is None]
    if todo:
        backbone.eval()
        flat = [(i, j) for i in todo for j in range(grey[i].shape[0])]
        chunks = {i: [None] * grey[i].shape[0] for i in todo}
        for start in progress_bar(
            range(0, len(flat), batch_size),
            f"{label}: backbone features",
            total=(len(flat) + batch_size - 1) // batch_size,
        ):
            batch = flat[start : start + batch_size]
            x = torch.stack([grey[i][j].float() for i, j in batch])
            # oneDNN (and cuDNN) pick convolution kernels by batch size: an image's features differ
            # in the 5th digit between a batch of 8 and one of 32. Padding every batch to full size
            # makes them independent of the images (or data-parallel rank) they were computed with.
            if len(batch) < batch_size:
                x = torch.cat([x, x.new_zeros((batch_size - len(batch), *x.shape[1:]))])
            x = prep.normalise(x).to(device).contiguous(memory_format=torch.channels_last)
            out = backbone(x).float().cpu()[: len(batch)]
            for (i, j), f in zip(batch, out):
                chunks[i][j] = f
        for i in todo:
            feats[i] = torch.stack(chunks[i])
            cache.put(fkeys[i], {"features": feats[i]})
    return torch.cat(feats)


def prepare(
    items: list[tuple[str, int]],
    root: str | Path,
    prep: Preprocess,
    cache: TensorCache,
    augment: AugmentParams | None = None,
    seed: int = 0,
    backbone: nn.Module | None = None,
    backbone_id: str | None = None,
    batch_size: int = 32,
    device: str = "cpu",
    label: str = "data",
    workers: int = 2,
) -> PreparedSet:
    """Inputs (and, given a frozen backbone, its features) for ``items`` = [(relpath, target)]."""
    root = Path(root)

    def one(item):
        rel, target = item
        try:
            info, img = describe_and_read(root / rel)  # decodes only without a scan memo
            keys, grey = _inputs_for(root / rel, info["content_id"], prep, augment, seed, cache, img)
            return rel, target, keys, grey, None
        except (ImageReadError, OSError) as exc:
            return rel, target, None, None, getattr(exc, "reason", str(exc))

    with ThreadPoolExecutor(workers) as pool:
        results = list(progress_bar(pool.map(one, items), f"{label}: images", total=len(items)))
    keys, grey, targets, paths, versions, bad = [], [], [], [], [], []
    for rel, target, k, g, err in results:
        if err is not None:
            log.warning("%s: %s; left out", root / rel, err)
            bad.append({"path": rel, "reason": err})
            continue
        for kk, gg in zip(k, g):
            keys.append(kk)
            grey.append(gg)
            n = gg.shape[0]
            start = 0 if kk == k[0] else 1
            versions.extend(range(start, start + n))
            paths.extend([rel] * n)
            targets.extend([float(target)] * n)
    if not grey:
        raise DataError(f"{root}: no readable image in the {label} set")
    features = None
    if backbone is not None:
        features = _features_for(keys, grey, prep, backbone, backbone_id or "unknown", cache, batch_size, device, label)
    return PreparedSet(torch.cat(grey), torch.tensor(targets), paths, versions, features, bad)
