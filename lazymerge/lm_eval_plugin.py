"""Makes `lm_eval --model lazymerge` work after `pip install lazymerge`, without touching lm-eval.

lazymerge declares its lm-eval model as an entry point of group `lm_eval.models` (pyproject.toml), the group that
lm-eval's plugin discovery reads (EleutherAI/lm-evaluation-harness, "runtime plugin registration for model
backends"). lm-eval 0.4.13 predates that discovery: its registry accepts lazy "module:Class" placeholders
(`model_registry.register(name, target=...)`, lm_eval/api/registry.py) but nothing scans installed packages for
them. For such versions the installed file `lazymerge-lm_eval.pth` (run by Python's `site` at start-up) calls
`install()`: a meta-path hook that waits for `lm_eval.models` to be imported (lm-eval imports it to fill its registry
before it resolves `--model`) and then registers every `lm_eval.models` entry point that lm-eval does not already
know, as a "module:Class" placeholder, through lm-eval's public registry API. Nothing is imported at start-up but this
small module; lazymerge's model module (`lazymerge.engine.harness`) loads only when `--model lazymerge` is resolved.
On an lm-eval with its own discovery (`lm_eval.api.registry.load_plugins`), the hook does nothing.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

GROUP = "lm_eval.models"


def register_entry_points() -> list[str]:
    """Register the `lm_eval.models` entry points lm-eval lacks as lazy placeholders; returns their names."""
    from importlib.metadata import entry_points

    from lm_eval.api import registry

    if hasattr(registry, "load_plugins"):  # lm-eval reads the group itself
        return []
    added = []
    for ep in entry_points(group=GROUP):
        if ep.name not in registry.model_registry:
            registry.model_registry.register(ep.name, target=ep.value)
            added.append(ep.name)
    return added


class _AfterLmEvalModels(importlib.abc.MetaPathFinder):
    """Finds `lm_eval.models` as the normal path finder does, and registers the entry points once it has run."""

    def find_spec(self, name, path, target=None):
        if name != "lm_eval.models":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            try:
                register_entry_points()
            except Exception as e:  # noqa: BLE001 - a broken plugin must not break lm-eval itself
                print(f"lazymerge: could not register lm-eval plugins: {e}", file=sys.stderr)

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    """Called by `lazymerge-lm_eval.pth` at interpreter start-up; cheap (no import of lm-eval or torch)."""
    if "lm_eval.models" in sys.modules:
        register_entry_points()
    elif not any(isinstance(f, _AfterLmEvalModels) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterLmEvalModels())


def write_pth() -> str:
    """Write `lazymerge-lm_eval.pth` into this interpreter's site-packages (for an editable install, which does not
    install it: `make install` runs `python -m lazymerge.lm_eval_plugin`); returns its path."""
    import sysconfig
    from pathlib import Path

    src = Path(__file__).with_name("lazymerge-lm_eval.pth")
    dst = Path(sysconfig.get_paths()["purelib"]) / src.name
    dst.write_text(src.read_text())
    return str(dst)


if __name__ == "__main__":
    print(f"wrote {write_pth()}")  # prefer `python -c "...write_pth()"`: -m re-imports this module
