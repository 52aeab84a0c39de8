"""Scorer registry and the totals that combine per-dimension scores.

A scorer maps one clip (uint8 RGB frames of shape (F, H, W, 3)) and its prompt to a
float. Each scorer belongs to VBench's "quality" or "semantic" group, which
omni_total weights 4:1 by default as VBench's total score does.
"""

from __future__ import annotations

import abc
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, get_args

import numpy as np

logger = logging.getLogger(__name__)

Group = Literal["quality", "semantic"]
GROUPS: tuple[str, ...] = get_args(Group)

# Per-clip inputs a scorer may declare in `needs`. A scorer may also declare the
# name of a registered resource (see register_resource), such as a loaded CLIP
# model. A FunctionScorer passes exactly the declared names as keyword arguments.
INPUTS: frozenset[str] = frozenset({"frames", "prompt"})

# omni_total gives this value to a dimension whose scores are all equal, because
# min-max normalisation is undefined there. Any constant shifts every total by the
# same amount, so it changes no ranking.
CONSTANT_DIMENSION_VALUE = 0.5


class Scorer(abc.ABC):
    """A per-clip metric: `scorer(frames, prompt, **resources)` returns a float.

    Subclasses set `name`, `group` ("quality" or "semantic") and `needs`: "frames",
    optionally "prompt", and the names of registered resources the metric uses.
    Callers load those resources once with load_resources and pass them as keyword
    arguments to every call.
    """

    name: str
    group: Group
    needs: frozenset[str]

    @property
    def resources(self) -> frozenset[str]:
        """Names of the registered resources this scorer needs, besides the per-clip inputs."""
        return self.needs - INPUTS

    @abc.abstractmethod
    def __call__(self, frames: np.ndarray, prompt: str, **resources: Any) -> float:
        """Score one clip of uint8 RGB frames (F, H, W, 3) generated for `prompt`."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, group={self.group!r}, needs={sorted(self.needs)})"


def validate_clip(frames: np.ndarray, min_frames: int = 1) -> None:
    """Raise ValueError unless `frames` is uint8 RGB of shape (F, H, W, 3) with F >= min_frames."""
    if not isinstance(frames, np.ndarray):
        raise ValueError(f"Invalid frames of type {type(frames).__name__}: expected a numpy uint8 array.")
    if frames.dtype != np.uint8:
        raise ValueError(f"Invalid frames dtype {frames.dtype}: expected uint8 RGB values in 0..255.")
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"Invalid frames shape {frames.shape}: expected (frames, height, width, 3) RGB.")
    if frames.shape[0] < min_frames:
        raise ValueError(
            f"Invalid frames shape {frames.shape}: this scorer needs at least {min_frames} frames."
        )
    if frames.shape[1] == 0 or frames.shape[2] == 0:
        raise ValueError(f"Invalid frames shape {frames.shape}: height and width must be at least 1.")


class FunctionScorer(Scorer):
    """A Scorer that calls a plain function with the inputs named in `needs` as keyword arguments."""

    def __init__(self, name: str, group: Group, needs: frozenset[str], function: Callable[..., float]):
        self.name = name
        self.group = group
        self.needs = needs
        self.function = function

    def __call__(self, frames: np.ndarray, prompt: str, **resources: Any) -> float:
        validate_clip(frames)
        missing = sorted(self.resources - set(resources))
        if missing:
            raise ValueError(
                f"Scorer {self.name!r} needs the resources {missing}, which were not passed. "
                f"Load them with load_resources([scorer], options) and pass them as keyword arguments."
            )
        inputs = {"frames": frames, "prompt": prompt, **resources}
        value = float(self.function(**{key: inputs[key] for key in self.needs}))
        if not math.isfinite(value):
            raise ValueError(f"Scorer {self.name!r} returned {value} for prompt {prompt!r}, expected a finite float.")
        return value


_REGISTRY: dict[str, Scorer] = {}

# Resource name -> loader. A loader takes the options of its resource (a mapping,
# possibly empty) and returns the loaded object, for example a CLIP model.
_RESOURCES: dict[str, Callable[[Mapping[str, Any]], Any]] = {}


def register_resource(name: str, loader: Callable[[Mapping[str, Any]], Any]) -> None:
    """Register `loader` as the way to build resource `name`, which scorers may then list in `needs`.

    Raises ValueError if `name` is a per-clip input or another loader already has it.
    Registering the same function again (as a module reload does) replaces the entry.
    """
    if not isinstance(name, str) or not name.isidentifier() or name in INPUTS:
        raise ValueError(
            f"Invalid resource name {name!r}: expected a Python identifier other than {sorted(INPUTS)}."
        )
    existing = _RESOURCES.get(name)
    if existing is not None and (existing.__module__, existing.__qualname__) != (loader.__module__, loader.__qualname__):
        raise ValueError(f"Resource name {name!r} is already registered by {existing!r}. Choose another name.")
    _RESOURCES[name] = loader


def load_resources(scorers: Sequence[Scorer], options: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """Load every resource that `scorers` need, once each, and return them by name.

    `options` maps a resource name to the keyword options of its loader; a resource
    without an entry gets an empty mapping. Loader errors propagate unchanged,
    because they name the missing weights and how to provide them.
    """
    options = options or {}
    names = sorted(set().union(*(scorer.resources for scorer in scorers))) if scorers else []
    loaded = {}
    for name in names:
        if name not in _RESOURCES:
            raise ValueError(f"Unknown resource {name!r}: expected one of {sorted(_RESOURCES) or 'none'}.")
        logger.info("Loading scoring resource %r", name)
        loaded[name] = _RESOURCES[name](options.get(name, {}))
    return loaded


def _validate_scorer_fields(name: str, group: str, needs: frozenset[str]) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(f"Invalid scorer name {name!r}: expected a non-empty str.")
    if group not in GROUPS:
        raise ValueError(f"Invalid group {group!r} for scorer {name!r}: expected one of {', '.join(GROUPS)}.")
    unknown = needs - INPUTS - set(_RESOURCES)
    if unknown or "frames" not in needs:
        raise ValueError(
            f"Invalid needs {sorted(needs)} for scorer {name!r}: expected 'frames', optionally "
            f"'prompt', and registered resources from {sorted(_RESOURCES) or 'none'}. "
            "Register a resource with register_resource before the scorers that need it."
        )


def register_scorer(scorer: Scorer) -> Scorer:
    """Add a Scorer instance to the registry under `scorer.name` and return it.

    Raises ValueError if another scorer already has that name. Registering the same
    function again (as a module reload does) replaces the entry.
    """
    _validate_scorer_fields(scorer.name, scorer.group, scorer.needs)
    existing = _REGISTRY.get(scorer.name)
    if existing is not None and not _same_source(existing, scorer):
        raise ValueError(
            f"Scorer name {scorer.name!r} is already registered by {existing!r}. Choose another name."
        )
    _REGISTRY[scorer.name] = scorer
    return scorer


def _same_source(first: Scorer, second: Scorer) -> bool:
    if isinstance(first, FunctionScorer) and isinstance(second, FunctionScorer):
        return (first.function.__module__, first.function.__qualname__) == (
            second.function.__module__,
            second.function.__qualname__,
        )
    return type(first) is type(second)


def register(name: str, *, group: Group, needs: Sequence[str] | frozenset[str]):
    """Register the decorated function as scorer `name`, leaving the function unchanged.

    The function takes the inputs in `needs` as keyword arguments, for example
    `def temporal_flickering(frames)` with needs={"frames"}, and returns a float.
    """
    needs_set = frozenset(needs)
    _validate_scorer_fields(name, group, needs_set)

    def decorator(function: Callable[..., float]) -> Callable[..., float]:
        register_scorer(FunctionScorer(name, group, needs_set, function))
        return function

    return decorator


def get_scorer(name: str) -> Scorer:
    """Return the registered scorer `name`, raising ValueError that lists the known names if absent."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"Unknown scorer {name!r}: expected one of {', '.join(available_scorers())}."
        ) from None


