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
    device: str = Field("cpu", description="cpu, cuda, or auto")
    warmup_rows: int = Field(256, ge=1, description="rows scored before /readyz turns 200")

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return [k.strip() for k in value.split(",") if k.strip()]
        return value
