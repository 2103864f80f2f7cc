"""Issue 17: the property-based fuzz suite, briefly (server/fuzz.py; `python -m lazymerge.server.fuzz` runs it long).
No 5xx, no traceback, error bodies under 4 KB, bounded RSS growth; recipes and headers raise only their own errors."""

from __future__ import annotations

import pytest

pytest.importorskip("hypothesis")
pytest.importorskip("fastapi")


def test_fuzz_recipes_requests_and_headers_briefly():
    from lazymerge.server.fuzz import run

    res = run(examples=25)
    for target, figures in res.items():
        assert figures["examples"] >= 25 and not figures["failures"], (target, figures["failures"][:5])
    server = res["server"]
    assert server["max_error_bytes"] < 4096
    assert server["rss_growth_kb"] < 200_000, server  # ~100 requests: no per-request leak of note
    assert res["replay"]["examples"] >= 50 and res["replay"]["rss_growth_kb_per_request"] < 100, res["replay"]
