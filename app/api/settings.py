"""Every setting of the service, from environment variables (prefix ANOMALY_), in one object.

Read once by `create_app` or the `serve` command, never at import time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from app.api.protocol import HEAD_TIMEOUT_S


class Settings(BaseSettings):
    # Errors name the setting, never its value: a refused key must not reach the logs.
    model_config = SettingsConfigDict(env_prefix="ANOMALY_", extra="ignore", hide_input_in_errors=True)

    model_path: Path = Field(Path("models/default"), description="bundle directory to serve")
    method: str | None = Field(None, description="default score method (default: the bundle's)")
    threshold: str | None = Field(None, description="default threshold: a name such as fpr_0.01 or a rate")
    max_rows: int = Field(10_000, ge=1, description="rows accepted in one request")
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="request body size limit")
    max_inflight_body_bytes: int = Field(
        64 * 1024 * 1024,
        ge=1024,
        description="bytes of request bodies being read, parsed or scored at once; beyond, 503 at once",
    )
    head_timeout_s: float = Field(
        HEAD_TIMEOUT_S, gt=0, description="a request line and headers must arrive within this (`serve` only)"
    )
    body_timeout_s: float = Field(30.0, gt=0, description="a request body must arrive within this")
    body_min_rate: float = Field(
        16 * 1024, gt=0, description="bytes/s a body must keep up over every window, else 408"
    )
    body_rate_window_s: float = Field(
        2.0, gt=0, description="the window of the body rate; also how long an upload may stall"
    )
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="comma-separated keys for /score and /model; empty = open"
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    backend: Literal["onnx", "torch"] = Field("onnx", description="onnx (CPU, no PyTorch) or torch")
    device: str = Field("auto", description="torch backend: cpu, cuda, or auto (CUDA when present)")
    coalesce: bool = Field(True, description="merge concurrent requests into one scoring batch")
    coalesce_max_rows: int | None = Field(
        None,
        ge=1,
        description="a merged batch is scored once it holds this many rows (default 4096; 65536 for the "
        "torch backend on a CUDA device, whose per-call cost only large batches repay)",
    )
    coalesce_wait_ms: float = Field(2.0, ge=0, description="or once its first request has waited this long")
    max_queue: int = Field(64, ge=1, description="scoring requests admitted at once; beyond, 503 at once")
    scoring_concurrency: int = Field(2, ge=1, description="scoring calls running at once")
    inline_rows: int = Field(
        16,
        ge=0,
        description="onnx backend: scoring calls of at most this many rows of a closed-form method "
        "(a single model's or an ensemble's) run on the event loop; 0: always in a thread",
    )
    onnx_threads: int = Field(
        1,
        ge=0,
        description="onnx backend: cores one scoring call may use (0: every core); calls run in parallel",
    )
    request_timeout_s: float = Field(30.0, gt=0, description="a scoring request taking longer gets a 503")
    trusted_keys: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="comma-separated public key files (PEM, Ed25519); when set, only bundles signed "
        "by one of them are loaded or reloaded",
    )
    admin_key: str | None = Field(None, description="key for /admin routes; unset = admin routes disabled")
    model_root: Path | None = Field(
        None, description="bundles an admin may load lie here (default: model_path's parent)"
    )
    drain_s: float = Field(
        2.0, ge=0, description="on SIGTERM, /readyz answers 503 and requests are served this long"
    )
    shutdown_grace_s: float = Field(30.0, ge=0, description="on SIGTERM, in-flight requests get this long")
    warmup_rows: int = Field(256, ge=1, description="rows scored before /readyz turns 200")
    load_timeout_s: float = Field(
        120.0, gt=0, description="a load or reload (checks and warm-up) taking longer is abandoned"
    )

    @model_validator(mode="after")
    def _budget_holds_a_body(self) -> Settings:
        if self.max_inflight_body_bytes < self.max_body_bytes:
            raise ValueError(
                f"max_inflight_body_bytes ({self.max_inflight_body_bytes}) is below max_body_bytes "
                f"({self.max_body_bytes}): a body of the largest allowed size could never be read"
            )
        return self

    @field_validator("api_keys", "trusted_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return [k.strip() for k in value.split(",") if k.strip()]
        return value

    @field_validator("api_keys", "admin_key")
    @classmethod
    def _header_safe(cls, value: list[str] | str | None) -> list[str] | str | None:
        # A key travels in a header, which HTTP reads as bytes: a key of 'é' matches only a client
        # that sends it Latin-1 encoded, and never one that sends UTF-8. Refused at start instead.
        keys = [value] if isinstance(value, str) else value or []
        bad = [k for k in keys if not (k.isascii() and k.isprintable() and " " not in k)]
        if bad:
            raise ValueError(f"{len(bad)} key(s) hold characters other than printable ASCII without spaces")
        return value
