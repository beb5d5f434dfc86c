"""docs/bundle.md suffices to re-implement scoring: a reader written from it alone (numpy, scipy, json,
hashlib, safetensors; nothing from app) agrees with the product. app only trains and is compared against.
"""

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from scipy.special import expit, ive, logsumexp

from app.bundle import METHODS, load_bundle
from app.pipeline import TrainRequest, train_bundle
from app.scores import score
from app.torch_scorer import TorchScorer
from app.train import Candidate, FitOptions

ROOT = Path(__file__).resolve().parents[2]
LOG_2PI = np.log(2 * np.pi)
REQUIRED = ["schema_version", "name", "version", "features", "scaler", "architecture", "noise"]
REQUIRED += ["default_method", "default_fpr", "calibration", "files"]
# The product computes in float32, the reference in float64: log densities of magnitude up to a few
# hundred agree to rtol 1e-4 plus atol 1e-3; the iterative projection only to its convergence.
TOL = {"rtol": 1e-4, "atol": 1e-3}


def read_bundle(path):
    """The loading checks of docs/bundle.md, section 'Loading a bundle'."""
    root = Path(path)
    manifest = json.loads((root / "bundle.json").read_text())
    assert manifest["schema_version"] == 1
    assert all(key in manifest for key in REQUIRED)
    assert version_of(manifest) == manifest["version"]
    assert {"weights.safetensors", "calibration.safetensors"} <= set(manifest["files"])
    for name, entry in manifest["files"].items():
        data = (root / name).read_bytes()
        assert len(data) == entry["bytes"] and hashlib.sha256(data).hexdigest() == entry["sha256"]
    w = {k: v.astype(np.float64) for k, v in load_file(root / "weights.safetensors").items()}
    cal = load_file(root / "calibration.safetensors")
    shapes = weight_shapes(manifest["architecture"])
    assert {k: w[k].shape for k in shapes} == shapes
    assert all(k in shapes or k.startswith("derived.") for k in w)
    d, scaler = manifest["architecture"]["input_dim"], manifest["scaler"]
    assert len(manifest["features"]) == len(scaler["mean"]) == len(scaler["scale"]) == d
    assert manifest["default_method"] in cal
    assert all(v.dtype == np.float64 and np.all(np.diff(v) >= 0) for v in cal.values())
    return manifest, w, cal


def version_of(manifest):
    content = {k: v for k, v in manifest.items() if k not in ("version", "created", "build")}
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def weight_shapes(a):
    shapes, d, k = {}, a["input_dim"], a["latent_dim"]
    for net, n_in, n_out in (("encoder", d, k), ("decoder", k, d)):
        sizes = [n_in] + [a["hidden"]] * a["depth"] + [n_out]
        for i in range(a["depth"] + 1):
            shapes[f"{net}.net.layers.{i}.weight"] = (sizes[i + 1], sizes[i])
            shapes[f"{net}.net.layers.{i}.bias"] = (sizes[i + 1],)
    K = a["components"]
    extra = {"vamp": {"prior.log_scales": (K, k)}, "vmf": {"prior.kappa_raw": (K,)}, "normal": {}}
    if a["prior"] != "normal":
        shapes["prior.pseudo_inputs"] = (K, d)
    return shapes | extra[a["prior"]]


ACTIVATIONS = {  # name -> h -> (a(h), a'(h))
    "swish": lambda h: (h * expit(h), expit(h) * (1 + h * (1 - expit(h)))),
    "tanh": lambda h: (np.tanh(h), 1 - np.tanh(h) ** 2),
    "relu": lambda h: (np.maximum(h, 0), (h > 0) * 1.0),
    "softplus": lambda h: (np.logaddexp(0, h), expit(h)),
    "linear": lambda h: (h, np.ones_like(h)),
}


