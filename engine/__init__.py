"""lazymerge.engine: sources, recipes, merge math and the lazy runtime (no server or search dependencies).

Names load on first use, so `lazymerge --help` and the CLI's argument parsing import neither torch nor transformers.
"""

_EXPORTS = {
    "CheckpointError": "checkpoint", "Source": "checkpoint",
    "ModelPlan": "plan", "SourceSet": "plan", "compile_plan": "plan",
    "Recipe": "recipe", "RecipeError": "recipe", "load_recipe": "recipe",
    "Engine": "api", "LazyModel": "api",
    "SamplingParams": "generate", "Completion": "generate", "UsageError": "generate",
}


def __getattr__(name):
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'lazymerge.engine' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{mod}"), name)


__all__ = list(_EXPORTS)
