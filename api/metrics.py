"""Prometheus metrics of the HTTP server, in a registry of its own so that each app (and test) starts at zero."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class ServeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "rankloop_requests",
            "HTTP requests by route and status",
            ["route", "status"],
            registry=self.registry,
        )
        self.prompt_tokens = Counter("rankloop_prompt_tokens", "Prompt tokens processed", registry=self.registry)
        self.completion_tokens = Counter(
            "rankloop_completion_tokens", "Tokens generated, all candidates", registry=self.registry
        )
        self.latency = Histogram(
            "rankloop_request_latency_seconds",
            "Time from request to last token",
            ["route"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128),
            registry=self.registry,
        )
        self.first_token = Histogram(
            "rankloop_time_to_first_token_seconds",
            "Time from request to the first token",
            registry=self.registry,
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16),
        )
        self.comparisons = Counter("rankloop_comparisons_stored", "Comparisons written", registry=self.registry)
        self.in_flight = Gauge("rankloop_requests_in_flight", "Generations running", registry=self.registry)
        self.engine_unfinished = Gauge(
            "rankloop_engine_unfinished_requests",
            "Requests the engine is running or queueing",
            registry=self.registry,
        )
        self.feedback = Counter(
            "rankloop_feedback_events",
            "Feedback submissions by kind and outcome (new, duplicate, conflict)",
            ["kind", "outcome"],
            registry=self.registry,
        )
        self.swap_seconds = Histogram(
            "rankloop_swap_seconds",
            "Hot-swap phases: drain (answers in flight finish) and load (new weights)",
            ["phase"],
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64),
            registry=self.registry,
        )
        self.swap_failures = Counter("rankloop_swap_failures", "Swaps refused or failed", registry=self.registry)
        self.served_version = Gauge("rankloop_policy_version", "Served policy version number", registry=self.registry)


class RequestCounter:
    """ASGI middleware counting requests by route and status (pure ASGI: Starlette's `@app.middleware("http")`
    costs a task and a body copy per request, a third of the throughput of a small endpoint)."""

    def __init__(self, app: ASGIApp, counter: Counter) -> None:
        self.app = app
        self.counter = counter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # an exception before the response started

        async def capture(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            route = scope.get("route")  # set by the router on this same scope when a route matched
            self.counter.labels(getattr(route, "path", "unmatched"), str(status)).inc()
