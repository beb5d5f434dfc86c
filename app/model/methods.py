"""The score methods, the parts every method reports and what every path accepts to score: defined
here once, imported everywhere.

Torch-free, so the serving path, the bundle format and the command line can name methods without
PyTorch. The mathematics of each method is in app.model.scores, its graph in app.model.onnx_export.
"""

from __future__ import annotations

import re
import reprlib

METHODS = ("likelihood", "encoder", "reconstruction", "latent", "projected")
# log p(x) = log_prior + log_volume + log_residual: what each method reports about a row
PARTS = ("log_prior", "log_volume", "log_residual")
# What a scoring backend returns per row: the total, its parts, |x - x'|^2 and the residual (d,)
OUTPUTS = ("log_prob", *PARTS, "reconstruction_error", "residual")
# Methods the product computes in float64 throughout, networks included. The projection decides
# when to stop by comparing objectives and step lengths, which float32 networks would blur at 1e-7,
# and differently on every CPU; the closed-form methods are well conditioned in float32.
FLOAT64_METHODS = ("projected",)
# The largest magnitude of a raw value the product scores or trains on, on every path (the service,
# the command line, the batch engines). Larger ones are no measurement; squared in float32 they would
# overflow to inf.
MAX_ABS_VALUE = 1e15
_ADDRESS = re.compile(r" (object )?at 0x[0-9a-fA-F]+")


def npy_problem(error: Exception) -> str:
    """numpy's reason for refusing a .npy file or body, as a user may read it: numpy's message may
    quote a parsed header's node ("<ast.BinOp object at 0x7f...>"), an address of this process."""
    return _ADDRESS.sub("", str(error))


class UnknownMethod(ValueError):
    """A score method that does not exist; the message lists the ones that do."""

    def __init__(self, method: object) -> None:
        # reprlib: the name comes from a client and may be megabytes long
        super().__init__(f"unknown score method {reprlib.repr(method)}; choose one of {list(METHODS)}")
        self.method = method
        self.accepted = list(METHODS)


def check_method(method: str) -> str:
    """`method` if it names a score method, else UnknownMethod."""
    if method not in METHODS:
        raise UnknownMethod(method)
    return method
