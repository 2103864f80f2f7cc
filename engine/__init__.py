"""lazymerge.engine: sources, recipes, merge math and the lazy runtime (no server or search dependencies)."""

from .checkpoint import CheckpointError, Source
from .plan import ModelPlan, SourceSet, compile_plan
from .recipe import Recipe, RecipeError, load_recipe


def __getattr__(name):  # the runtime imports transformers: load it on first use
    if name in ("Engine", "LazyModel"):
        from . import api

        return getattr(api, name)
    if name in ("SamplingParams", "Completion"):
        from . import generate

        return getattr(generate, name)
    raise AttributeError(name)


__all__ = ["CheckpointError", "Source", "ModelPlan", "SourceSet", "compile_plan", "Recipe", "RecipeError",
           "load_recipe", "Engine", "LazyModel", "SamplingParams", "Completion"]
