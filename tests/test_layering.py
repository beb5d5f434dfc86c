"""The package layering of app/ (docs/architecture.md), checked on the source: every import, lazy
ones inside functions included, points down the layers, no module imports itself through others,
and the serving entry points import no PyTorch when loaded; and, run without torch, the graphs are
built and scored."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

APP = Path(__file__).resolve().parents[1] / "app"
# What each package may import besides itself; cli.py, detector.py (the Python API) and report.py (the
# HTML report, which scores with the engine and reads data with train) sit above everything.
ALLOWED = {
    "model": set(),
    "bundle": {"model"},
    "train": {"model", "bundle"},
    "engine": {"model", "bundle"},
    "api": {"model", "bundle", "engine"},
    # Whole tables, one process or a cluster: the readers of train, the scorers of engine.
    "batch": {"model", "bundle", "engine", "train"},
}
# The optional engines, imported by their own modules only (and by cli.py inside `score --engine`).
ENGINES = {"ray": "app.batch.on_ray", "pyspark": "app.batch.on_spark"}


def module_name(path: Path) -> str:
    parts = path.relative_to(APP.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in APP.rglob("*.py")}


def imports(path: Path, at_import: bool = False) -> set[str]:
    """Modules `path` imports: app modules resolved to the longest existing name, others as written.
    at_import: only the imports that run when the module is loaded (not inside functions, nor under
    `if TYPE_CHECKING:`), the ones a deployment without an optional package would trip over."""
    tree = ast.parse(path.read_text())
    found = set()

    def visit(node: ast.AST) -> None:
        if at_import and isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            return
        if at_import and isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            # "from app.x import y" may import the module app.x.y itself
            found.update({node.module} | {f"{node.module}.{a.name}" for a in node.names})
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {name for name in found if not name.startswith("app") or name in MODULES}


# The package itself and the modules above the layers.
ABOVE = ("app", "app.cli", "app.detector", "app.report")


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m not in ABOVE))
def test_imports_point_down_the_layers(module):
    package = module.split(".")[1]
    allowed = ALLOWED.get(package)
    assert allowed is not None, (
        f"{module}: its package is not in the layering; add it to ALLOWED and the docs"
    )
    for name in imports(MODULES[module]):
        if name.startswith("app.") and name.count(".") >= 1:
            target = name.split(".")[1]
            assert target == package or target in allowed, f"{module} imports {name}: {package} -> {target}"
            assert target != "cli", f"{module} imports the command line"


def test_no_module_imports_itself_through_others():
    graph = {m: {n for n in imports(p) if n.startswith("app.") and n != m} for m, p in MODULES.items()}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                raise AssertionError(" -> ".join([*path[path.index(nxt) :], nxt]))
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for module in graph:
        if module not in state:
            visit(module, [module])


@pytest.mark.parametrize("entry", ["app.api.main", "app.cli", "app.engine.onnx_backend"])
def test_the_serving_entry_points_load_no_torch(entry):
    # What loading the module runs: its parent packages, its imports at load time and theirs.
    seen, todo = set(), [entry]
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        found = imports(MODULES[module], at_import=True)
        assert not any(n == "torch" or n.startswith("torch.") for n in found), f"{module} imports torch"
        parents = [".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)]
        todo += [n for n in [*found, *parents] if n in MODULES]
    assert "app.engine.torch_backend" not in seen and "app" in seen


@pytest.mark.parametrize("module", sorted(MODULES))
def test_only_the_engine_modules_import_ray_or_spark(module):
    loaded = imports(MODULES[module], at_import=True)
    for name in imports(MODULES[module]):
        if name.split(".")[0] in ENGINES:
            assert module == ENGINES[name.split(".")[0]], f"{module} imports {name}"
            assert name not in loaded, f"{module} needs {name} to load"
        if name in ENGINES.values():
            assert module == "app.cli" and name not in loaded, f"{module} imports {name}"


def test_the_report_module_loads_without_its_plotting_packages():
    # The command line imports app.report inside `report` only; still, loading it must not need the
    # `train` extra, so that a missing matplotlib is the command's clear error, not an ImportError.
    found = {name.split(".")[0] for name in imports(MODULES["app.report"], at_import=True)}
    assert not found & {"matplotlib", "sklearn", "pandas", "pyarrow", "torch", "onnxruntime"}, found


# A serving install without torch: the graphs rebuilt (as verification does) and scored.
WITHOUT_TORCH = """
import sys

sys.modules["torch"] = None  # any `import torch` now raises ImportError
import numpy as np

from app.bundle.format import load_bundle
from app.engine.onnx_backend import OnnxScorer
from app.model.methods import METHODS

bundle = load_bundle(sys.argv[1])
scaler = bundle.scaler
for method in METHODS:
    graph = bundle.build_graph(method)  # app.model.onnx_export's emitters, with torch blocked
    assert graph == bundle.graphs[method].read_bytes(), f"{method}: not the graph the bundle was saved with"
scorer = OnnxScorer(bundle)
rows = scaler.mean + np.random.default_rng(0).standard_normal((8, len(bundle.features))) * scaler.scale
for method in METHODS:
    assert np.isfinite(scorer.score(rows, method).score).all(), method
print("ok")
"""


@pytest.fixture(scope="module")
def vmf_bundle(tmp_path_factory):
    """An untrained bundle of the spherical geometry, whose graphs hold the vMF normaliser."""
    import torch

    from app.model.manifold import ManifoldModel
    from app.model.spec import Architecture

    from .conftest import bundle_from, manifold_rows

    torch.manual_seed(0)
    arch = Architecture(input_dim=6, latent_dim=3, hidden=8, geometry="sphere", prior="vmf", components=2)
    model = ManifoldModel(arch)
    model.sigma2, model.sigma2_projected = 0.5, 0.4
    out = tmp_path_factory.mktemp("bundles") / "vmf"
    bundle_from(model, out, manifold_rows(100, seed=0))
    return out


@pytest.mark.parametrize("bundle", ["tiny_bundle", "vmf_bundle"])
def test_graphs_are_built_and_scored_without_torch(bundle, request):
    path = request.getfixturevalue(bundle)
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_TORCH, str(path)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
