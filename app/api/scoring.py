"""The one path below every scoring transport (/score, the Open Inference Protocol's /infer): read the
body under its limits, take a place in the queue, parse (on the loop or in a thread), resolve the
method and threshold, score through the scheduler, count. A transport brings only its parser and
its answer's encoding, so limits, back-pressure and metrics cannot differ between them."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from app.api.body import read_body
from app.api.parsing import Body, ScoreRequest, parse_is_cheap
from app.api.service import Service
from app.engine.host import Served
from app.engine.scorer import ScoreOutput

Parsed = TypeVar("Parsed", bound=ScoreRequest)


async def score_body(
    request: Request, service: Service, served: Served, kind: str, parse: Callable[[Body], Parsed]
) -> tuple[Parsed, ScoreOutput]:
    """`kind` (a media type) tells parse_is_cheap how costly the body can be to parse."""
    # The body first, then a place in the queue: a stalled upload must not hold a queue slot.
    async with (
        read_body(request, service.body_limits, service.bodies) as body,
        service.scheduler.admission(),
    ):
        # Costlier bodies are parsed off the event loop, which keeps accepting and answering meanwhile.
        parsed = parse(body) if parse_is_cheap(body, kind) else await run_in_threadpool(parse, body)
        method = served.resolve_method(parsed.method)
        fpr = served.resolve_fpr(parsed.threshold, method)
        out = await service.scheduler.score(served.scorer, parsed.x, method, fpr, parsed.explain)
    request.state.rows = parsed.x.shape[0]
    flagged = int(out.is_anomaly.sum())
    # Rates other than the calibrated ones share one label: a client must not mint time series.
    label = out.threshold.name if out.threshold.fpr in served.bundle.fprs else "other"
    service.metrics.observe_scores(served.bundle, method, label, out.score, flagged)
    return parsed, out
