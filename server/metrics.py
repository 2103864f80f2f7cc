"""Prometheus metrics in the text exposition format (0.0.4), written without a client library.

`Metrics` owns every series the server exports; the HTTP layer, the serving layer and the batching scheduler
update it from any thread, and `render(extra)` writes the whole page (gauges computed at scrape time, such as the
merged-weight cache's bytes per recipe, are passed in as `extra`). Label values are recipe names, endpoint paths and
status codes, never free user text.
"""

from __future__ import annotations

import math
import threading

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


def _escape(v: str) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _fmt_labels(names: tuple[str, ...], values: tuple, extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _num(x: float) -> str:
    if x == math.inf:
        return "+Inf"
    return repr(float(x)) if not float(x).is_integer() else str(int(x))


class _Series:
    kind = ""

    def __init__(self, name: str, help: str, labels: tuple[str, ...] = ()):
        self.name, self.help, self.labels = name, help, labels
        self.lock = threading.Lock()

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Series):
    kind = "counter"

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.values: dict[tuple, float] = {}

    def inc(self, *labels, by: float = 1.0) -> None:
        with self.lock:
            self.values[labels] = self.values.get(labels, 0.0) + by

    def get(self, *labels) -> float:
        return self.values.get(labels, 0.0)

    def render(self) -> list[str]:
        with self.lock:
            items = sorted(self.values.items())
        return self.header() + [f"{self.name}{_fmt_labels(self.labels, k)} {_num(v)}" for k, v in items]


class Gauge(Counter):
    kind = "gauge"

    def set(self, *labels, value: float) -> None:
        with self.lock:
            self.values[labels] = float(value)


class Histogram(_Series):
    kind = "histogram"

    def __init__(self, name, help, labels=(), buckets=LATENCY_BUCKETS):
        super().__init__(name, help, labels)
        self.buckets = tuple(buckets) + (math.inf,)
        self.data: dict[tuple, list] = {}  # labels -> [bucket counts..., sum, count]

    def observe(self, *labels, value: float) -> None:
        with self.lock:
            d = self.data.setdefault(labels, [0] * len(self.buckets) + [0.0, 0])
            for i, b in enumerate(self.buckets):
                if value <= b:
                    d[i] += 1
            d[-2] += value
            d[-1] += 1

    def count(self, *labels) -> int:
        d = self.data.get(labels)
        return d[-1] if d else 0

    def render(self) -> list[str]:
        out = self.header()
        with self.lock:
            items = sorted((k, list(v)) for k, v in self.data.items())
        for k, d in items:
            for b, c in zip(self.buckets, d):
                le = 'le="' + _num(b) + '"'
                out.append(f"{self.name}_bucket{_fmt_labels(self.labels, k, le)} {c}")
            out.append(f"{self.name}_sum{_fmt_labels(self.labels, k)} {_num(d[-2])}")
            out.append(f"{self.name}_count{_fmt_labels(self.labels, k)} {d[-1]}")
        return out


class Metrics:
    def __init__(self):
        m = "lazymerge_"
        self.http_requests = Counter(m + "http_requests_total", "HTTP requests by route and status.",
                                     ("method", "route", "status"))
        self.http_latency = Histogram(m + "http_request_duration_seconds", "HTTP request wall time (streams: until "
                                      "the response headers).", ("route",))
        self.requests = Counter(m + "requests_total", "Inference requests by model, endpoint and outcome.",
                                ("model", "endpoint", "outcome"))
        self.errors = Counter(m + "errors_total", "Error responses by status and error type.", ("status", "type"))
        self.latency = Histogram(m + "request_latency_seconds", "Inference request latency, submission to last "
                                 "token.", ("model", "endpoint"))
        self.ttft = Histogram(m + "time_to_first_token_seconds", "Submission to the first generated token.",
                              ("model",))
        self.queue_time = Histogram(m + "queue_time_seconds", "Time a request waited before its batch started.",
                                    ("model",))
        self.prompt_tokens = Counter(m + "prompt_tokens_total", "Prompt tokens processed.", ("model",))
        self.generation_tokens = Counter(m + "generation_tokens_total", "Tokens generated.", ("model",))
        self.batch_size = Histogram(m + "batch_size", "Rows per batch (one batch = one forward per step).",
                                    ("model", "kind"), buckets=BATCH_BUCKETS)
        self.batch_requests = Histogram(m + "batch_requests", "Requests merged into one batch.", ("model", "kind"),
                                        buckets=BATCH_BUCKETS)
        self.cache_hits = Counter(m + "cache_hits_total", "Merged-weight cache hits during this model's batches.",
                                  ("model",))
        self.cache_misses = Counter(m + "cache_misses_total", "Merged-weight cache misses (merges) during this "
                                    "model's batches.", ("model",))
        self.step_seconds = Counter(m + "compute_seconds_total", "Worker time spent in this model's batches.",
                                    ("model",))

    def series(self) -> list[_Series]:
        return [v for v in vars(self).values() if isinstance(v, _Series)]

    def render(self, extra: list[_Series] = ()) -> str:
        lines: list[str] = []
        for s in self.series() + list(extra):
            lines += s.render()
        return "\n".join(lines) + "\n"
