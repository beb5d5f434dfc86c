"""`anomaly-scores report`: one HTML file, figures inside, nothing fetched; the figures each case
promises; the AUC it prints against scikit-learn on scores computed apart from it; a real browser
drawing it from a file:// URL with every host unreachable."""

import base64
import re
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from app.bundle.format import load_bundle
from app.cli import main
from app.engine.onnx_backend import OnnxScorer
from app.model.methods import METHODS

from ..browser import dump_dom, needs_chromium, open_browser
from ..conftest import FEATURES, bundle_from, manifold_rows, off_manifold_rows

PNG = b"\x89PNG\r\n\x1a\n"
# The closed-form methods the labelled report compares; the projection is left out as slow.
CLOSED_FORM = [m for m in METHODS if m != "projected"]


class Report(HTMLParser):
    """What the tests read of a report: every attribute naming a resource, the images, the headings
    and the AUC cells."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.resources: list[tuple[str, str, str]] = []  # (tag, attribute, value)
        self.images: list[str] = []
        self.headings: list[str] = []
        self.tags: set[str] = set()
        self.auc: dict[str, float] = {}
        self.ap: dict[str, float] = {}
        self._heading: list[str] | None = None
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        values = {k: v or "" for k, v in attrs}
        for name in ("src", "href", "srcset", "action", "data", "poster"):
            if name in values:
                self.resources.append((tag, name, values[name]))
        if tag == "img":
            self.images.append(values.get("src", ""))
        if tag in ("h1", "h2"):
            self._heading = []
        if values.get("class") in ("auc", "ap"):
            target = self.auc if values["class"] == "auc" else self.ap
            target[values["data-method"]] = float(values["data-value"])

    def handle_data(self, data: str) -> None:
        if self._heading is not None:
            self._heading.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag in ("h1", "h2") and self._heading is not None:
            self.headings.append("".join(self._heading))
            self._heading = None


def check_self_contained(page: Report, text: str) -> None:
    """Every resource is an embedded PNG: no URL, no script, no stylesheet link, no CSS import."""
    assert not re.search(r"https?://", text), re.search(r".{60}https?://.{60}", text)
    assert not {"script", "link", "iframe", "object", "embed"} & page.tags
    assert "url(" not in text and "@import" not in text
    for tag, name, value in page.resources:
        assert (tag, name) == ("img", "src") and value.startswith("data:image/png;base64,"), (tag, name)
    for src in page.images:
        assert base64.b64decode(src.split(",", 1)[1], validate=True).startswith(PNG)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A CSV of normal and off-manifold rows with an id and a 0/1 label column, and its parts."""
    root = tmp_path_factory.mktemp("report")
    rows = np.r_[manifold_rows(60, seed=21), off_manifold_rows(20, seed=22)]
    labels = np.r_[np.zeros(60, dtype=int), np.ones(20, dtype=int)]
    frame = pd.DataFrame(rows, columns=FEATURES)
    frame.insert(0, "id", [f"row-{i:03d}" for i in range(len(rows))])
    frame["label"] = labels
    frame.to_csv(root / "data.csv", index=False)
    return root, rows, labels


def report(*arguments: str | Path) -> tuple[str, Report]:
    out = Path(arguments[arguments.index("--out") + 1])
    assert main(["report", *map(str, arguments)]) == 0
    text = out.read_text()
    page = Report(text)
    check_self_contained(page, text)
    return text, page


def test_a_bundle_alone_shows_its_loss_curve_and_calibration(tiny_bundle, tmp_path, capsys):
    text, page = report(tiny_bundle, "--out", tmp_path / "bundle.html")
    bundle = load_bundle(tiny_bundle)
    assert len(page.images) == 2  # the loss curve, the calibration histogram
    assert page.headings[1:] == ["Model", "Training loss", "Calibration scores and thresholds"]
    assert bundle.version in text and "No data file was given" in text
    for fpr in bundle.fprs:  # each stored threshold in the table, as the bundle computes it
        assert f"{bundle.threshold(bundle.default_method, fpr).value:.6g}" in text
    assert f"{bundle.version} -> {tmp_path / 'bundle.html'}" in capsys.readouterr().err


