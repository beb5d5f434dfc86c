"""The model host: what a bundle whose graphs cover only some methods can and cannot serve."""

import json
import shutil

import pytest

from app.bundle.format import MANIFEST, content_version
from app.engine.errors import InvalidInput
from app.engine.host import HostOptions, ModelHost


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
