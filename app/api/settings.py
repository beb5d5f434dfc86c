"""Every setting of the service, from environment variables (prefix ANOMALY_), in one object.

Read once by `create_app` or the `serve` command, never at import time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ANOMALY_", extra="ignore")

    model_path: Path = Field(Path("models/default"), description="bundle directory to serve")
    method: str | None = Field(None, description="default score method (default: the bundle's)")
    threshold: str | None = Field(None, description="default threshold: a name such as fpr_0.01 or a rate")
    max_rows: int = Field(10_000, ge=1, description="rows accepted in one request")
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="request body size limit")
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="comma-separated keys for /score and /model; empty = open"
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    backend: Literal["onnx", "torch"] = Field("onnx", description="onnx (CPU, no PyTorch) or torch")
    device: str = Field("auto", description="torch backend: cpu, cuda, or auto (CUDA when present)")
    coalesce: bool = Field(False, description="merge concurrent requests into one scoring batch")
    coalesce_max_rows: int = Field(
        4096, ge=1, description="a merged batch is scored once it holds this many rows"
    )
    coalesce_wait_ms: float = Field(2.0, ge=0, description="or once its first request has waited this long")
    max_queue: int = Field(64, ge=1, description="scoring requests admitted at once; beyond, 503 at once")
    scoring_concurrency: int = Field(2, ge=1, description="scoring calls running at once")
    inline_rows: int = Field(
        16, ge=0, description="onnx backend: requests of at most this many rows are scored on the event loop"
    )
    onnx_threads: int = Field(
        1,
        ge=0,
        description="onnx backend: cores one scoring call may use (0: every core); calls run in parallel",
    )
    request_timeout_s: float = Field(30.0, gt=0, description="a scoring request taking longer gets a 503")
    admin_key: str | None = Field(None, description="key for /admin routes; unset = admin routes disabled")
    model_root: Path | None = Field(
        None, description="bundles an admin may load lie here (default: model_path's parent)"
    )
    drain_s: float = Field(
        2.0, ge=0, description="on SIGTERM, /readyz answers 503 and requests are served this long"
    )
    shutdown_grace_s: float = Field(30.0, ge=0, description="on SIGTERM, in-flight requests get this long")
    warmup_rows: int = Field(256, ge=1, description="rows scored before /readyz turns 200")

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return [k.strip() for k in value.split(",") if k.strip()]
        return value
