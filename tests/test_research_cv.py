"""The cross-validation protocol of research/aux_tscore_cv.py (issue 32): every held-out film is
tested exactly once, never trained on in the fold that tests it, and the folder labels (what the
coverage figures compare against) are kept for the fold's test films only."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _script():
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        spec = importlib.util.spec_from_file_location("aux_tscore_cv", REPO / "research" / "aux_tscore_cv.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(REPO / "scripts"))
    return mod


def test_fold_splits_test_each_held_out_film_once_and_never_train_on_it():
    cv = _script()
    held = [f"normal/n{i}.png" for i in range(7)] + [f"osteoporosis/o{i}.png" for i in range(5)]
    doc = {
        "train": ["normal/t0.png", "osteoporosis/t1.png"],
        "val": ["normal/v0.png"],
        "test": held,
        "labels": {p: p.split("/")[0] for p in held},
        "folder_labels": {p: "osteoporosis" for p in held},
        "values": {p: {"t_score": -1.0} for p in held},
    }
    fold_of = {p: k % 3 for k, p in enumerate(held)}
    tested = []
    for k in range(3):
        d = cv.fold_split(doc, fold_of, k, 3)
        assert not set(d["train"]) & set(d["test"]) and not set(d["val"]) & set(d["test"])
        assert d["val"] == doc["val"] and set(doc["train"]) <= set(d["train"])
        assert set(d["train"]) - set(doc["train"]) == {p for p in held if fold_of[p] != k}
        assert set(d["folder_labels"]) == set(d["test"])
        assert d["cv"] == {"fold": k, "folds": 3, "held_out_films_in_training": len(d["train"]) - 2}
        tested += d["test"]
    assert sorted(tested) == sorted(held)
    assert doc["train"] == ["normal/t0.png", "osteoporosis/t1.png"]  # the seed's own split is not changed
