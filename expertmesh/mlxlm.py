"""The private parts of mlx-lm expertmesh relies on, each in one place with why.

mlx-lm has no public API for these; everything else of mlx-lm that expertmesh
uses is public (``load``, ``BatchGenerator``, ``make_sampler``,
``speculative_generate_step``, the model classes, ...). ``SUPPORTED`` is the
range of mlx-lm releases these were checked against; ``check_version`` says
clearly when the installed one is outside it.
"""

from __future__ import annotations

import importlib.metadata

from mlx_lm.models.cache import _BaseCache
from mlx_lm.models.switch_layers import _gather_sort, _scatter_unsort
from mlx_lm.utils import _get_classes

SUPPORTED = ((0, 32), (0, 33))  # mlx-lm >= 0.32, < 0.33 (pyproject.toml pins the same)

# The model and args classes of a config's model_type, as mlx_lm.load finds them:
# adapters build the family's own classes without loading any weights.
get_classes = _get_classes

# The base of mlx-lm's KV caches: a stage's stand-in cache on the router must be
# one, so that mlx-lm's batching (filter, extend, extract, trim) treats it as a cache.
BaseCache = _BaseCache

# How SwitchGLU orders many tokens by expert before its gathered matmuls and
# back after: fused.FusedSwitchGLU runs SwitchGLU's computation with its gate
# and up projections in one call, and must order tokens exactly as it does.
gather_sort, scatter_unsort = _gather_sort, _scatter_unsort


def swap_class(obj: object, cls: type) -> None:
    """Give a loaded mlx-lm model a subclass of its own class (the router taps
    its inputs for stage rebuilds): mlx-lm builds the model, so it cannot be
    asked to build the subclass."""
    obj.__class__ = cls


def check_version(version: str | None = None) -> None:
    """Raises RuntimeError: the installed mlx-lm is outside ``SUPPORTED``."""
    version = version or importlib.metadata.version("mlx-lm")
    parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    low, high = SUPPORTED
    if not low <= parts < high:
        raise RuntimeError(f"expertmesh supports mlx-lm {'.'.join(map(str, low))} to below "
                           f"{'.'.join(map(str, high))}; mlx-lm {version} is installed: "
                           f"pip install 'mlx-lm>={'.'.join(map(str, low))},<{'.'.join(map(str, high))}'")
