"""The onnxruntime backend: the bundle's fused ONNX graphs on CPU, without PyTorch; an ensemble's
members merged into one graph per method."""

from __future__ import annotations

import os
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnxruntime as ort
from numpy.typing import NDArray

from app.bundle.format import Bundle, BundleError, EnsembleBundle, members_of
from app.bundle.graphs import MEMBER_OUTPUT, merged_graphs
from app.engine.errors import ScoringFailed
from app.engine.scorer import ScoreOutput, assemble_members, method_or_default
from app.model.methods import OUTPUTS

# Fewer rows than this per block, and a block's fixed cost (a hundred-odd node launches) outweighs
# what a second core saves.
MIN_BLOCK_ROWS = 128


def _session_options() -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    # No spinning: in a server, a waiting thread would burn the cores the event loop needs.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def available_cores() -> int:
    """Cores this process may run on (its affinity mask, narrowed by a cpuset), not the host's count."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


class OnnxScorer:
    """threads: cores one call may use (0: all of them).

    A call of many rows is cut into row blocks, one per core, each run by a single-threaded
    session at the same time (onnxruntime's sessions take concurrent calls). The graph has a
    hundred-odd small nodes, and splitting each node across threads costs a synchronisation per
    node: splitting rows instead scored 1024-row batches about 25% faster on two cores.
    """

    backend = "onnx"

    def __init__(self, bundle: Bundle, threads: int = 0) -> None:
        self.bundle = bundle
        self.threads = threads if threads > 0 else available_cores()
        self.members = members_of(bundle)
        if not all(member.graphs for member in self.members):
            raise BundleError(
                f"{bundle.path}: the bundle has no ONNX graphs; re-save it or use the torch backend"
            )
        # Only graphs shown to be what the exporter builds from the bundle's weights, outputs included;
        # an ensemble's members in one graph, so that one call scores them all.
        options = _session_options()
        self.sessions = {
            method: ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
            for method, graph in merged_graphs(bundle).items()
        }
        self.methods = tuple(self.sessions)
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    def score(
        self,
        x_raw: NDArray[np.floating],
        method: str | None = None,
        fpr: float | None = None,
        explain: bool = False,
    ) -> ScoreOutput:
        method = method_or_default(method, self.bundle)
        session = self.sessions.get(method)
        if session is None:
            raise BundleError(f"{self.bundle.path}: no ONNX graph for {method!r}; use the torch backend")
        x_model, mismatch = self.bundle.split_columns(x_raw)
        x = np.ascontiguousarray(x_model, dtype=np.float64)
        try:
            results = self._run(session, x)
        except Exception as e:  # onnxruntime's errors (Fail, InvalidArgument, ...) derive from Exception only
            raise ScoringFailed(
                f"onnxruntime failed on the graph of {method!r}: {type(e).__name__}: {e}", {"method": method}
            ) from e
        outputs = dict(zip([o.name for o in session.get_outputs()], results, strict=True))
        if not isinstance(self.bundle, EnsembleBundle):
            members = [outputs]
        else:
            members = [
                {name: outputs[MEMBER_OUTPUT.format(index=i, name=name)] for name in OUTPUTS}
                for i in range(len(self.members))
            ]
        return assemble_members(self.bundle, method, fpr, members, explain, x.shape[0], mismatch)

    def _run(self, session: ort.InferenceSession, x: NDArray[np.float64]) -> list[NDArray[np.floating]]:
        blocks = min(self.threads, x.shape[0] // MIN_BLOCK_ROWS)
        if blocks <= 1:
            return session.run(None, {"x": x})
        first, *rest = np.array_split(x, blocks)
        pending = [self._executor().submit(session.run, None, {"x": block}) for block in rest]
        # This thread scores the first block itself rather than wait idle.
        parts = [session.run(None, {"x": first})] + [p.result() for p in pending]
        return [np.concatenate(column) for column in zip(*parts, strict=True)]

    def _executor(self) -> ThreadPoolExecutor:
        with self._pool_lock:  # two first calls at once must not each make a pool
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.threads - 1, thread_name_prefix="onnx-block")
                # A reloaded model's scorer is dropped: its threads must not outlive it.
                weakref.finalize(self, self._pool.shutdown, wait=False)
            return self._pool
