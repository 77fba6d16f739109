"""kneeosteo.utils.lazy: the one helper behind the packages' names loaded on first use."""

import sys

import pytest

from kneeosteo.utils.lazy import lazy_names


def test_a_name_is_imported_on_first_use_kept_and_listed(monkeypatch):
    monkeypatch.delitem(sys.modules, "colorsys", raising=False)
    ns: dict = {}
    getattr_, dir_ = lazy_names("pkg", ns, {"rgb_to_hsv": "colorsys"}, first="json")
    assert "colorsys" not in sys.modules  # nothing imported before the name is asked for
    fn = getattr_("rgb_to_hsv")
    assert fn(1.0, 0.0, 0.0) == (0.0, 1.0, 1.0) and ns["rgb_to_hsv"] is fn  # kept: the next use is free
    assert "colorsys" in sys.modules and "json" in sys.modules
    assert dir_() == ["rgb_to_hsv"]
    with pytest.raises(AttributeError, match="module 'pkg' has no attribute 'nope'"):
        getattr_("nope")


def test_the_packages_names_resolve_to_their_modules():
    import kneeosteo.inference as inference
    import kneeosteo.models as models

    assert inference.Predictor.__module__ == "kneeosteo.inference.predictor"
    assert models.read_identity.__module__ == "kneeosteo.models.weights_file"
    assert "Predictor" in dir(inference) and "HybridModel" in dir(models)