def test_a_bundle_saved_directly_says_it_has_no_loss_curve(tmp_path):
    import torch

    from app.model.manifold import ManifoldModel
    from app.model.spec import Architecture

    torch.manual_seed(0)
    model = ManifoldModel(Architecture(input_dim=6, latent_dim=2, hidden=8))
    model.sigma2, model.sigma2_projected = 0.5, 0.4
    bundle_from(model, tmp_path / "direct", manifold_rows(100, seed=0))
    text, page = report(tmp_path / "direct", "--out", tmp_path / "direct.html")
    assert len(page.images) == 1  # the calibration histogram only
    assert "No training loss curve is recorded in this bundle: it was saved directly" in text
    assert "the bundle records no training" in text


def test_data_adds_its_scores_parts_flags_and_highest_rows(tiny_bundle, data, tmp_path):
    root, rows, _ = data
    text, page = report(tiny_bundle, root / "data.csv", "--id-column", "id", "--out", tmp_path / "d.html")
    assert len(page.images) == 4  # + the scores against calibration, the parts
    assert "ROC and precision-recall" not in page.headings and not page.auc
    bundle = load_bundle(tiny_bundle)
    scores = OnnxScorer(bundle).score(rows).score  # apart from the report's own scoring
    for fpr in bundle.fprs:
        flagged = int((scores > bundle.threshold(bundle.default_method, fpr).value).sum())
        cells = rf"<td class='num'>{fpr:g}</td><td class='num'>[^<]+</td><td class='num'>{flagged}<"
        assert re.search(cells, text), (fpr, flagged)
    top = int(np.argmax(scores))
    assert f"<td class='num'>{top + 1}</td><td>row-{top:03d}</td>" in text  # its file row and id


def test_labels_add_roc_and_precision_recall_with_sklearns_auc(tiny_bundle, data, tmp_path):
    root, rows, labels = data
    out = tmp_path / "labelled.html"
    text, page = report(tiny_bundle, root / "data.csv", "--label-column", "label", "--out", out)
    assert len(page.images) == 6  # + ROC, precision-recall
    assert page.headings[-1] == "ROC and precision-recall"
    assert list(page.auc) == CLOSED_FORM  # the default (likelihood) first, no projection
    scorer = OnnxScorer(load_bundle(tiny_bundle))
    for method in CLOSED_FORM:
        scores = scorer.score(rows, method).score
        auc = roc_auc_score(labels, scores)
        assert page.auc[method] == pytest.approx(auc, rel=1e-12, abs=1e-12)
        assert f"data-value='{page.auc[method]!r}'>{auc:.4f}<" in text  # the printed figure
        assert page.ap[method] == pytest.approx(average_precision_score(labels, scores), abs=1e-12)


def test_labels_stay_with_their_rows_when_rows_are_skipped(tiny_bundle, data, tmp_path):
    root, rows, labels = data
    frame = pd.read_csv(root / "data.csv")
    frame.loc[[3, 65], "f2"] = np.nan  # one normal and one anomalous row left out
    frame.to_csv(tmp_path / "gaps.csv", index=False)
    args = [tiny_bundle, tmp_path / "gaps.csv", "--label-column", "label", "--out", tmp_path / "g.html"]
    assert main(["report", *map(str, args)]) == 2  # missing values stop it by default
    text, page = report(*args, "--missing", "skip")
    keep = np.ones(len(rows), dtype=bool)
    keep[[3, 65]] = False
    scores = OnnxScorer(load_bundle(tiny_bundle)).score(rows[keep]).score
    assert page.auc["likelihood"] == pytest.approx(roc_auc_score(labels[keep], scores), abs=1e-12)
    assert "78 rows scored" in text


