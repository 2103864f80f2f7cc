"""Blind A/B votes and the leaderboard, persisted in SQLite.

Each vote records the two recipe names (and their plan digests), which side won (or a tie) and the prompt. The
leaderboard is a pure function of the votes in the order they were cast: wins, losses, ties, win rate
((wins + ties/2) / games) and an Elo rating (every recipe starts at 1000, K = 32, a tie scores 1/2), so it survives
restarts and can be recomputed at any time.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

ELO_START = 1000.0
ELO_K = 32.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS votes (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    battle_id TEXT NOT NULL UNIQUE,
    recipe_a TEXT NOT NULL,
    recipe_b TEXT NOT NULL,
    digest_a TEXT NOT NULL,
    digest_b TEXT NOT NULL,
    winner TEXT NOT NULL CHECK (winner IN ('A', 'B', 'tie')),
    prompt TEXT NOT NULL
)
"""


def elo_update(ra: float, rb: float, score_a: float, k: float = ELO_K) -> tuple[float, float]:
    """New ratings after one game; score_a is 1 (A won), 0 (B won) or 0.5 (tie)."""
    expect_a = 1.0 / (1.0 + 10 ** ((rb - ra) / 400.0))
    return ra + k * (score_a - expect_a), rb - k * (score_a - expect_a)


def leaderboard(votes: list[tuple[str, str, str]]) -> list[dict]:
    """votes: (recipe_a, recipe_b, winner) in casting order -> rows sorted by rating, best first."""
    stats: dict[str, dict] = {}

    def row(name):
        return stats.setdefault(name, {"recipe": name, "rating": ELO_START, "games": 0, "wins": 0, "losses": 0,
                                       "ties": 0})

    for a, b, w in votes:
        ra, rb = row(a), row(b)
        s = {"A": 1.0, "B": 0.0, "tie": 0.5}[w]
        ra["rating"], rb["rating"] = elo_update(ra["rating"], rb["rating"], s)
        for r in (ra, rb):
            r["games"] += 1
        if w == "tie":
            ra["ties"] += 1
            rb["ties"] += 1
        else:
            win, lose = (ra, rb) if w == "A" else (rb, ra)
            win["wins"] += 1
            lose["losses"] += 1
    out = []
    for r in stats.values():
        r["win_rate"] = (r["wins"] + 0.5 * r["ties"]) / r["games"]
        r["rating"] = round(r["rating"], 2)
        out.append(r)
    return sorted(out, key=lambda r: (-r["rating"], r["recipe"]))


class VoteStore:
    def __init__(self, path: str | Path | None = None):
        self.path = str(path) if path else ":memory:"
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, check_same_thread=False)
        self._lock = threading.Lock()
        with self._lock, self._db:
            self._db.execute(_SCHEMA)

    def record(self, battle_id: str, recipe_a: str, recipe_b: str, digest_a: str, digest_b: str, winner: str,
               prompt: str) -> bool:
        """Store one vote; False if this battle was already voted on."""
        try:
            with self._lock, self._db:
                self._db.execute("INSERT INTO votes (ts, battle_id, recipe_a, recipe_b, digest_a, digest_b, winner, "
                                 "prompt) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                                 (time.time(), battle_id, recipe_a, recipe_b, digest_a, digest_b, winner, prompt))
            return True
        except sqlite3.IntegrityError:
            return False

    def votes(self) -> list[tuple[str, str, str]]:
        with self._lock:
            return self._db.execute("SELECT recipe_a, recipe_b, winner FROM votes ORDER BY id").fetchall()

    def leaderboard(self) -> list[dict]:
        return leaderboard(self.votes())

    def close(self) -> None:
        with self._lock:
            self._db.close()
