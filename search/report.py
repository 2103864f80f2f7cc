"""What a search shows: the live progress line, the summary table and the PNG plots.

* `Progress(total, generations)`: one line on stderr (redrawn in place on a terminal, one line per generation
  otherwise): generation, evaluations, best and median fitness (of the last generation), evaluations per minute
  (of this process) and ETA.
* `summarize(cfg, best_recipe, out)`: every source (and model A of a ps+dfs space) and the best merge, each task
  scored on the search split and, where the task names one, the held-out `test_data` split; printed as a table and
  written to `summary.json`. Held-out data is read here only, never by the fitness.
* `write_plots(space, history, out)`: `fitness.png` (every candidate, the best so far, each generation's median);
  `params.png` (PS: the best genome's weights / densities per model, layer group and filter, as a heatmap) or
  `path.png` (DFS: the best layer path as a diagram of hops, segments coloured by their scale).
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from pathlib import Path


def _dur(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Progress:
    def __init__(self, total: int, generations: int, quiet: bool = False, stream=None):
        self.total, self.generations, self.quiet = total, generations, quiet
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.perf_counter()
        self.n0: int | None = None
        self.last_gen = -1

    def line(self, gen: int, history: list[dict]) -> str:
        n = len(history)
        if self.n0 is None:
            self.n0 = n
        dt = time.perf_counter() - self.t0
        rate = (n - self.n0) / dt * 60 if dt > 0 and n > self.n0 else 0.0
        eta = (self.total - n) / rate * 60 if rate > 0 else float("nan")
        best = max((h["fitness"] for h in history), default=float("nan"))
        last = [h["fitness"] for h in history if h["generation"] == max(gen - 1, 0)] or [h["fitness"] for h in history]
        med = statistics.median(last) if last else float("nan")
        width = 20
        fill = int(width * min(n / max(self.total, 1), 1.0))
        return (f"[{'#' * fill}{'.' * (width - fill)}] gen {gen}/{self.generations}  evals {n}/{self.total}  "
                f"best {best:.4g}  median {med:.4g}  {rate:.1f} eval/min  ETA {_dur(eta)}")

    def update(self, gen: int, history: list[dict]) -> None:
        if self.quiet:
            return
        text = self.line(gen, history)
        if self.tty:
            self.stream.write("\r" + text + "\033[K")
            self.stream.flush()
        elif gen != self.last_gen:
            self.stream.write(text + "\n")
            self.stream.flush()
        self.last_gen = gen

    def close(self) -> None:
        if not self.quiet and self.tty:
            self.stream.write("\n")
            self.stream.flush()


# -- summary -----------------------------------------------------------------------------------------------------
def summary_models(cfg, best_recipe: dict) -> dict[str, dict]:
    models = {name: {"merge_method": "passthrough", "models": [{"model": name}]} for name in cfg.sources}
    if cfg.space.kind == "ps+dfs":
        from .run import source_layers

        models["ps"] = source_layers(cfg)[1]
    models["best"] = best_recipe
    return models


def summarize(cfg, best_recipe: dict, out: Path | None = None, quiet: bool = False, engine=None) -> list[dict]:
    """Rows {model, task, split, score} for every source and the best merge; printed and saved unless quiet/None."""
    from .evaluate import evaluate_recipe, make_engine
    from .tasks import load_tasks

    engine = engine or make_engine(cfg)
    splits = {"search": load_tasks(cfg, "data"), "test": load_tasks(cfg, "test_data")}
    rows = []
    for name, recipe in summary_models(cfg, best_recipe).items():
        for split, tasks in splits.items():
            if not tasks:
                continue
            for task, score in evaluate_recipe(engine, recipe, tasks, cfg.runtime.batch_size).items():
                rows.append({"model": name, "task": task, "split": split, "score": score})
    if out is not None:
        (Path(out) / "summary.json").write_text(json.dumps(rows, indent=1))
    if not quiet:
        print(format_table(rows))
    return rows


def format_table(rows: list[dict]) -> str:
    cols = []
    for r in rows:
        c = (r["task"], r["split"])
        if c not in cols:
            cols.append(c)
    models = list(dict.fromkeys(r["model"] for r in rows))
    val = {(r["model"], r["task"], r["split"]): r["score"] for r in rows}
    head = ["model"] + [f"{t} ({s})" for t, s in cols]
    body = [[m] + [f"{val[(m, t, s)]:.4f}" if (m, t, s) in val else "-" for t, s in cols] for m in models]
    w = [max(len(x[i]) for x in [head] + body) for i in range(len(head))]
    fmt = lambda row: "| " + " | ".join(x.ljust(w[i]) if i == 0 else x.rjust(w[i]) for i, x in enumerate(row)) + " |"
    sep = "|" + "|".join("-" * (n + 2) for n in w) + "|"
    return "\n".join([fmt(head), sep] + [fmt(r) for r in body])


# -- plots -------------------------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_fitness(history: list[dict], path: Path) -> None:
    plt = _plt()
    h = sorted(history, key=lambda r: r["eval"])
    x = [r["eval"] for r in h]
    y = [r["fitness"] for r in h]
    best, b = [], float("-inf")
    for v in y:
        b = max(b, v)
        best.append(b)
    gens = sorted({r["generation"] for r in h})
    med = [statistics.median([r["fitness"] for r in h if r["generation"] == g]) for g in gens]
    gx = [max(r["eval"] for r in h if r["generation"] == g) for g in gens]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.scatter(x, y, s=8, alpha=0.4, label="candidate")
    ax.plot(x, best, color="C3", label="best so far")
    ax.plot(gx, med, color="C2", marker="o", ms=3, label="generation median")
    ax.set_xlabel("evaluation")
    ax.set_ylabel("fitness")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_params(space, genome, path: Path) -> None:
    """One heatmap per parameter (weight, density, ...): rows are (model, filter), columns layer groups; each panel
    has its own colour scale spanning the parameter's search range, so weights (0-2) and densities (0-1) are not
    read against each other's colours."""
    import numpy as np

    plt = _plt()
    vals = space.values(genome)
    fl = space.slot_names
    params = list(dict.fromkeys(p for _, p in vals))
    panels = []
    for p in params:
        labels, rows = [], []
        for (m, q), arr in vals.items():
            if q != p:
                continue
            for f in range(arr.shape[1]):
                labels.append(f"{m}" + (f" [{fl[f]}]" if fl[f] else ""))
                rows.append(arr[:, f])
        panels.append((p, labels, np.array(rows)))
    n_rows = max(len(lab) for _, lab, _ in panels)
    n_groups = panels[0][2].shape[1]
    fig, axes = plt.subplots(1, len(panels), squeeze=False, layout="constrained",
                             figsize=(len(panels) * max(4.0, 2.6 + 0.9 * n_groups), 1.6 + 0.4 * n_rows))
    for ax, (p, labels, data) in zip(axes[0], panels):
        lo, hi = space._range(p)
        im = ax.imshow(data, aspect="auto", cmap="viridis", vmin=lo, vmax=hi)
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        ax.set_xticks(range(data.shape[1]), [f"group {g}" for g in range(data.shape[1])], fontsize=8)
        for i in range(data.shape[0]):
            for j in range(data.shape[1]):
                dark = (data[i, j] - lo) / (hi - lo) < 0.6
                ax.text(j, i, f"{data[i, j]:.2f}", ha="center", va="center", color="w" if dark else "k", fontsize=8)
        fig.colorbar(im, ax=ax, label=f"{p} (range {lo:g}-{hi:g})")
        ax.set_title(p, fontsize=10)
    fig.suptitle("evolved parameters (best candidate)", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_path(space, genome, path: Path) -> None:
    """The evolved layer path (hop by hop: which layer, coloured by the scale on the hidden state entering it) and,
    for a space with a scaling matrix, W itself (W[i, j]: the scale when a hop goes from layer i to layer j)."""
    import numpy as np

    plt = _plt()
    hops = space.hops(genome)
    L = space.layers
    matrix = space.scales == "matrix"
    width = max(7, 0.35 * len(hops) + 2)
    fig, axes = plt.subplots(1, 2 if matrix else 1, squeeze=False, layout="constrained",
                             figsize=(width + (0.35 * len(L) + 3 if matrix else 0), 0.3 * len(L) + 2.2),
                             gridspec_kw={"width_ratios": [width, 0.35 * len(L) + 3]} if matrix else None)
    ax = axes[0][0]
    cmap = plt.get_cmap("coolwarm")
    lo, hi = space.scale_range
    for k in range(1, len(hops)):
        s = hops[k][2]
        ax.plot([k - 1, k], [hops[k - 1][3], hops[k][3]], color=cmap((s - lo) / (hi - lo)), lw=2)
    for k, (m, _layer, _s, j) in enumerate(hops):
        ax.scatter([k], [j], color="C0" if m == space.a else "C1", zorder=3, s=25)
    ax.set_yticks(range(len(L)), [f"{m}.{i}" for m, i in L], fontsize=7)
    ax.set_xlabel("hop")
    ax.set_title(f"layer path, {len(hops)} hops ({space.a}: blue, {space.b}: orange; segment colour: scale)",
                 fontsize=9)
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(lo, hi))
    fig.colorbar(sm, ax=ax, label="scale")
    if matrix:
        W = np.array([[space._w(genome, i, j) for j in range(space.M)] for i in range(space.M)])
        wx = axes[0][1]
        im = wx.imshow(W, cmap="coolwarm", vmin=lo, vmax=hi)
        names = [f"{m}.{i}" for m, i in L]
        wx.set_xticks(range(len(L)), names, fontsize=6, rotation=90)
        wx.set_yticks(range(len(L)), names, fontsize=6)
        wx.set_xlabel("to layer j")
        wx.set_ylabel("from layer i")
        wx.set_title("scaling matrix W", fontsize=9)
        fig.colorbar(im, ax=wx, label="W[i, j]")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(space, history: list[dict], out: Path) -> list[Path]:
    out = Path(out)
    best = max(sorted(history, key=lambda r: r["eval"]), key=lambda r: r["fitness"])
    paths = [out / "fitness.png"]
    plot_fitness(history, paths[0])
    if space.kind == "ps":
        paths.append(out / "params.png")
        plot_params(space, best["genome"], paths[-1])
    else:
        paths.append(out / "path.png")
        plot_path(space, best["genome"], paths[-1])
    return paths
