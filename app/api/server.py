"""The server process of `anomaly-scores serve`: uvicorn with a readiness drain on SIGTERM.

On SIGTERM, /readyz answers 503 at once while requests keep being served for `drain_s` seconds,
so a load balancer or Kubernetes stops sending before any connection is closed; only then does
uvicorn's graceful shutdown begin (stop accepting, finish in-flight requests). Without the drain,
uvicorn closes connections whose request it has not read yet, and those requests are lost.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

import uvicorn

from app.api.service import Service

log = logging.getLogger("anomaly_scores.service")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, service: Service, drain_s: float) -> None:
        super().__init__(config)
        self.service, self.drain_s = service, drain_s

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGTERM and self.drain_s > 0 and not self.service.draining:
            self.service.draining = True
            log.info("SIGTERM: draining, /readyz answers 503", extra={"fields": {"drain_s": self.drain_s}})
            timer = threading.Timer(self.drain_s, uvicorn.Server.handle_exit, (self, sig, frame))
            timer.daemon = True
            timer.start()
            return
        super().handle_exit(sig, frame)
