"""keter's Prometheus metrics (``GET /metrics``), in a registry of their own."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from keter.messages import AppTraffic, Outcome
from keter.stats.traffic import CLASSES, METRIC_BUCKETS

DURATION_BUCKETS = (0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """Counters and gauges the status actor updates from the supervisor's messages."""

    def __init__(self, certificates: Callable[[], list[tuple[str, float]]] = list) -> None:
        """``certificates``: (host, not_after) of each host with a certificate, read at
        every scrape (``StatusBoard.certificate_expiries``)."""
        self.registry = CollectorRegistry()
        r = self.registry
        self.up = Gauge(
            "keter_app_up", "1 while the app's serving version runs", ["app"], registry=r
        )
        self.deploys = Counter(
            "keter_deploys", "Finished deploy attempts by outcome", ["app", "outcome"], registry=r
        )
        self.duration = Histogram(
            "keter_deploy_duration_seconds",
            "Seconds from bundle seen to serving, for deploys that reached serving",
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.restarts = Counter(
            "keter_restarts", "Restarts of a serving version after a crash", ["app"], registry=r
        )
        self.health_check_failures = Counter(
            "keter_health_check_failures",
            "Deploys abandoned because the new version failed its health check",
            ["app"],
            registry=r,
        )
        # A refused entry of incoming/ under a name no app has: counted without its name.
        # Every file name seen would otherwise be a series until keter stops (1,500 junk
        # files dropped and deleted: 3,000 series in every scrape).
        self.refused = Counter(
            "keter_refused_bundles",
            "Entries of incoming/ refused (not a bundle keter can read) under a name no app has",
            registry=r,
        )
        self.traffic = TrafficMetrics()
        r.register(self.traffic)
        r.register(CertificateMetrics(certificates))

    def forget(self, app: str) -> None:
        """The app is gone: every series of its own goes (the deploy history keeps its
        record), so the series stay as many as the apps."""
        for metric, labels in (
            (self.up, ()),
            *((self.deploys, (outcome,)) for outcome in Outcome),
            (self.restarts, ()),
            (self.health_check_failures, ()),
        ):
            with contextlib.suppress(KeyError):  # never counted
                metric.remove(app, *labels)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class TrafficMetrics:
    """Requests and upstream latency per app, as the stats component last reported them.

    A collector of its own: the counts are the stats component's (since keter
    started), exported as they are at each scrape.
    """

    def __init__(self) -> None:
        self.apps: dict[str, AppTraffic] = {}  # replaced whole at each report, never changed

    def collect(self):
        requests = CounterMetricFamily(
            "keter_http_requests",
            "Requests nginx answered for the app, by version and status class",
            labels=["app", "version", "status"],
        )
        latency = HistogramMetricFamily(
            "keter_http_upstream_latency_seconds",
            "Seconds the app took to answer (nginx's upstream response time)",
            labels=["app"],
        )
        for app in self.apps.values():
            for version in app.versions:
                for status, count in zip(CLASSES, version.classes, strict=True):
                    if count:
                        requests.add_metric([app.app, version.version, status], count)
            if app.latency_buckets:
                cumulative, buckets = 0, []
                for bound, count in zip(METRIC_BUCKETS, app.latency_buckets, strict=True):
                    cumulative += count
                    buckets.append((repr(float(bound)), cumulative))
                buckets.append(("+Inf", app.latency_count))
                latency.add_metric([app.app], buckets, app.latency_sum)
        yield requests
        yield latency


class CertificateMetrics:
    """When each host's certificate expires, as the status board has it at each scrape.

    A collector of its own, so a host whose app went away (or that has no
    certificate yet) simply has no sample, with nothing to remove.
    """

    def __init__(self, expiries: Callable[[], list[tuple[str, float]]]) -> None:
        self.expiries = expiries

    def collect(self):
        expiry = GaugeMetricFamily(
            "keter_certificate_expiry_timestamp_seconds",
            "When the host's certificate from keter.acme expires (seconds since the epoch)",
            labels=["host"],
        )
        for host, not_after in self.expiries():
            expiry.add_metric([host], not_after)
        yield expiry
