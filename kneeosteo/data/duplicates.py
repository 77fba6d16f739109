"""Exact and near duplicates: the two ways one radiograph can leak from training into test.

Exact duplicates share a content id (sha256 of decoded pixels). Near duplicates are found by
perceptual hash (64-bit pHash) within a Hamming-distance threshold; clusters are the connected
components, so A~B and B~C put A, B and C together.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

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


def hamming_matrix(phashes: list[str]) -> np.ndarray:
    """Pairwise Hamming distances between 64-bit hex hashes, vectorised (n^2 bytes, fine for 1e4)."""
    bits = np.unpackbits(
        np.array([np.frombuffer(bytes.fromhex(h), dtype=np.uint8) for h in phashes]).reshape(len(phashes), -1),
        axis=1,
    )
    b = bits.astype(np.int32)
    return b.shape[1] - (b @ b.T + (1 - b) @ (1 - b).T)


class _UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, i: int, j: int) -> None:
        self.parent[self.find(i)] = self.find(j)


def _components(records: list[Record], threshold: int | None) -> list[int]:
    """Component index per record: same content id always joins; near-dups join when threshold given."""
    uf = _UnionFind(len(records))
    first: dict[str, int] = {}
    for i, r in enumerate(records):
        if r.content_id in first:
            uf.union(i, first[r.content_id])
        first.setdefault(r.content_id, i)
    if threshold is not None and len(records) > 1:
        dist = hamming_matrix([r.phash for r in records])
        ii, jj = np.nonzero(np.triu(dist <= threshold, k=1))
        for i, j in zip(ii.tolist(), jj.tolist()):
            uf.union(i, j)
    return [uf.find(i) for i in range(len(records))]


def near_duplicate_clusters(records: list[Record], threshold: int = NEAR_DUP_THRESHOLD) -> list[list[Record]]:
    """Clusters holding two or more *different* pictures within ``threshold`` bits of each other."""
    comp = _components(records, threshold)
    clusters: dict[int, list[Record]] = defaultdict(list)
    for c, r in zip(comp, records):
        clusters[c].append(r)
    out = [sorted(g, key=lambda r: r.path) for g in clusters.values() if len({r.content_id for r in g}) > 1]
    return sorted(out, key=lambda g: (-len(g), g[0].path))


def leakage_groups(records: list[Record], threshold: int = NEAR_DUP_THRESHOLD) -> dict[str, int]:
    """path -> group id; files of one group must land in the same partition."""
    comp = _components(records, threshold)
    relabel = {c: k for k, c in enumerate(dict.fromkeys(comp))}
    return {r.path: relabel[c] for r, c in zip(records, comp)}
