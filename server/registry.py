"""The recipe registry: model id -> compiled recipe (`LazyModel`), plus every source as an identity recipe.

Recipes are compiled by the engine, which validates them and resolves their model references against the
registered sources only (the engine is built with `allow_open=False`: a recipe can never make the server open a
file). Registering a name again replaces its entry; requests already queued keep the model they resolved, new ones
get the new one, and since the merged-weight cache is keyed by tensor content, not by name, no request can see the
old weights under the new recipe.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass

from .errors import ServingError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:\-]{0,63}$")


@dataclass
class RecipeEntry:
    name: str
    kind: str  # "recipe" | "source"
    recipe: dict
    model: object  # LazyModel
    created: int

    @property
    def digest(self) -> str:
        return self.model.digest


def identity_recipe(source: str, num_layers: int) -> dict:
    return {"merge_method": "passthrough",
            "slices": [{"sources": [{"model": source, "layer_range": [0, num_layers]}]}]}


def parse_recipe(engine, recipe: str | dict):
    """Validate and compile a recipe -> (normalized dict, LazyModel); RecipeError propagates (-> 422)."""
    from lazymerge.engine import load_recipe

    r = load_recipe(recipe)
    return r.to_dict(), engine.compile(r)


class RecipeRegistry:
    def __init__(self, engine, max_recipes: int = 64):
        self.engine = engine
        self.max_recipes = max_recipes
        self._entries: dict[str, RecipeEntry] = {}
        self._lock = threading.Lock()
        for name in sorted(engine.sources.sources):
            rec = identity_recipe(name, engine.sources[name].num_layers)
            self._entries[name] = RecipeEntry(name, "source", rec, engine.compile(rec), int(time.time()))

    def register(self, name: str, recipe: str | dict) -> tuple[RecipeEntry, bool]:
        """Compile and store `recipe` under `name`; returns (entry, created)."""
        if not NAME_RE.match(name or ""):
            raise ServingError(400, f"invalid recipe name {name!r}: 1-64 characters of letters, digits, '.', '_', "
                               "':' or '-', starting with a letter or digit", param="name")
        with self._lock:
            old = self._entries.get(name)
            if old is not None and old.kind == "source":
                raise ServingError(400, f"{name!r} is a source; choose another recipe name", param="name")
            n_recipes = sum(e.kind == "recipe" for e in self._entries.values())
            if old is None and n_recipes >= self.max_recipes:
                raise ServingError(429, f"recipe limit reached ({self.max_recipes}); delete one first",
                                   code="recipe_limit_reached")
        rec, model = parse_recipe(self.engine, recipe)  # outside the lock: compiling reads headers
        entry = RecipeEntry(name, "recipe", rec, model, int(time.time()))
        with self._lock:
            if name not in self._entries and sum(e.kind == "recipe" for e in self._entries.values()) \
                    >= self.max_recipes:
                raise ServingError(429, f"recipe limit reached ({self.max_recipes}); delete one first",
                                   code="recipe_limit_reached")
            self._entries[name] = entry
        return entry, old is None

    def get(self, name: str) -> RecipeEntry:
        e = self._entries.get(name)
        if e is None:
            raise ServingError(404, f"the model {name!r} does not exist; GET /v1/models lists them",
                               param="model", code="model_not_found")
        return e

    def delete(self, name: str) -> None:
        with self._lock:
            e = self.get(name)
            if e.kind == "source":
                raise ServingError(400, f"{name!r} is a source and cannot be deleted", param="name")
            del self._entries[name]

    def entries(self) -> list[RecipeEntry]:
        with self._lock:
            return list(self._entries.values())

    def __contains__(self, name: str) -> bool:
        return name in self._entries
