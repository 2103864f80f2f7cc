"""A source's vocabulary tensor seen through the merged vocabulary: output row -> source row, or a filled row.

When a recipe merges vocabularies (`tokenizer_source` / `tokenizer:`), every source's embedding and LM head is read
as if it had been re-indexed into the output vocabulary before merging (mergekit/tokenizer/embed.py,
`PermutedVocabulary`). A `RowMap` says, per output row of that *virtual* tensor:

* `own[r] >= 0`: the source's own row `own[r]`;
* `r in fills`: the mean of rows of the recipe's sources, `((source, tensor, row), ...)` summed in that order in
  float32 and divided by their count (one entry: a copy of that row; none: a zero row);
* `r >= pad_from`: padding (`pad_to_multiple_of`): the mean of this virtual tensor's rows `[0, pad_from)`;
* anything else (`own[r] < 0`, not filled): a zero row.

A RowMap is plain data with a content `key` (source fingerprints, not names), so the merged-weight cache and the
merge statistics that depend on it stay correct. `gather` builds the requested rows only: an embedding lookup reads
the rows it needs, never the whole tensor (padding rows excepted: their mean needs every row).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

Contribution = tuple[str, str, int]  # (source name, tensor name, row)


@dataclass(frozen=True, eq=False)
class RowMap:
    own: torch.Tensor = field(repr=False)  # (n_rows,) int64: own source row, or -1
    fills: dict[int, tuple[Contribution, ...]] = field(repr=False)
    pad_from: int | None  # first padding row, None without padding
    key: str  # content key: equal keys give equal virtual tensors

    @property
    def n_rows(self) -> int:
        return int(self.own.shape[0])

    def __eq__(self, other) -> bool:
        return isinstance(other, RowMap) and other.key == self.key

    def __hash__(self) -> int:
        return hash(self.key)


def gather(rm: RowMap, own: torch.Tensor, other: Callable[[str, str], torch.Tensor],
           rows: torch.Tensor | None = None) -> torch.Tensor:
    """Rows `rows` (1-D int64; None = all) of the virtual tensor, in `own`'s dtype and device.

    `own`: the source's tensor (n_src, *rest); `other(source, name)`: any source's tensor, for filled rows.
    Returns (len(rows) or n_rows, *rest). Filled rows are computed in float32 and cast (exact for float32 sources).
    """
    idx = (rm.own if rows is None else rm.own[rows.cpu()]).to(own.device)  # the map stays on the CPU
    out = own[idx.clamp(min=0)]  # (R, *rest): a copy
    missing = (idx < 0).nonzero().flatten().tolist()
    if not missing:
        return out
    wanted = list(range(rm.n_rows)) if rows is None else rows.tolist()
    pad_mean = None
    for pos in missing:
        r = wanted[pos]
        if rm.pad_from is not None and r >= rm.pad_from:
            if pad_mean is None:
                body = gather(rm, own, other, torch.arange(rm.pad_from, device=own.device))
                pad_mean = torch.mean(body.float(), dim=0).to(own.dtype)
            out[pos] = pad_mean
            continue
        contribs = rm.fills.get(r, ())
        acc = torch.zeros(own.shape[1:], dtype=torch.float32, device=own.device)
        for src, name, row in contribs:
            acc = acc + other(src, name)[row].to(own.device, torch.float32)
        if contribs:
            acc /= len(contribs)
        out[pos] = acc.to(own.dtype)
    return out