def test_one_class_of_labels_is_said_not_drawn(tiny_bundle, data, tmp_path):
    root, _, _ = data
    frame = pd.read_csv(root / "data.csv")
    frame["label"] = 0
    frame.to_csv(tmp_path / "normal.csv", index=False)
    text, page = report(
        tiny_bundle, tmp_path / "normal.csv", "--label-column", "label", "--out", tmp_path / "n.html"
    )
    assert len(page.images) == 4 and not page.auc
    assert "The labels hold only one class (0 of 80 rows labelled 1)" in text


def test_refusals_exit_2_with_a_clear_message(tiny_bundle, data, tmp_path, capsys):
    root, rows, _ = data
    np.save(tmp_path / "rows.npy", rows)
    out = ["--out", str(tmp_path / "r.html")]
    cases = [
        ([str(root / "data.csv"), "--label-column", "nope", *out], "no label column 'nope'; the columns are"),
        ([str(root / "data.csv"), "--label-column", "f0", *out], "label column 'f0' must be 0/1"),
        ([str(tmp_path / "rows.npy"), "--label-column", "label", *out], "has no column names"),
        ([str(root / "data.csv"), "--id-column", "nope", *out], "no column 'nope'"),
        (["--label-column", "label", *out], "describe DATA: give a data file too"),
        (["--out", str(tmp_path / "r.txt")], "--out must end in .html"),
    ]
    for arguments, message in cases:
        assert main(["report", str(tiny_bundle), *arguments]) == 2, arguments
        assert message in capsys.readouterr().err, arguments
    assert not (tmp_path / "r.html").exists()


@pytest.fixture(scope="module")
def labelled_report(tiny_bundle, data, tmp_path_factory):
    root, _, _ = data
    out = tmp_path_factory.mktemp("browser") / "report.html"
    report(tiny_bundle, root / "data.csv", "--label-column", "label", "--id-column", "id", "--out", out)
    return out


HEADINGS = [
    "Model",
    "Training loss",
    "Calibration scores and thresholds",
    "Scores of data.csv",
    "Rows flagged at each threshold",
    "Score parts",
    "Highest scores",
    "ROC and precision-recall",
]


@needs_chromium
def test_chromium_renders_the_report_from_a_file(labelled_report, tmp_path):
    dom = Report(dump_dom(labelled_report.as_uri(), tmp_path / "profile"))
    assert dom.headings[1:] == HEADINGS
    assert len(dom.images) == 6 and all(src.startswith("data:image/png;base64,") for src in dom.images)


@needs_chromium
def test_chromium_decodes_every_figure_offline(labelled_report, tmp_path):
    """The images are not only in the DOM: each one decoded to a picture of the size it was drawn."""
    with open_browser(tmp_path) as browser:
        browser.call("Page.navigate", url=labelled_report.as_uri())
        browser.wait_for("document.readyState === 'complete'")
        # decode() rejects for an image that cannot be drawn: the evaluation then fails.
        result = browser.call(
            "Runtime.evaluate",
            expression="Promise.all([...document.images].map(async i => "
            "{ await i.decode(); return [i.complete, i.naturalWidth, i.naturalHeight]; }))",
            returnByValue=True,
            awaitPromise=True,
        )
    assert "exceptionDetails" not in result, result
    sizes = result["result"]["value"]
    assert isinstance(sizes, list) and len(sizes) == 6
    for complete, width, height in sizes:
        assert complete and width >= 600 and height >= 250, sizes


def test_without_matplotlib_the_error_names_the_extra(tiny_bundle, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now fails, as uninstalled
    assert main(["report", str(tiny_bundle), "--out", str(tmp_path / "r.html")]) == 2
    assert "needs the package 'matplotlib': pip install 'anomaly-scores[train]'" in capsys.readouterr().err
