"""The one base of every trust estimator: scikit-learn's conventions without importing scikit-learn
(the predict path reads trust files and must not load it; ``tests/test_startup.py`` checks).

- ``__init__`` stores its parameters as given, unvalidated; ``get_params``/``set_params`` read and
  write them by the ``__init__`` signature, so :func:`sklearn.base.clone` copies an estimator;
- ``fit(...)`` validates the parameters and the data, sets the fitted attributes (names ending in
  ``_``) and returns ``self``;
- one state round trip: ``get_state()`` gives a dict of JSON values and float64/int64 numpy arrays
  (the run folder keeps the arrays in safetensors, the rest in trust.json), ``from_state(state)``
  builds the fitted estimator back, checking every value.
"""

from __future__ import annotations

import inspect
from typing import Any

from kneeosteo.errors import DataError

__all__ = ["TrustEstimator"]


class TrustEstimator:
    """Base of the trust estimators (see the module docstring)."""

    @classmethod
    def _param_names(cls) -> list[str]:
        sig = inspect.signature(cls.__init__)
        return [p.name for p in sig.parameters.values() if p.name != "self" and p.kind != p.VAR_KEYWORD]

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """The ``__init__`` parameters, as stored."""
        return {name: getattr(self, name) for name in self._param_names()}

    def set_params(self, **params: Any):
        """Change parameters (validated at the next ``fit``); returns ``self``."""
        valid = self._param_names()
        for name, value in params.items():
            if name not in valid:
                raise ValueError(f"{type(self).__name__} has no parameter {name!r} (parameters: {', '.join(valid)})")
            setattr(self, name, value)
        return self

    def is_fitted(self) -> bool:
        """Whether ``fit`` (or ``from_state``) has set the fitted attributes."""
        return any(k.endswith("_") and not k.startswith("__") for k in vars(self))

    def _check_fitted(self) -> None:
        if not self.is_fitted():
            raise DataError(f"the {type(self).__name__} has not been fitted (call fit first)")

    def get_state(self) -> dict:
        """The fitted estimator as a dict: JSON values and numpy arrays."""
        raise NotImplementedError

    @classmethod
    def from_state(cls, state: dict):
        """The fitted estimator :meth:`get_state` describes."""
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"
