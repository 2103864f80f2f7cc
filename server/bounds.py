"""Bounded request value types: every number a request carries has a range checked at the edge (pydantic), so a
value that would overflow or misbehave deeper down (a seed of 2**64, a temperature of infinity, n of 10**30) is a 400
naming its field, never a 500. `protocol` uses these for its fields; the server's own caps (max_tokens, batch size,
prompt length) are checked by the serving layer against its configuration.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

Seed = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX, description="A signed 64-bit integer.")]
Temperature = Annotated[float, Field(ge=0.0, le=2.0, allow_inf_nan=False)]  # OpenAI's range
TopP = Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0, allow_inf_nan=False)]  # OpenAI's range (only 0 is supported)
Count = Annotated[int, Field(ge=1, le=128)]  # n, best_of: the serving layer caps rows by its batch size
TokenCount = Annotated[int, Field(ge=0, le=INT64_MAX)]
