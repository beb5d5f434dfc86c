"""The model host: what a bundle whose graphs cover only some methods can and cannot serve, and loads
that do not finish in time."""

import json
import shutil
import threading
import time

import pytest

from app.bundle.format import MANIFEST, content_version
from app.engine.errors import InvalidInput, LoadTimedOut, NotReady
from app.engine.events import NoEvents
from app.engine.host import MAX_ABANDONED, HostOptions, ModelHost


@pytest.fixture()
def without_projected_graph(tiny_bundle, tmp_path):
    """The tiny bundle with the projected graph left out of the manifest (graphs are optional)."""
    target = tmp_path / "partial"
    shutil.copytree(tiny_bundle, target)
    manifest = json.loads((target / MANIFEST).read_text())
    file = manifest["onnx"].pop("projected")
    del manifest["files"][file]
    (target / file).unlink()
    manifest["version"] = content_version(manifest)
    (target / MANIFEST).write_text(json.dumps(manifest))
    return target


def test_a_method_without_a_graph_is_refused_with_the_methods_that_have_one(without_projected_graph):
    served = ModelHost(HostOptions(without_projected_graph, warmup_rows=4)).prepare(without_projected_graph)
    assert "projected" not in served.scorer.methods
    assert served.resolve_method("latent") == "latent" and served.resolve_method(None) == served.method
    with pytest.raises(InvalidInput, match=r"'projected' cannot be scored here: the onnx backend") as refused:
        served.resolve_method("projected")
    assert refused.value.status == 422 and "projected" not in refused.value.detail["accepted"]


def test_a_default_method_without_a_graph_fails_the_load(without_projected_graph):
    host = ModelHost(HostOptions(without_projected_graph, method="projected", warmup_rows=4))
    host.load()
    assert host.current is None and "default method 'projected' cannot be scored" in host.error


LIMIT_S = 4.0


class SlowHost(ModelHost):
    """prepare() of a path named 'slow' waits on an event the test sets: a load that hangs."""

    def __init__(self, options: HostOptions, events: NoEvents | None = None) -> None:
        super().__init__(options, events)
        self.release = threading.Event()

    def prepare(self, path):
        if path.name == "slow":
            self.release.wait(timeout=60)
        return super().prepare(path)


def test_a_reload_past_its_time_limit_is_abandoned_and_the_old_model_serves_on(tiny_bundle, tmp_path):
    root = tmp_path / "models"
    shutil.copytree(tiny_bundle, root / "current")
    shutil.copytree(tiny_bundle, root / "slow")
    # A limit well above an honest load's time (the first one imports onnx: about a second), so only
    # the load that waits on the test's event runs past it.
    failures = []

    class Recorded(NoEvents):
        def reload_finished(self, succeeded: bool) -> None:
            failures.append(not succeeded)

    host = SlowHost(HostOptions(root / "current", warmup_rows=4, load_timeout_s=LIMIT_S), Recorded())
    host.load()
    old = host.served
    try:
        with pytest.raises(LoadTimedOut, match=rf"did not finish within {LIMIT_S:g} s") as refused:
            host.reload(root / "slow")
        assert refused.value.status == 503
        assert host.served is old and host.model_path == root / "current"
        # The lock is free again: a good reload goes through beside the abandoned one.
        assert host.reload(root / "current").bundle.version == old.bundle.version
        with pytest.raises(LoadTimedOut):
            host.reload_in_background(root / "slow").result(timeout=60)
        # Two abandoned loads still running: a third reload is refused at once, not queued.
        assert len(host.abandoned) == MAX_ABANDONED
        with pytest.raises(LoadTimedOut, match="abandoned loads are still running"):
            host.reload(root / "current")
        # Counted as the failed reload it is (an audit found it neither logged nor counted).
        assert failures == [True, False, True, True]
    finally:
        host.release.set()
    # Once they end, their results are dropped (no swap) and reloads work again.
    deadline = time.monotonic() + 30
    while host.abandoned and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not host.abandoned and host.model_path == root / "current"
    assert host.reload().bundle.version == old.bundle.version


def test_a_first_load_past_its_time_limit_leaves_the_host_unready_and_reloadable(tiny_bundle, tmp_path):
    shutil.copytree(tiny_bundle, tmp_path / "slow")
    host = SlowHost(HostOptions(tmp_path / "slow", warmup_rows=4, load_timeout_s=LIMIT_S))
    try:
        host.load()
        assert host.current is None and f"did not finish within {LIMIT_S:g} s" in host.error
        with pytest.raises(NotReady):
            host.served  # noqa: B018
    finally:
        host.release.set()
    assert host.reload().bundle.name and host.served is not None


class _Cycle:
    """An object in a reference cycle: only the cyclic garbage collector can free it."""

    def __init__(self) -> None:
        self.me = self


def test_the_loaded_heap_is_frozen_and_a_reload_frees_the_old_models_cycles(tiny_bundle):
    import gc
    import weakref

    host = ModelHost(HostOptions(tiny_bundle, warmup_rows=4))
    try:
        host.load()
        # Frozen: a full collection no longer walks what the load left (the tail of the latencies).
        assert gc.get_freeze_count() > 0
        cycle = _Cycle()
        host.current.scorer.kept = cycle  # garbage once the reload drops the served model
        alive = weakref.ref(cycle)
        del cycle
        host.reload()  # freezing the heap again must not freeze the old model's cycles with it
        assert alive() is None
    finally:
        gc.unfreeze()