class Reference:
    def __init__(self, path):
        self.manifest, self.w, self.cal = read_bundle(path)
        self.a = self.manifest["architecture"]
        self.sphere = self.a["geometry"] == "sphere"
        self.noise = self.manifest["noise"]

    def mlp(self, net, x):
        """(B, n_in) -> value (B, n_out) and Jacobian (B, n_out, n_in), by forward mode."""
        J = np.broadcast_to(np.eye(x.shape[1]), (len(x), x.shape[1], x.shape[1]))
        for i in range(self.a["depth"] + 1):
            if i > 0:
                x, slope = ACTIVATIONS[self.a["activation"]](x)
                J = slope[:, :, None] * J
            W, b = self.w[f"{net}.net.layers.{i}.weight"], self.w[f"{net}.net.layers.{i}.bias"]
            x, J = x @ W.T + b, W @ J
        return x, J

    def encode(self, x):
        v, J = self.mlp("encoder", x)
        if not self.sphere:
            return v, J
        norm = np.linalg.norm(v, axis=1)[:, None]
        z = v / norm
        return z, (J - z[:, :, None] * (z[:, None, :] @ J)) / norm[:, :, None]

    def basis(self, z):
        """Any orthonormal basis of z's orthogonal complement (here QR, not the product's Householder)."""
        return np.linalg.qr(z[:, :, None], mode="complete")[0][:, :, 1:]

    def log_prior(self, z):
        k = self.a["latent_dim"]
        if self.a["prior"] == "normal":
            return -0.5 * (z * z).sum(1) - 0.5 * k * LOG_2PI
        mu = self.encode(self.w["prior.pseudo_inputs"])[0]
        np.testing.assert_allclose(mu, self.w["derived.prior.locations"], rtol=1e-4, atol=1e-5)
        if self.a["prior"] == "vamp":
            s = np.exp(self.w["prior.log_scales"])
            np.testing.assert_allclose(s, self.w["derived.prior.scales"], rtol=1e-6)
            u = (z[:, None, :] - mu[None]) / s[None]
            comp = -0.5 * (u * u).sum(-1) - np.log(s).sum(-1) - 0.5 * k * LOG_2PI
        else:
            kappa = np.logaddexp(0, self.w["prior.kappa_raw"])
            np.testing.assert_allclose(kappa, self.w["derived.prior.kappa"], rtol=1e-6)
            v = k / 2 - 1
            log_c = v * np.log(kappa) - k / 2 * LOG_2PI - (np.log(ive(v, kappa)) + kappa)
            comp = log_c + kappa * (z @ mu.T)
        return logsumexp(comp, axis=1) - np.log(len(mu))

    def gauss(self, e, sigma2, dims):
        return -0.5 * (e * e).sum(1) / sigma2 - 0.5 * dims * (LOG_2PI + np.log(sigma2))

    def log_sv(self, J=None, s=None):  # sum of log singular values, each floored at 1e-12
        s = np.linalg.svd(J, compute_uv=False) if s is None else s
        return np.log(np.maximum(s, 1e-12)).sum(1)

    def decoder_in_tangent(self, z):
        x_hat, J = self.mlp("decoder", z)
        return x_hat, (J @ self.basis(z) if self.sphere else J)

    def score(self, x_raw, method):
        """(log_prior, log_volume, log_residual) of the standardised rows."""
        s = self.manifest["scaler"]
        x = (np.asarray(x_raw, dtype=np.float64) - s["mean"]) / s["scale"]
        d, z = x.shape[1], self.encode(x)[0]
        zero = np.zeros(len(x))
        if method == "latent":
            return self.log_prior(z), zero, zero
        x_hat, J = self.decoder_in_tangent(z)
        residual = self.gauss(x - x_hat, self.noise["sigma2"], d)
        if method == "reconstruction":
            return zero, zero, residual
        if method == "likelihood":
            return self.log_prior(z), -self.log_sv(J), residual
        if method == "encoder":
            z2, Jg = self.encode(x_hat)
            Jg = self.basis(z2).transpose(0, 2, 1) @ Jg if self.sphere else Jg
            return self.log_prior(z2), self.log_sv(Jg), residual
        return self.projected(x, z)

    def projected(self, x, z):
        """The documented Levenberg-Marquardt projection, then the normal-direction residual."""

        def linearise(z):
            x_hat, J = self.decoder_in_tangent(z)
            return (x_hat, *np.linalg.svd(J, full_matrices=False))

        x_hat, U, s, Vh = linearise(z)
        err = ((x - x_hat) ** 2).sum(1)
        jtj_diagonal = np.einsum("bmn,bm->bn", Vh**2, s**2)  # diag(V S^2 V^T) = diag(J^T J)
        damping = 1e-3 * jtj_diagonal.max(1, keepdims=True)
        for _ in range(30):
            coef = np.einsum("bdm,bd->bm", U, x - x_hat) * s / (s * s + damping)
            step = np.einsum("bmn,bm->bn", Vh, coef)
            step = np.einsum("bkm,bm->bk", self.basis(z), step) if self.sphere else step
            if np.all(np.linalg.norm(step, axis=1) <= 1e-7 * (1 + np.linalg.norm(z, axis=1))):
                break
            z_new = z + step
            z_new = z_new / np.linalg.norm(z_new, axis=1)[:, None] if self.sphere else z_new
            err_new = ((x - self.mlp("decoder", z_new)[0]) ** 2).sum(1)
            better = err_new < err
            z, err = np.where(better[:, None], z_new, z), np.where(better, err_new, err)
            damping = np.where(better[:, None], damping * 0.1, damping * 10.0)
            x_hat, U, s, Vh = linearise(z)
        e = x - x_hat
        e_normal = e - np.einsum("bdm,bm->bd", U, np.einsum("bdm,bd->bm", U, e))
        log_residual = self.gauss(e_normal, self.noise["sigma2_normal"], x.shape[1] - s.shape[1])
        return self.log_prior(z), -self.log_sv(s=s), log_residual


