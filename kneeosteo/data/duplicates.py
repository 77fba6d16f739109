"""Exact and near duplicates: the two ways one radiograph can leak from training into test.

Exact duplicates share a content id (sha256 of decoded pixels). Near duplicates are found by
perceptual hash (64-bit pHash) within a Hamming-distance threshold; clusters are the connected
components, so A~B and B~C put A, B and C together.

The search never builds the n x n distance matrix: multi-index hashing (:func:`index_plan`) sorts
the distinct hashes once per combination of equal blocks and checks only the pairs that share
one, so a million hashes take seconds, not hours; the row-blocked brute force stays for long
thresholds and other hash lengths, and as the reference the index is tested against.
"""

from __future__ import annotations

from collections import defaultdict
from itertools import combinations
from math import comb

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from kneeosteo.data.scan import Record
from kneeosteo.errors import ConfigError

NEAR_DUP_THRESHOLD = 6  # bits of 64; docs/cli.md (`audit`) says how it was chosen on KOP


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
HASH_BITS = 64
# cost model of near_pairs' two methods, in nanoseconds on one core (measured order of magnitude):
# argsort of one element, one candidate pair checked, one pair of the brute-force matrix
_NS_SORT, _NS_CANDIDATE, _NS_BRUTE = 80.0, 25.0, 10.0


def check_threshold(threshold: int) -> int:
    """A near-duplicate threshold in bits: an integer in [0, 64]."""
    if isinstance(threshold, bool) or int(threshold) != threshold or not 0 <= threshold <= HASH_BITS:
        raise ConfigError(
            f"near-duplicate threshold must be a whole number of bits in [0, {HASH_BITS}], got {threshold!r}"
        )
    return int(threshold)


def hashes_as_uint64(phashes: list[str]) -> np.ndarray | None:
    """The hex pHashes as uint64 (one per hash), or None when they are not all 64-bit (16 hex digits)."""
    if any(len(h) != 16 for h in phashes):
        return None
    return np.frombuffer(bytes.fromhex("".join(phashes)), dtype=">u8").astype(np.uint64)


def _block_masks(blocks: int) -> list[int]:
    """``blocks`` disjoint bit masks of near-equal width covering the 64 bits."""
    masks, start = [], 0
    for b in range(blocks):
        width = HASH_BITS // blocks + (b < HASH_BITS % blocks)
        masks.append(((1 << width) - 1) << start)
        start += width
    return masks


