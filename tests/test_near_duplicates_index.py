"""Near-duplicate search below n^2: the multi-index search finds exactly the brute-force pairs and
clusters, on random hashes with planted near duplicates (chains, pairs at exactly the threshold and
one bit beyond, repeated hashes), on KOP, and at a size the brute force could not touch."""

from __future__ import annotations

import numpy as np
import pytest

from kneeosteo.data import duplicates as dup
from kneeosteo.errors import ConfigError


def _flip(value: int, bits, rng) -> int:
    for b in rng.choice(64, size=bits, replace=False):
        value ^= 1 << int(b)
    return value


def _planted(n_random: int, seed: int = 0):
    """Random 64-bit hashes plus planted structures; returns (values, content ids, facts)."""
    rng = np.random.default_rng(seed)
    vals = [int(v) for v in rng.integers(0, 2**64, size=n_random, dtype=np.uint64)]
    facts = {}
    a = vals[0]
    b = _flip(a, 4, rng)
    c = b
    while (a ^ c).bit_count() <= 6:  # C is 4 bits from B but more than 6 from A: joined only through B
        c = _flip(b, 4, rng)
    vals += [b, c]
    facts["chain"] = (0, n_random, n_random + 1)
    for name, bits in (("at6", 6), ("at7", 7), ("at5", 5), ("at1", 1)):
        base = vals[len(facts) + 3]  # distinct random anchors
        vals.append(_flip(base, bits, rng))
        facts[name] = (len(facts) + 3, len(vals) - 1)
    vals += [vals[10], vals[10]]  # the same hash three times (different content)
    facts["same_hash"] = (10, len(vals) - 2, len(vals) - 1)
    cids = [f"c{i}" for i in range(len(vals))]
    cids[20] = cids[21]  # an exact duplicate by content whose hashes are far apart
    facts["same_content"] = (20, 21)
    return vals, cids, facts


def _loop_pairs(vals, threshold):
    return {
        (i, j)
        for i in range(len(vals))
        for j in range(i + 1, len(vals))
        if (vals[i] ^ vals[j]).bit_count() <= threshold
    }


def _partition(labels) -> set[frozenset[int]]:
    groups: dict[int, set[int]] = {}
    for i, c in enumerate(np.asarray(labels).tolist()):
        groups.setdefault(c, set()).add(i)
    return {frozenset(g) for g in groups.values()}


def _union_find(n, edges) -> set[frozenset[int]]:
    parent = list(range(n))

    def root(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i, j in edges:
        parent[root(i)] = root(j)
    return _partition([root(i) for i in range(n)])


@pytest.mark.parametrize("threshold", [0, 1, 5, 6, 7, 12])
def test_index_pairs_equal_brute_force_and_a_plain_loop(threshold):
    vals, _, _ = _planted(400, seed=threshold)
    hexes = [f"{v:016x}" for v in vals]
    want = sorted(_loop_pairs(vals, threshold))
    for method in ("index", "brute", "auto"):
        got = dup.near_pairs(hexes, threshold, method=method)
        assert [tuple(p) for p in got.tolist()] == want, method


def test_clusters_equal_the_brute_force_components_with_chains_and_edge_distances():
    vals, cids, facts = _planted(600, seed=3)
    hexes = [f"{v:016x}" for v in vals]
    labels = dup.component_labels(cids, hexes, 6)
    same = [(i, j) for i in range(len(cids)) for j in range(i + 1, len(cids)) if cids[i] == cids[j]]
    assert _partition(labels) == _union_find(len(vals), sorted(_loop_pairs(vals, 6)) + same)
    a, b, c = facts["chain"]
    assert (vals[a] ^ vals[c]).bit_count() > 6 and labels[a] == labels[b] == labels[c]
    for name, joined in (("at6", True), ("at5", True), ("at1", True), ("at7", False)):
        i, j = facts[name]
        assert bool(labels[i] == labels[j]) is joined, name
    i, j, k = facts["same_hash"]
    assert labels[i] == labels[j] == labels[k]
    i, j = facts["same_content"]
    assert labels[i] == labels[j]
    # the edges the clustering uses are linear in repeated hashes, the pairs are all of them
    assert len(dup.near_edges(hexes, 6)) < len(dup.near_pairs(hexes, 6)) + len(vals)


def test_kop_clusters_equal_the_brute_force_result(kop_scan):
    recs = kop_scan.records
    cids, hexes = [r.content_id for r in recs], [r.phash for r in recs]
    brute = dup.near_pairs(hexes, 6, method="brute")
    assert np.array_equal(dup.near_pairs(hexes, 6, method="index"), brute)
    same = [(i, j) for i in range(len(cids)) for j in range(i + 1, len(cids)) if cids[i] == cids[j]]
    want = _union_find(len(recs), brute.tolist() + same)
    assert _partition(dup.component_labels(cids, hexes, 6)) == want
    clusters = dup.near_duplicate_clusters(recs)
    assert {frozenset(r.path for r in g) for g in clusters} == {
        frozenset(recs[i].path for i in g) for g in want if len({cids[i] for i in g}) > 1
    }


def test_two_hundred_thousand_hashes_find_every_planted_pair_and_nothing_else():
    """Far beyond the brute force (2e10 pairs): every planted pair within 6 bits is found, none at
    7, and every pair found really is within 6 bits."""
    rng = np.random.default_rng(7)
    n = 200_000
    vals = rng.integers(0, 2**64, size=n, dtype=np.uint64)
    planted = {}
    for k in range(2000):
        i, j = 2 * k, 2 * k + 1
        bits = int(k % 8)  # 0..7 bits apart
        vals[j] = vals[i]
        for b in rng.choice(64, size=bits, replace=False):
            vals[j] ^= np.uint64(1 << int(b))
        planted[(i, j)] = bits
    hexes = [f"{int(v):016x}" for v in vals]
    found = {tuple(p) for p in dup.near_pairs(hexes, 6).tolist()}
    assert {p for p, bits in planted.items() if bits <= 6} <= found
    assert not {p for p, bits in planted.items() if bits == 7} & found
    assert all((int(vals[i]) ^ int(vals[j])).bit_count() <= 6 for i, j in found)


@pytest.mark.parametrize("bad", [-1, 65, 2.5, True])
def test_threshold_out_of_range_is_refused(bad):
    with pytest.raises(ConfigError, match="threshold"):
        dup.near_pairs(["0" * 16, "f" * 16], bad)
