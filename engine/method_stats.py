"""Per-tensor statistics of the spherical and statistics-driven merge methods, and the coefficients they give.

The methods of mergekit 0.1.5 that look at whole tensors (nuslerp, multislerp, karcher, model_stock) return a
linear combination of their inputs whose coefficients depend only on the inputs' Gram matrix G[i, j] = <v_i, v_j>
(the v being the models, or their deltas to the base). So lazymerge reduces each tensor once to G (float64,
`gram`) and hands the coefficients to the elementwise `combine` pass; per row (row-wise nuslerp, filter-wise
model_stock) G is a (rows, n, n) stack and the coefficients are per-row vectors. The formulas are mergekit's,
rewritten on coefficient vectors: a vector sum_k c_k v_k has norm sqrt(c^T G c) and dot product (G c)_i with v_i.

* `nuslerp_coeffs`     mergekit/merge_methods/nuslerp.py   (c0, c1) per vector
* `multislerp_coeffs`  mergekit/merge_methods/multislerp.py
* `karcher_coeffs`     mergekit/merge_methods/karcher.py   (the fixed-point iteration in coefficient space)
* `model_stock_t`      mergekit/merge_methods/model_stock.py  (paper: arXiv 2403.19522, eq. 3)
* `arcee_threshold`    mergekit/merge_methods/arcee_fusion.py  (median + 1.5 IQR of the importance)
* `ramplus_lambdas`    mergekit/merge_methods/ram.py  (ramplus_tl's per-model factor on unique entries)

Arithmetic is float64 here where mergekit works in float32, so results agree to float32 rounding, not bits; the
few places where mergekit's float32 values decide a branch or a mask (arcee_fusion, ramplus_tl) are computed with
mergekit's own float32 torch operations, so they agree bit for bit.
"""

from __future__ import annotations

import math

import torch