def available_scorers() -> list[str]:
    """Return the names of all registered scorers, sorted."""
    return sorted(_REGISTRY)


def _validate_weight(name: str, weight: float, label: str) -> float:
    weight = float(weight)
    if not math.isfinite(weight) or weight < 0:
        raise ValueError(f"Invalid {label} {weight} for {name!r}: expected a finite number >= 0.")
    return weight


def weighted_total(scores: Mapping[str, float], weights: Mapping[str, float]) -> float:
    """Combine `scores` as a weighted mean, with `weights` normalised to sum to 1.

    Scores without a weight are ignored. Raises ValueError naming the dimension when
    a weighted dimension has no score or a non-finite one, when a weight is negative
    or not finite, or when the weights sum to 0.
    """
    checked = {name: _validate_weight(name, weight, "weight") for name, weight in weights.items()}
    weight_sum = sum(checked.values())
    if weight_sum <= 0:
        raise ValueError(f"Invalid weights {dict(weights)}: they must sum to more than 0.")

    total = 0.0
    for name, weight in checked.items():
        if name not in scores:
            raise ValueError(
                f"Missing score for dimension {name!r}, which has weight {weight}. "
                f"Scores are present for: {', '.join(sorted(scores)) or 'none'}."
            )
        value = float(scores[name])
        if not math.isfinite(value):
            raise ValueError(f"Invalid score {value} for dimension {name!r}: expected a finite number.")
        total += weight / weight_sum * value
    return total


