"""The onnxruntime backend: the bundle's fused ONNX graphs on CPU, without PyTorch; an ensemble's
members merged into one graph per method, which also combines their scores."""

from __future__ import annotations

import os
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort
from numpy.typing import NDArray

from app.bundle.format import Bundle, BundleError, EnsembleBundle, members_of
from app.bundle.graphs import MergedGraph, merged_graphs
from app.engine.errors import ScoringFailed
from app.engine.scorer import (
    MEMBER_ROWS,
    ScoreOutput,
    assemble_combined,
    assemble_members,
    method_or_default,
)

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
    # Errors only: the optimiser's notes on the exporter's unused constants (coloured, on stderr, at
    # every load) said nothing a user could act on; failures still raise.
    options.log_severity_level = 3
    return options


def available_cores() -> int:
    """Cores this process may run on (its affinity mask, narrowed by a cpuset), not the host's count."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@dataclass(frozen=True)
class _Layout:
    """What a session's calls fetch, and how they are cut into blocks."""

    block_rows: int | None  # at most this many rows per call; None: no limit
    # The session outputs to fetch without and with `explain`: a (rows, d) residual is most of what
    # a call copies out, and only an explanation reads it.
    outputs: dict[bool, tuple[str, ...]]


def _layout(graph: MergedGraph) -> _Layout:
    block_rows = max(MIN_BLOCK_ROWS, MEMBER_ROWS // graph.stack) if graph.stack > 1 else None
    unexplained = tuple(name for name in graph.outputs if name != "residual")
    return _Layout(block_rows, {True: graph.outputs, False: unexplained})


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
        graphs = merged_graphs(bundle)
        self.sessions = {
            method: ort.InferenceSession(graph.data, options, providers=["CPUExecutionProvider"])
            for method, graph in graphs.items()
        }
        self.methods = tuple(self.sessions)
        self._layouts = {session: _layout(graphs[method]) for method, session in self.sessions.items()}
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
            results = self._run(session, x, explain)
        except Exception as e:  # onnxruntime's errors (Fail, InvalidArgument, ...) derive from Exception only
            raise ScoringFailed(
                f"onnxruntime failed on the graph of {method!r}: {type(e).__name__}: {e}", {"method": method}
            ) from e
        if isinstance(self.bundle, EnsembleBundle):  # the graph has combined the members
            return assemble_combined(self.bundle, method, fpr, results, explain, x.shape[0], mismatch)
        return assemble_members(self.bundle, method, fpr, [results], explain, x.shape[0], mismatch)

    def _run(
        self, session: ort.InferenceSession, x: NDArray[np.float64], explain: bool
    ) -> dict[str, NDArray[np.floating]]:
        layout, rows = self._layouts[session], x.shape[0]
        names = layout.outputs[explain]
        blocks = min(self.threads, rows // MIN_BLOCK_ROWS)
        if layout.block_rows is not None:
            blocks = max(blocks, -(-rows // layout.block_rows))
        if blocks <= 1:
            return dict(zip(names, session.run(names, {"x": x}), strict=True))
        chunks = np.array_split(x, blocks)
        lanes = min(self.threads, blocks)

        def lane(first: int) -> list[list[NDArray[np.floating]]]:
            return [session.run(names, {"x": chunk}) for chunk in chunks[first::lanes]]

        pending = [self._executor().submit(lane, first) for first in range(1, lanes)]
        # This thread scores the first lane itself rather than wait idle.
        done = [lane(0)] + [p.result() for p in pending]
        parts = [done[i % lanes][i // lanes] for i in range(blocks)]
        columns = zip(*parts, strict=True)
        return {name: np.concatenate(column) for name, column in zip(names, columns, strict=True)}

    def _executor(self) -> ThreadPoolExecutor:
        with self._pool_lock:  # two first calls at once must not each make a pool
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.threads - 1, thread_name_prefix="onnx-block")
                # A reloaded model's scorer is dropped: its threads must not outlive it.
                weakref.finalize(self, self._pool.shutdown, wait=False)
            return self._pool
