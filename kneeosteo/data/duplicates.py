"""Exact and near duplicates: the two ways one radiograph can leak from training into test.

Exact duplicates share a content id (sha256 of decoded pixels). Near duplicates are found by
perceptual hash (64-bit pHash) within a Hamming-distance threshold; clusters are the connected
components, so A~B and B~C put A, B and C together.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from kneeosteo.data.scan import Record

NEAR_DUP_THRESHOLD = 6  # bits of 64; see README "Duplicates" for how it was chosen on KOP


def exact_groups(records: list[Record]) -> list[list[Record]]:
    """Groups of two or more files with identical decoded pixels, largest first."""
    by_cid: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        by_cid[r.content_id].append(r)
    groups = [sorted(g, key=lambda r: r.path) for g in by_cid.values() if len(g) > 1]
    return sorted(groups, key=lambda g: (-len(g), g[0].path))


def is_conflict(group: list[Record]) -> bool:
    return len({r.label for r in group}) > 1


_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def near_pairs(phashes: list[str], threshold: int, block_elems: int = 1 << 22) -> np.ndarray:
    """(k, 2) index pairs ``i < j`` whose hex hashes differ in at most ``threshold`` bits.

    Works through row blocks of about ``block_elems`` byte comparisons, so memory stays near
    ``block_elems`` bytes instead of an n x n matrix."""
    n = len(phashes)
    if n < 2:
        return np.zeros((0, 2), dtype=np.int64)
    packed = np.frombuffer(b"".join(bytes.fromhex(h) for h in phashes), dtype=np.uint8).reshape(n, -1)
    rows = max(1, block_elems // (n * packed.shape[1]))
    found = []
    for start in range(0, n, rows):
        dist = _POPCOUNT[packed[start:start + rows, None, :] ^ packed[None, :, :]].sum(axis=-1, dtype=np.int32)
        ii, jj = np.nonzero(dist <= threshold)
        ii += start
        keep = jj > ii
        found.append(np.stack([ii[keep], jj[keep]], axis=1))
    return np.concatenate(found)


def _components(records: list[Record], threshold: int | None) -> np.ndarray:
    """Component label per record (connected components of the graph whose edges join the same
    content id and, given ``threshold``, pHashes within ``threshold`` bits)."""
    n = len(records)
    first: dict[str, int] = {}
    same = [(first.setdefault(r.content_id, i), i) for i, r in enumerate(records)]
    edges = np.array([e for e in same if e[0] != e[1]], dtype=np.int64).reshape(-1, 2)
    if threshold is not None:
        edges = np.concatenate([edges, near_pairs([r.phash for r in records], threshold)])
    graph = coo_matrix((np.ones(len(edges), dtype=np.int8), (edges[:, 0], edges[:, 1])), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def deduplicate(records: list[Record]) -> tuple[list[Record], list[dict]]:
    """One file per picture (the first by path of each exact-duplicate group), every copy of a
    picture filed under two labels dropped -> (kept, in the input's order; excluded with reasons)."""
    excluded, drop = [], set()
    for g in exact_groups(records):
        if is_conflict(g):
            labels = sorted({r.label for r in g})
            for r in g:
                others = ", ".join(o.path for o in g if o is not r)
                excluded.append({"path": r.path, "reason": f"label conflict: same pixels as {others} ({'/'.join(labels)})"})
                drop.add(r.path)
        else:
            for r in g[1:]:
                excluded.append({"path": r.path, "reason": f"exact duplicate of {g[0].path}"})
                drop.add(r.path)
    return [r for r in records if r.path not in drop], excluded


def near_duplicate_clusters(records: list[Record], threshold: int = NEAR_DUP_THRESHOLD) -> list[list[Record]]:
    """Clusters holding two or more *different* pictures within ``threshold`` bits of each other."""
    comp = _components(records, threshold)
    clusters: dict[int, list[Record]] = defaultdict(list)
    for c, r in zip(comp.tolist(), records):
        clusters[c].append(r)
    out = [sorted(g, key=lambda r: r.path) for g in clusters.values() if len({r.content_id for r in g}) > 1]
    return sorted(out, key=lambda g: (-len(g), g[0].path))


def leakage_groups(records: list[Record], threshold: int = NEAR_DUP_THRESHOLD) -> dict[str, int]:
    """path -> group id; files of one group must land in the same partition."""
    comp = _components(records, threshold)
    comp = comp.tolist()
    relabel = {c: k for k, c in enumerate(dict.fromkeys(comp))}
    return {r.path: relabel[c] for r, c in zip(records, comp)}
