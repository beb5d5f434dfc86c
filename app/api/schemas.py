"""OpenAPI documentation of the request and response bodies.

These models document the API; the request itself is parsed by `app.api.parsing` without
per-number validation, so a 1000-row batch is not 30 000 pydantic calls.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.model.methods import METHODS

Method = Literal[METHODS]  # type: ignore[valid-type]


class ScoreRequest(BaseModel):
    # min_length on each list, not on the union: on a union pydantic writes minLength, a string
    # keyword that no validator applies to an array.
    instances: (
        Annotated[list[list[float]], Field(min_length=1)]
        | Annotated[list[dict[str, float]], Field(min_length=1)]
    ) = Field(
        ...,
        description="rows in the model's column order (GET /model: columns), or objects keyed by column name",
    )
    method: Method | None = Field(None, description="score method; default: the service's")
    threshold: str | float | None = Field(
        None,
        description="a false-positive rate, as a number (0.05) or a name (fpr_0.05): any rate from 1/n "
        "(n calibration scores) and below 1; the threshold is derived from the stored calibration scores",
    )
    components: bool = Field(
        False,
        description="add log_prior, log_volume, log_residual, reconstruction_error (an ensemble's: the "
        "members' means), and for an ensemble member_scores, each member's score per row (their mean is "
        "the row's score)",
    )
    explain: bool = Field(
        False,
        description="add each feature's share of the residual term: (x_j - x'_j)^2 / w_j over their sum, "
        "w_j its relative noise variance",
    )
    ids: list[str | int] | None = Field(
        None, description="one identifier per row, echoed as the answer's ids (not scored, not logged)"
    )
    id_key: str | None = Field(
        None, description="rows as objects: this key of every row is its identifier, echoed as ids"
    )


class ReloadRequest(BaseModel):
    # An admin's misspelt field ("paht") must not reload the current path instead.
    model_config = ConfigDict(extra="forbid")

    path: str | None = Field(
        None, description="bundle directory relative to the model root; default: reload the current path"
    )


class ModelRef(BaseModel):
    name: str
    version: str


class ThresholdInfo(BaseModel):
    name: str
    fpr: float
    value: float


class Explanation(BaseModel):
    features: list[str]
    residual_share: list[list[float]] = Field(..., description="per row, each feature's share; rows sum to 1")


# A score or log-density is null where float arithmetic overflowed (infinite or NaN; JSON has
# neither): only on a row far outside the data, which is then flagged with p-value 1/(n + 1).
Value = float | None


class ScoreResponse(BaseModel):
    model: ModelRef
    method: str
    threshold: ThresholdInfo
    scores: list[Value] = Field(
        ..., description="-log p(x): higher = more anomalous; null where the arithmetic overflowed"
    )
    is_anomaly: list[bool] = Field(
        ...,
        description="score > threshold.value, i.e. p_value <= threshold.fpr (a score that overflowed on a "
        "row far outside the data, null here, counts as above every threshold)",
    )
    p_values: list[float] = Field(..., description="(1 + #calibration scores >= score) / (n + 1)")
    log_likelihood: list[Value]
    log_prior: list[Value] | None = None
    log_volume: list[Value] | None = None
    log_residual: list[Value] | None = None
    reconstruction_error: list[Value] | None = None
    member_scores: list[list[Value]] | None = Field(
        None, description="an ensemble's, with components: per row, each member's score (their mean: score)"
    )
    constant_mismatch: list[list[str]] | None = Field(
        None,
        description="only for a model with constant columns (GET /model: constants): per row, those whose "
        "value differs from training; such a row is flagged with p-value 0",
    )
    ids: list[str | int] | None = Field(None, description="the request's ids or id_key values, in row order")
    explain: Explanation | None = None


class ErrorResponse(BaseModel):
    error: str
    detail: Any = None


# The Open Inference Protocol's documents (kserve/open-inference-protocol, inference_rest.md), for
# the OpenAPI description of /v2; app.api.inference_protocol parses and writes them.
V2Parameters = dict[str, bool | int | float | str]


class V2Error(BaseModel):
    model_config = ConfigDict(extra="forbid")
    error: str


class V2ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class V2Live(BaseModel):
    live: bool


class V2Ready(BaseModel):
    ready: bool


class V2ModelReady(BaseModel):
    name: str
    ready: bool


class V2TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(..., description="-1: any size")


class V2ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[V2TensorMetadata]
    outputs: list[V2TensorMetadata]


class V2RequestInput(BaseModel):
    name: Literal["x"]
    shape: list[int] = Field(..., min_length=2, max_length=2, description="[rows, features]")
    datatype: Literal["FP32", "FP64"]
    parameters: V2Parameters | None = Field(None, description="binary_data_size with the binary extension")
    data: list[float] | list[list[float]] | None = Field(None, description="row-major, flat or nested")


class V2RequestOutput(BaseModel):
    name: Literal[
        "score",
        "is_anomaly",
        "p_value",
        "log_likelihood",
        "log_prior",
        "log_volume",
        "log_residual",
        "reconstruction_error",
        "constant_mismatch",
    ]
    parameters: V2Parameters | None = Field(None, description="binary_data: true for binary data")


class V2InferRequest(BaseModel):
    id: str | None = None
    model_name: str | None = Field(None, description="if sent (KServe's client does), the path's name")
    parameters: V2Parameters | None = Field(None, description="method, threshold, binary_data_output")
    inputs: list[V2RequestInput] = Field(..., min_length=1, max_length=1)
    outputs: list[V2RequestOutput] | None = None


class V2ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: Literal["FP64", "BOOL"]
    parameters: V2Parameters | None = None
    data: list[float] | list[bool] | None = None


class V2InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    parameters: V2Parameters
    outputs: list[V2ResponseOutput]


REQUEST_EXAMPLES: dict[str, dict[str, Any]] = {
    "rows": {
        "summary": "rows in feature order",
        "value": {"instances": [[14.2, 19.1, 92.0], [25.0, 30.1, 170.2]]},
    },
    "named": {
        "summary": "rows by feature name, with components and a stricter threshold",
        "value": {
            "instances": [{"mean_radius": 14.2, "mean_texture": 19.1, "mean_perimeter": 92.0}],
            "threshold": "fpr_0.01",
            "components": True,
        },
    },
}

RESPONSE_EXAMPLE: dict[str, Any] = {
    "model": {"name": "breast-cancer-demo", "version": "a025d92eaa0d2583"},
    "method": "likelihood",
    "threshold": {"name": "fpr_0.1", "fpr": 0.1, "value": 154.7},
    "scores": [33.1, 504.2],
    "is_anomaly": [False, True],
    "p_values": [0.667, 0.038],
    "log_likelihood": [-33.1, -504.2],
}
