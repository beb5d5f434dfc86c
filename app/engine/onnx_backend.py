"""The onnxruntime backend: the bundle's fused ONNX graphs on CPU, without PyTorch."""

from __future__ import annotations

import os
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnxruntime as ort
from numpy.typing import NDArray

from app.bundle.format import Bundle, BundleError
from app.engine.scorer import ScoreOutput, assemble, method_or_default
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
        graphs = bundle.graphs
        if not graphs:
            raise BundleError(
                f"{bundle.path}: the bundle has no ONNX graphs; re-save it or use the torch backend"
            )
        options = _session_options()
        self.sessions = {
            method: ort.InferenceSession(path.read_bytes(), options, providers=["CPUExecutionProvider"])
            for method, path in graphs.items()
        }
        for method, session in self.sessions.items():  # read by name below: all of them, no others
            names = sorted(o.name for o in session.get_outputs())
            if names != sorted(OUTPUTS):
                wanted = sorted(OUTPUTS)
                raise BundleError(
                    f"{graphs[method]}: the graph's outputs are {names}; a scoring graph has {wanted}"
                )
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
        results = self._run(session, np.ascontiguousarray(x_raw, dtype=np.float64))
        names = [o.name for o in session.get_outputs()]
        return assemble(self.bundle, method, fpr, dict(zip(names, results, strict=True)), explain)

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