def holdout_rows():
    with (ROOT / "data" / "breast-cancer-holdout.csv").open() as f:
        rows = list(csv.reader(f))
    keep = [i for i, name in enumerate(rows[0]) if name != "malignant"]
    return [rows[0][i] for i in keep], np.array([[float(r[i]) for i in keep] for r in rows[1:]])


def synthetic_rows(n, seed):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, 2))
    x = np.c_[z, z[:, 0] * z[:, 1], np.sin(z[:, 0]), z[:, 1] ** 2, z[:, 0] - z[:, 1]]
    return 5 + 2 * x + 0.05 * rng.standard_normal((n, 6))


@pytest.fixture(scope="module", params=["default", "vmf-sphere", "normal"])
def case(request, tmp_path_factory):
    """(bundle path, raw rows to score)."""
    if request.param == "default":
        features, x = holdout_rows()
        assert features == json.loads((ROOT / "models/default/bundle.json").read_text())["features"]
        return ROOT / "models" / "default", x[:120]
    out, values = tmp_path_factory.mktemp("spec") / request.param, synthetic_rows(300, seed=1)
    features = [f"f{i}" for i in range(6)]
    if request.param == "normal":
        candidate = Candidate(2, 16, 2, "tanh", "euclidean", "normal")
    else:
        candidate = Candidate(3, 16, 2, "softplus", "sphere", "vmf", components=2)
    # 600 steps: a barely trained tanh decoder saturates, and projections of far rows then drift
    # towards |z| -> infinity along its flat asymptote, where no two computations agree.
    train = TrainRequest([candidate], FitOptions(steps=600), fprs=(0.1, 0.05), default_fpr=0.05)
    train_bundle(values, features, train, out)
    return out, np.r_[synthetic_rows(40, seed=2), synthetic_rows(10, seed=3) + 3.0]


@pytest.mark.parametrize("method", METHODS)
def test_documented_scores_match_the_product(case, method):
    path, x = case
    reference = Reference(path).score(x, method)
    bundle = load_bundle(path)
    if method != "projected":
        # The served float32 result; projected is left out because on rows far from a briefly trained
        # manifold the non-convex projection may settle in another local minimum under rounding.
        out = TorchScorer(bundle).score(x, method)
        for got, want in zip((out.log_prior, out.log_volume, out.log_residual), reference, strict=True):
            np.testing.assert_allclose(got, want, **TOL)
        np.testing.assert_allclose(out.score, -sum(reference), **TOL)
    with torch.no_grad():  # the same network in float64: the document is exact, iteration included
        parts = score(
            bundle.build_model().double().generative(), torch.from_numpy(bundle.scaler.transform(x)), method
        )
    for got, want in zip((parts.log_prior, parts.log_volume, parts.log_residual), reference, strict=True):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-7, atol=1e-7)


def test_documented_p_values_and_thresholds_match_the_product(case):
    path, x = case
    manifest, _, cal = read_bundle(path)
    scorer = TorchScorer(load_bundle(path))
    for method, scores in cal.items():
        n, fprs = scores.size, manifest["calibration"]["fprs"]
        assert manifest["calibration"]["rows"][method] == n
        out = scorer.score(x, method, fpr=fprs[0])
        s = np.r_[out.score, scores]  # the calibration scores themselves probe the ties
        p = (1 + (scores[None, :] >= s[:, None]).sum(1)) / (n + 1)
        np.testing.assert_array_equal(out.p_value, p[: len(x)])
        for fpr in fprs:
            threshold = scores[n - int(np.floor(fpr * (n + 1) + 1e-9))]
            assert manifest["thresholds"][method][f"fpr_{fpr:g}"] == {"fpr": fpr, "value": threshold}
            np.testing.assert_array_equal(s > threshold, p <= fpr)
        assert out.threshold.value == manifest["thresholds"][method][f"fpr_{fprs[0]:g}"]["value"]
        np.testing.assert_array_equal(out.is_anomaly, out.score > out.threshold.value)


def test_version_names_the_content(case):
    path, _ = case
    manifest = json.loads((Path(path) / "bundle.json").read_text())
    assert version_of(manifest) == manifest["version"] and len(manifest["version"]) == 16
    assert version_of(manifest | {"created": "2000-01-01T00:00:00+00:00"}) == manifest["version"]
    assert version_of(manifest | {"default_fpr": 0.5}) != manifest["version"]