def index_plan(n: int, threshold: int) -> tuple[int, int, float] | None:
    """The cheapest multi-index plan for ``n`` distinct 64-bit hashes: ``(blocks, must_match, cost)``.

    Cut the hash into ``blocks`` parts; two hashes within ``threshold`` bits differ in at most
    ``threshold`` parts, so at least ``blocks - threshold`` parts are equal (pigeonhole). Every
    combination of that many parts is one exact-match index (a sort); pairs sharing a key are
    candidates, checked by their real distance. ``cost`` is the estimated nanoseconds (sorts plus
    random candidates), None when no plan beats the brute-force matrix."""
    brute = n * (n - 1) / 2 * _NS_BRUTE
    best = None
    for blocks in range(threshold + 1, min(HASH_BITS, threshold + 12) + 1):
        match = blocks - threshold
        combos = comb(blocks, match)
        if combos > 5000:
            break
        key_bits = match * (HASH_BITS // blocks)  # the narrowest combination
        cost = combos * (n * _NS_SORT + n * (n - 1) / 2 / 2.0**key_bits * _NS_CANDIDATE)
        if best is None or cost < best[2]:
            best = (blocks, match, cost)
    return best if best is not None and best[2] < brute else None


def _index_pairs(h: np.ndarray, threshold: int, blocks: int, match: int) -> np.ndarray:
    """(k, 2) pairs ``i < j`` of the *distinct* uint64 hashes ``h`` within ``threshold`` bits."""
    n = len(h)
    masks = _block_masks(blocks)
    found = []
    for combo in combinations(range(blocks), match):
        key = h & np.uint64(sum(masks[b] for b in combo))
        order = np.argsort(key, kind="stable")
        ks = key[order]
        active = np.flatnonzero(ks[1:] == ks[:-1])  # positions p whose key equals that of p + d (d = 1)
        d = 1
        while active.size:  # sorted keys: a run shared at distance d is shared at every smaller one
            a, b = order[active], order[active + d]
            near = np.bitwise_count(h[a] ^ h[b]) <= threshold
            if near.any():
                a, b = a[near], b[near]
                found.append(np.minimum(a, b).astype(np.int64) * n + np.maximum(a, b))
            d += 1
            active = active[active + d < n]
            active = active[ks[active + d] == ks[active]]
    if not found:
        return np.zeros((0, 2), dtype=np.int64)
    codes = np.unique(np.concatenate(found))  # a pair equal in several combinations is found several times
    return np.stack([codes // n, codes % n], axis=1)


def _brute_pairs(phashes: list[str], threshold: int, block_elems: int) -> np.ndarray:
    """All pairs through row blocks of the Hamming matrix: O(n^2) time, about ``block_elems`` bytes."""
    n = len(phashes)
    packed = np.frombuffer(b"".join(bytes.fromhex(h) for h in phashes), dtype=np.uint8).reshape(n, -1)
    rows = max(1, block_elems // (n * packed.shape[1]))
    found = [np.zeros((0, 2), dtype=np.int64)]
    for start in range(0, n, rows):
        dist = _POPCOUNT[packed[start : start + rows, None, :] ^ packed[None, :, :]].sum(axis=-1, dtype=np.int32)
        ii, jj = np.nonzero(dist <= threshold)
        ii += start
        keep = jj > ii
        found.append(np.stack([ii[keep], jj[keep]], axis=1))
    return np.concatenate(found)


def _distinct(h: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(distinct hashes, each hash's index among them, the first record of each distinct hash)."""
    uniq, first, inverse = np.unique(h, return_index=True, return_inverse=True)
    return uniq, inverse.ravel(), first


def near_pairs(phashes: list[str], threshold: int, block_elems: int = 1 << 22, method: str = "auto") -> np.ndarray:
    """(k, 2) index pairs ``i < j`` whose hex hashes differ in at most ``threshold`` bits, sorted.

    ``method="index"``: multi-index hashing (:func:`index_plan`) on the distinct 64-bit hashes,
    well below n^2 for small thresholds; ``"brute"``: row blocks of about ``block_elems`` byte
    comparisons of the full matrix (any hash length); ``"auto"`` picks the cheaper. Both return
    exactly the same pairs (tested against each other and against a plain loop)."""
    threshold = check_threshold(threshold)
    n = len(phashes)
    if n < 2:
        return np.zeros((0, 2), dtype=np.int64)
    h = hashes_as_uint64(phashes) if method != "brute" else None
    uniq = _distinct(h) if h is not None else None
    plan = index_plan(len(uniq[0]), threshold) if uniq is not None else None
    if method == "index" and h is not None and plan is None:  # forced: the widest sensible plan
        plan = (threshold + 1, 1, 0.0)
    if plan is None:
        if method == "index":
            raise ConfigError("method 'index' needs 64-bit hashes (16 hex digits)")
        pairs = _brute_pairs(phashes, threshold, block_elems)
        return pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]
    u, inverse, _ = uniq
    upairs = _index_pairs(u, threshold, plan[0], plan[1])
    # expand distinct-hash pairs to record pairs: records sharing a hash are at distance 0
    order = np.argsort(inverse, kind="stable")
    starts = np.searchsorted(inverse[order], np.arange(len(u) + 1))
    members = [order[starts[k] : starts[k + 1]] for k in range(len(u))] if len(u) < n else None
    out = []
    if members is None:
        out.append(upairs)
    else:
        for a, b in upairs.tolist():
            ma, mb = members[a], members[b]
            out.append(np.stack(np.meshgrid(ma, mb, indexing="ij"), axis=-1).reshape(-1, 2))
        for m in members:
            if len(m) > 1:
                ii, jj = np.triu_indices(len(m), 1)
                out.append(np.stack([m[ii], m[jj]], axis=1))
    pairs = np.concatenate(out) if out else np.zeros((0, 2), dtype=np.int64)
    pairs = np.sort(pairs, axis=1).astype(np.int64)
    return pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]


def near_edges(phashes: list[str], threshold: int) -> np.ndarray:
    """Edges with the same connected components as :func:`near_pairs`' pairs, never quadratic in
    repeated hashes: each record joins the first record with its hash, and distinct hashes within
    ``threshold`` bits join those first records."""
    threshold = check_threshold(threshold)
    h = hashes_as_uint64(phashes) if len(phashes) > 1 else None
    if h is None:
        return near_pairs(phashes, threshold)
    u, inverse, first = _distinct(h)
    plan = index_plan(len(u), threshold)
    if plan is None:
        upairs = _brute_pairs([f"{v:016x}" for v in u.tolist()], threshold, 1 << 22)
    else:
        upairs = _index_pairs(u, threshold, plan[0], plan[1])
    same = np.stack([first[inverse], np.arange(len(h))], axis=1)
    same = same[same[:, 0] != same[:, 1]]
    return np.concatenate([first[upairs].reshape(-1, 2), same]).astype(np.int64)


def component_labels(content_ids: list[str], phashes: list[str] | None, threshold: int | None) -> np.ndarray:
    """Component label per record: connected components of the graph whose edges join the same
    content id and, given ``threshold``, pHashes within ``threshold`` bits (scipy's sparse graph)."""
    n = len(content_ids)
    first: dict[str, int] = {}
    rep = np.fromiter((first.setdefault(c, i) for i, c in enumerate(content_ids)), dtype=np.int64, count=n)
    idx = np.arange(n, dtype=np.int64)
    edges = np.stack([rep[rep != idx], idx[rep != idx]], axis=1)
    if threshold is not None and phashes is not None:
        edges = np.concatenate([edges, near_edges(phashes, threshold)])
    graph = coo_matrix((np.ones(len(edges), dtype=np.int8), (edges[:, 0], edges[:, 1])), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def _components(records: list[Record], threshold: int | None) -> np.ndarray:
    """Component label per record (see :func:`component_labels`)."""
    return component_labels([r.content_id for r in records], [r.phash for r in records], threshold)


def deduplicate(records: list[Record]) -> tuple[list[Record], list[dict]]:
    """One file per picture (the first by path of each exact-duplicate group), every copy of a
    picture filed under two labels dropped -> (kept, in the input's order; excluded with reasons)."""
    excluded, drop = [], set()
    for g in exact_groups(records):
        if is_conflict(g):
            labels = sorted({r.label for r in g})
            for r in g:
                others = ", ".join(o.path for o in g if o is not r)
                excluded.append(
                    {"path": r.path, "reason": f"label conflict: same pixels as {others} ({'/'.join(labels)})"}
                )
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
