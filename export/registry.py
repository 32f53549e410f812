"""The model family as a registry by name.

Each family member registers a factory with `register_model`, together with its default training
recipe. `create_model` records the resolved constructor arguments on the model, so checkpoints
and the exported metadata can rebuild exactly the same network later.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from export.recipe import Recipe

if TYPE_CHECKING:  # the family modules import this one, so no runtime import of them here
    from export.models.base import FamilyModel

Factory = Callable[..., "FamilyModel"]


@dataclass(frozen=True)
class Entry:
    """One registered family member."""

    name: str
    factory: Factory
    recipe: Recipe
    summary: str
    goal: float | None  # test accuracy its default recipe must reach (docs/MODELS.md checks it)


_REGISTRY: dict[str, Entry] = {}


def register_model(recipe: Recipe, goal: float | None = None) -> Callable[[Factory], Factory]:
    """Register a factory under its function name with its default recipe and accuracy goal."""

    def wrap(factory: Factory) -> Factory:
        name = factory.__name__
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        summary = (inspect.getdoc(factory) or "").split("\n\n")[0].replace("\n", " ")
        _REGISTRY[name] = Entry(
            name=name, factory=factory, recipe=recipe, summary=summary, goal=goal
        )
        return factory

    return wrap


def _load_family() -> None:
    # Importing the package runs every family module's decorators.
    import export.models  # noqa: F401


def get_entry(name: str) -> Entry:
    _load_family()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(list_models())}") from None


def list_models() -> list[str]:
    """Names of every registered model, in registration (roughly historical) order."""
    _load_family()
    return list(_REGISTRY)


def create_model(name: str, **kwargs: Any) -> FamilyModel:
    """Build a family member; unknown keyword arguments are an error naming the valid ones."""
    entry = get_entry(name)
    signature = inspect.signature(entry.factory)
    try:
        bound = signature.bind(**kwargs)
    except TypeError:
        valid = ", ".join(signature.parameters) or "none"
        raise TypeError(f"model {name!r} takes options: {valid}; got {sorted(kwargs)}") from None
    bound.apply_defaults()
    model = entry.factory(**bound.arguments)
    model.name = name
    model.init_kwargs = dict(bound.arguments)
    return model
