"""Prometheus metrics through `prometheus_client` (as vLLM does), one registry per server.

`Metrics` owns every series the server exports; the HTTP layer, the serving layer and the batching scheduler update
it from any thread (`inc(*labels, by=)`, `observe(*labels, value=)`), and `render()` writes the page in the text
exposition format. Gauges computed at scrape time (the merged-weight cache per recipe, engine and scheduler state)
come from the `scrape` callback, which returns `prometheus_client` metric families.

Bounded cardinality: label values are route templates, status codes, endpoint names and *model labels*. A model
label is passed through `model_label` (the serving layer's: a registered name stays itself, anything else — an inline
recipe, `inline-<digest>`, a recipe deleted meanwhile — becomes `inline` or `other`), and `forget_model(name)` drops
every series of a deleted recipe. So the page grows with the registered recipes (capped by `max_recipes`), never with
inline recipes or registrations and deletions over time.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable

import prometheus_client
from prometheus_client import CollectorRegistry, generate_latest

prometheus_client.disable_created_metrics()  # no `_created` series: one per label set would double the page

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
CONTENT_TYPE = prometheus_client.CONTENT_TYPE_LATEST


class _Series:
    """One labelled metric: remembers its label sets so that a model's series can be removed."""

    def __init__(self, metric, labels: tuple[str, ...], model_label: Callable[[str], str]):
        self.metric, self.labels = metric, labels
        self._model_at = labels.index("model") if "model" in labels else None
        self._model_label = model_label
        self._seen: set[tuple] = set()
        self._lock = threading.Lock()

    def _child(self, values: tuple):
        if self._model_at is not None:
            values = values[:self._model_at] + (self._model_label(str(values[self._model_at])),) + \
                values[self._model_at + 1:]
        values = tuple(str(v) for v in values)
        with self._lock:
            self._seen.add(values)
        return self.metric.labels(*values) if values else self.metric

    def forget_model(self, name: str) -> None:
        if self._model_at is None:
            return
        with self._lock:
            gone = [v for v in self._seen if v[self._model_at] == name]
            for v in gone:
                self._seen.discard(v)
                try:
                    self.metric.remove(*v)
                except KeyError:
                    pass


class Counter(_Series):
    def inc(self, *labels, by: float = 1.0) -> None:
        if by:
            self._child(labels).inc(by)
        else:
            self._child(labels)  # the series exists (at 0) once it has been touched


class Histogram(_Series):
    def observe(self, *labels, value: float) -> None:
        self._child(labels).observe(value)


class _Scrape:
    """A collector whose families are computed at scrape time by a callback."""

    def __init__(self):
        self.callback: Callable[[], Iterable] | None = None

    def collect(self):
        if self.callback is not None:
            yield from self.callback()


class Metrics:
    def __init__(self, model_label: Callable[[str], str] | None = None):
        self.registry = CollectorRegistry(auto_describe=False)
        self.model_label = model_label or (lambda v: v)
        self._series: list[_Series] = []
        m = "lazymerge_"
        self.http_requests = self._counter(m + "http_requests_total", "HTTP requests by route and status.",
                                           ("method", "route", "status"))
        self.http_latency = self._histogram(m + "http_request_duration_seconds", "HTTP request wall time (streams: "
                                            "until the response headers).", ("route",))
        self.requests = self._counter(m + "requests_total", "Inference requests by model, endpoint and outcome.",
                                      ("model", "endpoint", "outcome"))
        self.errors = self._counter(m + "errors_total", "Error responses by status and error type.", ("status", "type"))
        self.latency = self._histogram(m + "request_latency_seconds", "Inference request latency, submission to last "
                                       "token.", ("model", "endpoint"))
        self.ttft = self._histogram(m + "time_to_first_token_seconds", "Submission to the first generated token.",
                                    ("model",))
        self.queue_time = self._histogram(m + "queue_time_seconds", "Time a request waited before its batch started.",
                                          ("model",))
        self.prompt_tokens = self._counter(m + "prompt_tokens_total", "Prompt tokens processed.", ("model",))
        self.generation_tokens = self._counter(m + "generation_tokens_total", "Tokens generated.", ("model",))
        self.batch_size = self._histogram(m + "batch_size", "Rows per batch (one batch = one forward per step).",
                                          ("model", "kind"), buckets=BATCH_BUCKETS)
        self.batch_requests = self._histogram(m + "batch_requests", "Requests merged into one batch.",
                                              ("model", "kind"), buckets=BATCH_BUCKETS)
        self.cache_hits = self._counter(m + "cache_hits_total", "Merged-weight cache hits during this model's "
                                        "batches.", ("model",))
        self.cache_misses = self._counter(m + "cache_misses_total", "Merged-weight cache misses (merges) during this "
                                          "model's batches.", ("model",))
        self.step_seconds = self._counter(m + "compute_seconds_total", "Worker time spent in this model's batches.",
                                          ("model",))
        self._scrape = _Scrape()
        self.registry.register(self._scrape)

    def _counter(self, name, help, labels) -> Counter:
        s = Counter(prometheus_client.Counter(name, help, labels, registry=self.registry), labels, self._label)
        self._series.append(s)
        return s

    def _histogram(self, name, help, labels, buckets=LATENCY_BUCKETS) -> Histogram:
        s = Histogram(prometheus_client.Histogram(name, help, labels, buckets=buckets, registry=self.registry),
                      labels, self._label)
        self._series.append(s)
        return s

    def _label(self, value: str) -> str:
        return self.model_label(value)

    def set_scrape(self, callback: Callable[[], Iterable]) -> None:
        """`callback()` -> prometheus_client metric families, computed at each scrape."""
        self._scrape.callback = callback

    def forget_model(self, name: str) -> None:
        """Drop every series labelled with model `name` (a deleted recipe)."""
        for s in self._series:
            s.forget_model(name)

    def render(self) -> str:
        return generate_latest(self.registry).decode()