def gram(vs: list[torch.Tensor], base: torch.Tensor | None = None, row_layout: str = "",
         chunk: int = 1 << 20) -> torch.Tensor:
    """float64 Gram matrix of the vectors v_i = vs[i] - base (or vs[i]).

    row_layout "": one (n, n) matrix over the flattened tensors. "row": (R, n, n), one per slice along the last
    dimension (R = numel / shape[-1]; a 1-D tensor is one row). "col": (C, n, n), one per vector along dimension
    0 (C = numel / shape[0]). Computed in chunks of about `chunk` elements so the float64 temporaries stay small."""
    shape = vs[0].shape
    n = len(vs)
    if row_layout == "col" and len(shape) >= 2:
        vs = [v.reshape(shape[0], -1).t() for v in vs]
        base = base.reshape(shape[0], -1).t() if base is not None else None
    elif row_layout:
        w = shape[-1] if len(shape) else 1
        vs = [v.reshape(-1, w) for v in vs]
        base = base.reshape(-1, w) if base is not None else None
    else:
        vs = [v.reshape(1, -1) for v in vs]
        base = base.reshape(1, -1) if base is not None else None
    rows = vs[0].shape[0]
    out = torch.zeros(rows, n, n, dtype=torch.float64, device=vs[0].device)
    cols = vs[0].shape[1]
    step = max(1, chunk // max(cols, 1)) if row_layout else 1
    col_step = cols if row_layout else chunk
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        for c0 in range(0, cols, col_step):
            c1 = min(cols, c0 + col_step)
            b = base[r0:r1, c0:c1].double() if base is not None else None
            m = torch.stack([v[r0:r1, c0:c1].double() - b if b is not None else v[r0:r1, c0:c1].double()
                             for v in vs], dim=1)  # (r, n, c)
            out[r0:r1] += m @ m.transpose(1, 2)
    return out if row_layout else out[0]


def nuslerp_coeffs(G: torch.Tensor, t: float, eps: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """(c0, c1) with slerp(t; v0, v1) = c0 v0 + c1 v1, per Gram matrix in G (..., 2, 2); float64.

    As mergekit's `nuslerp`: unit vectors with norms clamped at 1e-7, cos clamped to [-1, 1], linear
    interpolation where 1 - cos^2 <= eps^2."""
    n0 = G[..., 0, 0].clamp(min=0).sqrt().clamp(min=1e-7)
    n1 = G[..., 1, 1].clamp(min=0).sqrt().clamp(min=1e-7)
    cos = (G[..., 0, 1] / (n0 * n1)).clamp(-1.0, 1.0)
    colinear = (1 - cos * cos) <= eps**2
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    s = torch.sin(theta)
    s = torch.where(colinear, torch.ones_like(s), s)
    c0 = torch.where(colinear, torch.full_like(cos, 1 - t), torch.sin((1 - t) * theta) / s)
    c1 = torch.where(colinear, torch.full_like(cos, t), torch.sin(t * theta) / s)
    return c0, c1


def nuslerp_t(weights: tuple[float, float]) -> float:
    """mergekit: t = w_1 / (w_0 + w_1), 0.5 when the weights sum to (almost) zero."""
    total = weights[0] + weights[1]
    return 0.5 if abs(total) < 1e-6 else weights[1] / total


def _qf(G: torch.Tensor, c: torch.Tensor) -> float:
    """|sum_k c_k v_k|^2."""
    return float(c @ G @ c)


def multislerp_coeffs(G: torch.Tensor, weights: list[float], normalize_weights: bool = True,
                      eps: float = 1e-8) -> list[float]:
    """Coefficients c with multislerp(v; w) = sum_k c_k v_k. Raises ValueError where mergekit does (weighted mean
    of the unit vectors ~ 0 with more than two inputs; with two it falls back to w_0 v_0 + w_1 v_1)."""
    n = len(weights)
    w = torch.tensor(weights, dtype=torch.float64)
    if normalize_weights:
        w = w / w.sum()
    norms = G.diagonal().clamp(min=0).sqrt()
    inv = 1.0 / (norms + eps)  # unit vector u_i = v_i * inv_i
    a = w * inv  # weighted mean of the units, unnormalized
    mean_norm = math.sqrt(max(_qf(G, a), 0.0))
    if mean_norm < eps:
        if n == 2:
            return [float(w[0]), float(w[1])]
        raise ValueError("multislerp: the weighted sum of the unit input tensors is zero (antipodal inputs whose "
                         "weights balance out); mergekit refuses this too: change the weights")
    m = a / mean_norm  # mean = sum m_k v_k, a unit vector
    dots = (G @ m) * inv  # <u_i, mean>
    tau = w * inv - float((w * dots).sum()) * m  # tangent = sum_i w_i (u_i - dots_i mean)
    tn = math.sqrt(max(_qf(G, tau), 0.0)) + eps
    avg_norm = float((norms * w).sum())
    c = (m * math.cos(tn) + tau * (math.sin(tn) / tn)) * avg_norm
    return [float(x) for x in c]


def karcher_coeffs(G: torch.Tensor, max_iter: int = 10, tol: float = 1e-5) -> list[float]:
    """Coefficients c with karcher_mean(v) = sum_k c_k v_k (equal weights 1/n, as mergekit's method)."""
    n = G.shape[0]
    alphas = [1.0 / n] * n
    norms = [math.sqrt(max(float(G[i, i]), 0.0)) for i in range(n)]
    valid = [i for i in range(n) if norms[i] > tol]
    if not valid:
        return [0.0] * n
    asum = sum(alphas[i] for i in valid)
    na = {i: alphas[i] / asum for i in valid}

    def unit(i):
        e = torch.zeros(n, dtype=torch.float64)
        e[i] = 1.0 / norms[i] if norms[i] != 0.0 else 0.0
        return e

    units = {i: unit(i) for i in valid}
    mean = sum((na[i] * units[i] for i in valid), torch.zeros(n, dtype=torch.float64))
    mn = math.sqrt(max(_qf(G, mean), 0.0))
    mean = units[valid[0]].clone() if mn < tol else mean / mn
    for _ in range(max_iter):
        tangent = torch.zeros(n, dtype=torch.float64)
        gm = G @ mean
        for i in valid:
            dot = min(1.0, max(-1.0, float(gm @ units[i])))
            theta = math.acos(dot)
            if theta < tol:
                continue
            tangent += na[i] * (theta / math.sin(theta)) * (units[i] - dot * mean)
        tn = math.sqrt(max(_qf(G, tangent), 0.0))
        if tn < tol:
            break
        mean = math.cos(tn) * mean + math.sin(tn) * (tangent / tn)
        un = math.sqrt(max(_qf(G, mean), 0.0))
        if un > tol:
            mean = mean / un
    scale = sum(a * nm for a, nm in zip(alphas, norms))
    return [float(x) * scale for x in mean]


def model_stock_t(G: torch.Tensor) -> torch.Tensor:
    """Interpolation factor t per Gram matrix of the deltas (..., n, n): mean pairwise cosine (norm product
    clamped at 1e-6, cosines clamped to [-1, 1]), t = n cos / (1 + (n - 1) cos), 0 where |1 + (n - 1) cos| < 1e-6."""
    n = G.shape[-1]
    norms = G.diagonal(dim1=-2, dim2=-1).clamp(min=0).sqrt()
    cos = []
    for a in range(n):
        for b in range(a + 1, n):
            cos.append((G[..., a, b] / (norms[..., a] * norms[..., b]).clamp(min=1e-6)).clamp(-1.0, 1.0))
    c = torch.stack(cos).mean(dim=0)
    den = 1 + (n - 1) * c
    singular = den.abs() < 1e-6
    return torch.where(singular, torch.zeros_like(c), n * c / torch.where(singular, torch.ones_like(den), den))


def kl_rows(x: torch.Tensor, base: torch.Tensor, chunk_rows: int = 4096) -> torch.Tensor:
    """arcee_fusion's per-row KL(softmax(x) || softmax(base)) over the last dimension, float32, with mergekit's
    float32 operations (so the importance mask matches bit for bit). Shape (numel / shape[-1],)."""
    w = x.shape[-1] if x.dim() else 1
    x2, b2 = x.reshape(-1, w), base.reshape(-1, w)
    out = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
    eps = 1e-8
    for r0 in range(0, x2.shape[0], chunk_rows):
        p = torch.softmax(x2[r0:r0 + chunk_rows].float(), dim=-1) + eps
        q = torch.softmax(b2[r0:r0 + chunk_rows].float(), dim=-1) + eps
        out[r0:r0 + chunk_rows] = torch.sum(p * torch.log(p / q), dim=-1)
    return out


def arcee_threshold(sample: torch.Tensor) -> float:
    """median + 1.5 (q3 - q1) of `sample` (float32), each quantile the element at floor(q (n - 1)) of the sorted
    sample, in float32 as mergekit's `DynamicThresholdFusion`."""
    n = sample.numel()
    pos = (torch.tensor([0.25, 0.5, 0.75]) * (n - 1)).long().tolist()
    q1, med, q3 = (torch.kthvalue(sample.reshape(-1).cpu(), k + 1).values for k in pos)
    return float(med + 1.5 * (q3 - q1))


def ramplus_lambdas(shared: torch.Tensor, unique: torch.Tensor, r: float, alpha: float,
                    epsilon: float) -> list[float]:
    """ramplus_tl's factor on each model's unique entries, 1 + r * clamp(shared / max(unique, eps), 0, alpha),
    from int64 counts per model, in mergekit's float32 operations."""
    rho = shared / unique.clamp(min=epsilon)
    lam = 1 + r * rho.clamp(min=0, max=alpha)
    return [float(v) for v in lam]