def _normalise_column(name: str, values: list[float], bounds: tuple[float, float] | None) -> list[float]:
    if bounds is not None:
        low, high = (float(bound) for bound in bounds)
        if not (math.isfinite(low) and math.isfinite(high) and high > low):
            raise ValueError(f"Invalid bounds {bounds} for dimension {name!r}: expected finite (min, max) with max > min.")
        return [(value - low) / (high - low) for value in values]

    low = min(values)
    high = max(values)
    if high == low:
        logger.debug("Dimension %r is constant (%s) over the table, so it becomes %s", name, low, CONSTANT_DIMENSION_VALUE)
        return [CONSTANT_DIMENSION_VALUE] * len(values)
    return [(value - low) / (high - low) for value in values]


def _table_dimensions(table: Sequence[Mapping[str, float]]) -> list[str]:
    """Return the sorted dimension names, raising ValueError unless every row has the same finite scores."""
    if not table:
        raise ValueError("Invalid table: it has no rows. Score at least one clip first.")

    dimensions = sorted(table[0])
    for row_index, row in enumerate(table):
        if sorted(row) != dimensions:
            raise ValueError(
                f"Row {row_index} has dimensions {sorted(row)}, but row 0 has {dimensions}. "
                "Every row must score the same dimensions."
            )
        for name in dimensions:
            if not math.isfinite(float(row[name])):
                raise ValueError(f"Invalid score {row[name]} for dimension {name!r} in row {row_index}.")
    return dimensions


def _group_members(dimensions: list[str], groups: Mapping[str, Group]) -> dict[str, list[str]]:
    members: dict[str, list[str]] = {group: [] for group in GROUPS}
    for name in dimensions:
        if name in groups:
            group = groups[name]
        elif name in _REGISTRY:
            group = _REGISTRY[name].group
        else:
            raise ValueError(
                f"Unknown dimension {name!r}: it is not a registered scorer, so pass its group in "
                f"groups={{{name!r}: 'quality' or 'semantic'}}. Registered: {', '.join(available_scorers())}."
            )
        if group not in GROUPS:
            raise ValueError(f"Invalid group {group!r} for dimension {name!r}: expected one of {', '.join(GROUPS)}.")
        members[group].append(name)
    return members


def omni_total(
    table: Sequence[Mapping[str, float]],
    quality_weight: float = 4.0,
    semantic_weight: float = 1.0,
    groups: Mapping[str, Group] | None = None,
    dimension_weights: Mapping[str, float] | None = None,
    bounds: Mapping[str, tuple[float, float]] | None = None,
) -> list[float]:
    """Compute an OmniScore-style total for every row of `table`, in row order.

    Each row maps dimension names to raw scores, and all rows must have the same
    dimensions. Each dimension is min-max normalised over the table to [0, 1], and a
    constant dimension becomes CONSTANT_DIMENSION_VALUE. A dimension listed in
    `bounds` is normalised with its fixed (min, max) instead, without clipping.
    Within the quality and the semantic group, the normalised values are averaged
    with `dimension_weights` (1.0 for unlisted dimensions). The totals are
    (quality_weight * Q + semantic_weight * S) / (quality_weight + semantic_weight).

    The default 4:1 group weights are those of VBench's total score (QUALITY_WEIGHT
    and SEMANTIC_WEIGHT in VBench's scripts/constant.py), which VideoDPO's OmniScore
    (OmniScore/compute_total_score.py) applies per video. Both normalise with fixed
    per-dimension bounds and weight dynamic_degree 0.5, which `bounds` and
    `dimension_weights` can reproduce.

    A dimension's group comes from `groups` if it is listed there, else from the
    registered scorer of that name. Raises ValueError for an empty table, rows with
    different dimensions, non-finite scores, an unknown dimension, invalid weights or
    bounds, or a group with a positive weight but no weighted dimensions.
    """
    dimensions = _table_dimensions(table)
    group_weights = {
        "quality": _validate_weight("quality", quality_weight, "group weight"),
        "semantic": _validate_weight("semantic", semantic_weight, "group weight"),
    }
    weight_sum = sum(group_weights.values())
    if weight_sum <= 0:
        raise ValueError(
            f"Invalid group weights quality={quality_weight}, semantic={semantic_weight}: they must sum to more than 0."
        )

    members = _group_members(dimensions, groups or {})
    dimension_weights = dimension_weights or {}
    weights = {name: _validate_weight(name, dimension_weights.get(name, 1.0), "dimension weight") for name in dimensions}
    for group, weight in group_weights.items():
        if weight > 0 and sum(weights[name] for name in members[group]) <= 0:
            raise ValueError(
                f"The table has no {group} dimensions with a positive weight, but {group}_weight is {weight}. "
                f"Add a {group} dimension or pass {group}_weight=0."
            )

    bounds = bounds or {}
    normalised = {
        name: _normalise_column(name, [float(row[name]) for row in table], bounds.get(name)) for name in dimensions
    }

    totals = []
    for row_index in range(len(table)):
        total = 0.0
        for group, group_weight in group_weights.items():
            if group_weight == 0:
                continue
            names = members[group]
            weighted = sum(weights[name] * normalised[name][row_index] for name in names)
            total += group_weight * weighted / sum(weights[name] for name in names)
        totals.append(total / weight_sum)
    return totals
