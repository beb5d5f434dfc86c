"""docs/bundle.md suffices to re-implement scoring: a reader written from it alone (numpy, scipy, json,
hashlib, safetensors; nothing from app) agrees with the product. app only trains and is compared against.
"""

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file
from scipy.special import expit, ive, logsumexp

from app.bundle.ensemble import member_scores, term_scores
from app.bundle.format import load_bundle
from app.engine.torch_backend import TorchScorer
from app.model.methods import METHODS
from app.model.spec import Architecture
from app.train.fit import score_rows
from app.train.options import Candidate, FitOptions
from app.train.pipeline import TrainRequest, split_rows, train_bundle

from ..conftest import first_combination
from ..tolerances import FLOAT64_PROJECTION_RTOL, float32_rtol

ROOT = Path(__file__).resolve().parents[2]
LOG_2PI = np.log(2 * np.pi)
REQUIRED = ["schema_version", "name", "version", "features", "scaler", "architecture", "noise"]
REQUIRED += ["default_method", "default_fpr", "calibration", "files"]


def served_rtol(arch: Architecture, method: str) -> float:
    """The served product against this float64 reference, relative to the largest part of each
    score. The closed forms: float32_rtol (tests/tolerances.py), the bound between two float32
    evaluations of the networks. Only the product's side rounds here, but besides its networks it
    evaluates the prior's mixture in float32 (each component's log-density of z, then their
    log-sum-exp), which the bound's count of layers leaves out; the second evaluation's share
    covers it. 1.1e-5..3e-5 for these models; at most 2.3e-6 measured (latent's log_prior).
    projected is float64 in the product: its stopping tolerance."""
    return FLOAT64_PROJECTION_RTOL if method == "projected" else float32_rtol(arch)


def read_bundle(path):
    """The loading checks of docs/bundle.md, section 'Loading a bundle'."""
    root = Path(path)
    manifest = json.loads((root / "bundle.json").read_text())
    # 5 when the noise has one variance per feature (what training writes by default), else 2
    assert manifest["schema_version"] == (5 if "relative_variance" in manifest["noise"] else 2)
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


ACTIVATIONS = {  # name -> h -> (a(h), a'(h), a''(h))
    "swish": lambda h: (
        h * expit(h),
        expit(h) * (1 + h * (1 - expit(h))),
        expit(h) * (1 - expit(h)) * (2 + h * (1 - 2 * expit(h))),
    ),
    "tanh": lambda h: (np.tanh(h), 1 - np.tanh(h) ** 2, -2 * np.tanh(h) * (1 - np.tanh(h) ** 2)),
    "relu": lambda h: (np.maximum(h, 0), (h > 0) * 1.0, np.zeros_like(h)),
    "softplus": lambda h: (np.logaddexp(0, h), expit(h), expit(h) * (1 - expit(h))),
    "linear": lambda h: (h, np.ones_like(h), np.zeros_like(h)),
}


class Reference:
    def __init__(self, path=None, parts=None):
        """A bundle's directory, or (manifest, weights, calibration) of an ensemble's member."""
        self.manifest, self.w, self.cal = read_bundle(path) if parts is None else parts
        self.a = self.manifest["architecture"]
        self.sphere = self.a["geometry"] == "sphere"
        self.noise = self.manifest["noise"]
        # the noise covariance is sigma2 * diag(w); w = 1 without relative variances (section 2.4)
        self.relative = np.asarray(
            self.noise.get("relative_variance", np.ones(self.a["input_dim"])), dtype=np.float64
        )

    def mlp(self, net, x, second=False):
        """(B, n_in) -> value (B, n_out), Jacobian (B, n_out, n_in) and, if asked, the second
        derivatives (B, n_out, n_in, n_in), all by forward mode."""
        n = x.shape[1]
        J = np.broadcast_to(np.eye(n), (len(x), n, n))
        S = np.zeros((len(x), n, n, n)) if second else None
        for i in range(self.a["depth"] + 1):
            if i > 0:
                x, slope, bend = ACTIVATIONS[self.a["activation"]](x)
                if second:
                    S = (
                        bend[:, :, None, None] * J[:, :, :, None] * J[:, :, None, :]
                        + slope[..., None, None] * S
                    )
                J = slope[:, :, None] * J
            W, b = self.w[f"{net}.net.layers.{i}.weight"], self.w[f"{net}.net.layers.{i}.bias"]
            x, J = x @ W.T + b, W @ J
            S = np.einsum("oh,bhij->boij", W, S) if second else None
        return x, J, S

    def encode(self, x):
        v, J, _ = self.mlp("encoder", x)
        if not self.sphere:
            return v, J
        norm = np.linalg.norm(v, axis=1)[:, None]
        z = v / norm
        return z, (J - z[:, :, None] * (z[:, None, :] @ J)) / norm[:, :, None]

    def basis(self, z):
        """Any orthonormal basis of z's orthogonal complement (here QR, not the product's Householder)."""
        return np.linalg.qr(z[:, :, None], mode="complete")[0][:, :, 1:]

    def prior_terms(self, z):
        """log p(z), its gradient (B, k) and Hessian (B, k, k) in R^k (docs section 6.4)."""
        k = self.a["latent_dim"]
        if self.a["prior"] == "normal":
            log_p = -0.5 * (z * z).sum(1) - 0.5 * k * LOG_2PI
            return log_p, -z, np.broadcast_to(-np.eye(k), (len(z), k, k))
        mu = self.encode(self.w["prior.pseudo_inputs"])[0]
        np.testing.assert_allclose(mu, self.w["derived.prior.locations"], rtol=1e-12, atol=1e-12)
        if self.a["prior"] == "vamp":
            s = np.exp(self.w["prior.log_scales"])
            np.testing.assert_allclose(s, self.w["derived.prior.scales"], rtol=1e-12)
            u = (z[:, None, :] - mu[None]) / s[None]
            comp = -0.5 * (u * u).sum(-1) - np.log(s).sum(-1) - 0.5 * k * LOG_2PI
            a = -(z[:, None, :] - mu[None]) / s[None] ** 2  # component gradients (B, K, k)
            curvature = np.broadcast_to(-(s**-2), a.shape)  # diagonal component Hessians
        else:
            kappa = np.logaddexp(0, self.w["prior.kappa_raw"])
            np.testing.assert_allclose(kappa, self.w["derived.prior.kappa"], rtol=1e-12)
            v = k / 2 - 1
            log_c = v * np.log(kappa) - k / 2 * LOG_2PI - (np.log(ive(v, kappa)) + kappa)
            comp = log_c + kappa * (z @ mu.T)
            a = np.broadcast_to(kappa[:, None] * mu, (len(z), *mu.shape))
            curvature = np.zeros(a.shape)
        w = np.exp(comp - logsumexp(comp, axis=1, keepdims=True))
        gradient = np.einsum("bj,bji->bi", w, a)
        hessian = np.einsum("bj,bji,bjl->bil", w, a, a) - gradient[:, :, None] * gradient[:, None, :]
        hessian = hessian + np.einsum("bj,bji,il->bil", w, curvature, np.eye(k))
        return logsumexp(comp, axis=1) - np.log(len(mu)), gradient, hessian

    def log_prior(self, z):
        return self.prior_terms(z)[0]

    def gauss(self, e, sigma2):
        """log N(e; 0, sigma2 diag(w))."""
        variances = sigma2 * self.relative
        return -0.5 * (e * e / variances).sum(1) - 0.5 * (e.shape[1] * LOG_2PI + np.log(variances).sum())

    def log_sv(self, J):  # sum of log singular values, each floored at 1e-12
        return np.log(np.maximum(np.linalg.svd(J, compute_uv=False), 1e-12)).sum(1)

    def decoder_in_tangent(self, z):
        x_hat, J, _ = self.mlp("decoder", z)
        return x_hat, (J @ self.basis(z) if self.sphere else J)

    def score(self, x_raw, method):
        """(log_prior, log_volume, log_residual) of the standardised rows."""
        s = self.manifest["scaler"]
        x = (np.asarray(x_raw, dtype=np.float64) - s["mean"]) / s["scale"]
        z = self.encode(x)[0]
        zero = np.zeros(len(x))
        if method == "latent":
            return self.log_prior(z), zero, zero
        if method == "projected":
            return self.projected(x, z)
        x_hat, J = self.decoder_in_tangent(z)
        residual = self.gauss(x - x_hat, self.noise["sigma2"])
        if method == "reconstruction":
            return zero, zero, residual
        if method == "likelihood":
            return self.log_prior(z), -self.log_sv(J), residual
        # encoder: g restricted to the manifold's tangent space at x' (basis Q), onto z's
        Q = np.linalg.qr(J, mode="reduced")[0]  # (B, d, m)
        z2, Jg = self.encode(x_hat)
        restricted = Jg @ Q
        restricted = self.basis(z2).transpose(0, 2, 1) @ restricted if self.sphere else restricted
        return self.log_prior(z2), self.log_sv(restricted), residual

    def riemannian(self, z, gradient, hessian):
        """Derivatives in R^k -> on the latent manifold, in the basis of self.basis (docs 6.7)."""
        if not self.sphere:
            return gradient, hessian
        B = self.basis(z)
        bending = np.einsum("bk,bk->b", z, gradient)[:, None, None] * np.eye(B.shape[2])
        return np.einsum("bkm,bk->bm", B, gradient), B.transpose(0, 2, 1) @ hessian @ B - bending

    def linearise(self, x, z, sigma2):
        """The objective |x - f(z)|^2 over 2 sigma2 diag(w) minus log p(z), and its derivatives; the
        noise's precision enters as weights 1 / w, not by whitening the decoder."""
        x_hat, J, S = self.mlp("decoder", z, second=True)
        r = x - x_hat
        weighted = r / self.relative
        log_p, prior_gradient, prior_hessian = self.prior_terms(z)
        pull = np.einsum("bok,bo->bk", J, weighted)  # grad of (r / w) . f with r fixed
        pull_gradient, pull_hessian = self.riemannian(z, pull, np.einsum("bo,boij->bij", weighted, S))
        prior_gradient, prior_hessian = self.riemannian(z, prior_gradient, prior_hessian)
        Jt = J @ self.basis(z) if self.sphere else J
        gauss_newton = Jt.transpose(0, 2, 1) @ (Jt / self.relative[:, None]) / sigma2 - prior_hessian
        return {
            "z": z,
            "x_hat": x_hat,
            "log_prior": log_p,
            "objective": 0.5 * (r * weighted).sum(1) / sigma2 - log_p,
            "gradient": -pull_gradient / sigma2 - prior_gradient,
            "hessian": gauss_newton,
            "newton": gauss_newton - pull_hessian / sigma2,
        }

    def projected(self, x, z):
        """The documented MAP iteration (section 6.7), then the Laplace approximation."""
        sigma2, steps, tol = self.noise["sigma2_projected"], 100, 1e-8
        cur = self.linearise(x, z, sigma2)
        m = cur["hessian"].shape[1]
        damping = 1e-3 * np.linalg.norm(cur["newton"], axis=(1, 2))
        growth = np.full(len(x), 2.0)
        done = np.zeros(len(x), dtype=bool)
        for step in range(steps + 1):
            L, definite = cholesky(cur["newton"] + damping[:, None, None] * np.eye(m))
            # Every row's trial point is computed and the refused ones masked below. A row whose
            # factor needed the floor is refused untried (section 6.7); its step can be so large
            # that its norm and trial overflow, which the mask discards.
            with np.errstate(over="ignore"):
                delta = -triangular_solves(L, cur["gradient"])
                ambient = np.einsum("bkm,bm->bk", self.basis(cur["z"]), delta) if self.sphere else delta
                done |= np.linalg.norm(ambient, axis=1) <= tol * (1 + np.linalg.norm(cur["z"], axis=1))
            if step == steps or done.all():
                break
            with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
                moved = cur["z"] + ambient
                moved = moved / np.linalg.norm(moved, axis=1)[:, None] if self.sphere else moved
                trial = self.linearise(x, moved, sigma2)
                predicted = 0.5 * (delta * (damping[:, None] * delta - cur["gradient"])).sum(1)
                gain = (cur["objective"] - trial["objective"]) / predicted
            taken = (predicted > 0) & (gain > 0) & ~done & definite
            for key in cur:
                mask = taken.reshape(-1, *([1] * (cur[key].ndim - 1)))
                cur[key] = np.where(mask, trial[key], cur[key])
            shrink = np.maximum(1 / 3, 1 - (2 * np.where(taken, gain, 0.5) - 1) ** 3)
            damping = np.where(done, damping, np.where(taken, damping * shrink, damping * growth))
            growth = np.where(done, growth, np.where(taken, 2.0, growth * 2))
        self.converged = done
        e = x - cur["x_hat"]
        log_volume = 0.5 * m * LOG_2PI - np.log(
            np.diagonal(cholesky(cur["hessian"])[0], axis1=1, axis2=2)
        ).sum(1)
        return cur["log_prior"], log_volume, self.gauss(e, sigma2)


def cholesky(A):
    """(B, m, m) -> L with each pivot floored at 1e-12 times A's Frobenius norm, and whether no
    pivot needed the floor (docs section 6.7)."""
    floor = 1e-12 * np.linalg.norm(A, axis=(1, 2))
    L, definite = np.zeros_like(A), np.ones(len(A), bool)
    for j in range(A.shape[1]):
        pivot = A[:, j, j] - (L[:, j, :j] ** 2).sum(1)
        definite &= pivot >= floor
        L[:, j, j] = np.sqrt(np.maximum(pivot, floor))
        below = A[:, j + 1 :, j] - np.einsum("brj,bj->br", L[:, j + 1 :, :j], L[:, j, :j])
        L[:, j + 1 :, j] = below / L[:, j, j, None]
    return L, definite


def triangular_solves(L, b):
    """(L L^T)^-1 b for b (B, m), by forward then back substitution. A general solver (LU with row
    exchanges) can meet an exact zero pivot where a floored pivot sits below entries 1e12 times
    larger; rows whose pivots were floored are not stepped (section 6.7), whatever this gives."""
    y = b.copy()
    with np.errstate(all="ignore"):
        for i in range(L.shape[1]):
            y[:, i] = (y[:, i] - np.einsum("bj,bj->b", L[:, i, :i], y[:, :i])) / L[:, i, i]
        for i in reversed(range(L.shape[1])):
            y[:, i] = (y[:, i] - np.einsum("bj,bj->b", L[:, i + 1 :, i], y[:, i + 1 :])) / L[:, i, i]
    return y


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


@pytest.fixture(scope="module", params=["default", "vmf-sphere", "normal", "vamp-tanh-saturated"])
def case(request, tmp_path_factory):
    """(bundle path, raw rows to score)."""
    if request.param == "default":
        features, x = holdout_rows()
        assert features == json.loads((ROOT / "models/default/bundle.json").read_text())["features"]
        return ROOT / "models" / "default", x[:120]
    out, values = tmp_path_factory.mktemp("spec") / request.param, synthetic_rows(300, seed=1)
    features = [f"f{i}" for i in range(6)]
    candidate = {
        "normal": Candidate(2, 16, 2, "tanh", "euclidean", "normal"),
        "vmf-sphere": Candidate(3, 16, 2, "softplus", "sphere", "vmf", components=2),
        # trained long, its tanh decoder saturates: far rows lie where f is flat, and the least-
        # squares projection of schema 1 drifted without bound there
        "vamp-tanh-saturated": Candidate(2, 16, 2, "tanh", "euclidean", "vamp", components=3),
    }[request.param]
    steps = 3000 if request.param == "vamp-tanh-saturated" else 600
    train = TrainRequest([candidate], FitOptions(steps=steps), fprs=(0.1, 0.05), default_fpr=0.05)
    train_bundle(values, features, train, out)
    far = synthetic_rows(10, seed=4) * 4 - 20  # well outside the training range
    return out, np.r_[synthetic_rows(40, seed=2), synthetic_rows(10, seed=3) + 3.0, far]


@pytest.mark.parametrize("method", METHODS)
def test_documented_scores_match_the_product(case, method):
    path, x = case
    reference = Reference(path)
    want = reference.score(x, method)
    if method == "projected":
        assert reference.converged.all()
    bundle = load_bundle(path)
    out = TorchScorer(bundle).score(x, method)  # what the service answers
    got = (out.log_prior, out.log_volume, out.log_residual)
    scale = np.maximum(1.0, np.max(np.abs(want), axis=0))
    rtol = served_rtol(bundle.architecture, method)
    for name, g, w in zip(("log_prior", "log_volume", "log_residual"), got, want, strict=True):
        error = np.abs(g - w) / scale
        assert error.max() < rtol, (name, error.max(), rtol)
    np.testing.assert_array_less(np.abs(out.score + sum(want)) / scale, rtol)
    # The product in float64 is this document to rounding, or to the iteration's tolerance.
    exact = TorchScorer(bundle, dtype="float64").score(x, method)
    rtol = FLOAT64_PROJECTION_RTOL if method == "projected" else 1e-10
    for g, w in zip((exact.log_prior, exact.log_volume, exact.log_residual), want, strict=True):
        np.testing.assert_array_less(np.abs(g - w) / scale, rtol)


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


def read_ensemble(path):
    """docs section 11.3: the manifest and files as for one bundle, then per member its manifest
    entries, its tensors (prefix stripped) and its reference scores."""
    root = Path(path)
    manifest = json.loads((root / "bundle.json").read_text())
    assert manifest["schema_version"] in (4, 5) and version_of(manifest) == manifest["version"]
    combination = manifest["ensemble"]["combination"]
    for name, entry in manifest["files"].items():
        data = (root / name).read_bytes()
        assert len(data) == entry["bytes"] and hashlib.sha256(data).hexdigest() == entry["sha256"]
    w = {k: v.astype(np.float64) for k, v in load_file(root / "weights.safetensors").items()}
    refs, cal = load_file(root / "references.safetensors"), load_file(root / "calibration.safetensors")
    members = []
    for i, entry in enumerate(manifest["ensemble"]["members"]):
        prefix = f"members.{i}."
        own = {k[len(prefix) :]: v for k, v in w.items() if k.startswith(prefix)}
        shapes = weight_shapes(entry["architecture"])
        assert {k: own[k].shape for k in shapes} == shapes
        member = manifest | {"architecture": entry["architecture"], "noise": entry["noise"]}
        keys = [key for m in METHODS for key in ENSEMBLE_TERMS[combination](m)]
        members.append((Reference(parts=(member, own, None)), {key: refs[f"{key}.{i}"] for key in keys}))
    assert sum(len(m[0].w) for m in members) == len(w)  # no tensor outside a member
    assert len(refs) == sum(len(m[1]) for m in members)  # no reference values of no term
    return manifest, members, cal


# docs section 11.2: what each combination ranks of a method's scores, and how a term's values
# follow from the parts (log p(z), -sum log s_i, log N(x - f(z))).
FACTORS = {"likelihood": "mr", "encoder": "mr", "reconstruction": "r", "latent": "m", "projected": "mr"}
ENSEMBLE_TERMS = {
    "rank_mean": lambda method: [method],
    "factor_fisher": lambda method: [
        f"{method}.{'manifold' if f == 'm' else 'residual'}" for f in FACTORS[method]
    ],
}
ENSEMBLE_TERMS["factor_fisher_tail"] = ENSEMBLE_TERMS["factor_fisher"]


def member_statistic(combination, reference, values):
    """rank_mean: the rank #{r <= v} / n; factor_fisher: the surprisal -log((1 + #{r >= v}) / (n + 1));
    factor_fisher_tail: beyond the largest r_n, log(n + 1) + (v - r_n) / s instead, s the mean of the
    largest k = max(1, n // 10) minus the next largest (1 where n <= k or s <= 0)."""
    n = reference.size
    if combination == "rank_mean":
        return (reference[None, :] <= values[:, None]).sum(1) / n
    surprisal = -np.log((1 + (reference[None, :] >= values[:, None]).sum(1)) / (n + 1))
    if combination == "factor_fisher":
        return surprisal
    r = np.sort(reference)
    k = max(1, n // 10)
    s = float(np.mean(r[n - k :]) - r[n - k - 1]) if n > k else 0.0
    s = s if s > 0 else 1.0
    return np.where(values > r[-1], np.log(n + 1) + (values - r[-1]) / s, surprisal)


def term_values(key, prior, volume, residual):
    if key.endswith(".manifold"):
        return -(prior + volume)
    if key.endswith(".residual"):
        return -residual
    return -(prior + volume + residual)


@pytest.fixture(scope="module")
def trained_ensemble(tmp_path_factory):
    """Members of different latent sizes, geometries and priors, as a grid may hold."""
    out, values = tmp_path_factory.mktemp("spec") / "ensemble", synthetic_rows(300, seed=5)
    candidates = [
        Candidate(2, 16, 2, "tanh", "euclidean", "normal"),
        Candidate(3, 16, 2, "softplus", "sphere", "vmf", components=2),
        Candidate(2, 16, 2, "swish", "euclidean", "vamp", components=3),
    ]
    request = TrainRequest(
        candidates, FitOptions(steps=600), fprs=(0.1, 0.05), default_fpr=0.05, ensemble=True
    )
    result = train_bundle(values, [f"f{i}" for i in range(6)], request, out)
    return result, values, np.r_[synthetic_rows(40, seed=6), synthetic_rows(10, seed=7) + 3.0]


@pytest.fixture(scope="module", params=["factor_fisher_tail", "factor_fisher", "rank_mean"])
def ensemble(request, trained_ensemble, tmp_path_factory):
    """The trained ensemble, and the same members as earlier ensemble bundles combined them."""
    result, values, x = trained_ensemble
    combination = request.param
    if combination == result.bundle.combination:
        return result.bundle.path, x
    bundle, reports = result.bundle, result.reports
    x_cal = bundle.scaler.transform(values[split_rows(300, 0.2, 0.2, seed=0).calibration])
    calibration = {
        method: member_scores(
            combination,
            [r.val_scores for r in reports],
            [term_scores(combination, method, score_rows(r.fitted.model, x_cal, method)) for r in reports],
        ).mean(axis=1)
        for method in METHODS
    }
    out = tmp_path_factory.mktemp("spec") / combination
    first = first_combination(result, out, calibration, combination, fprs=(0.1, 0.05), default_fpr=0.05)
    return first.path, x


@pytest.mark.parametrize("method", METHODS)
def test_documented_ensemble_scores_match_the_product(ensemble, method):
    """Each member scored by the document's formulas, each term put on the scale of its reference
    values as the combination says, the members' scores averaged; then p-values and flags from the
    ensemble's calibration scores (sections 7 and 11.2)."""
    path, x = ensemble
    manifest, members, cal = read_ensemble(path)
    combination = manifest["ensemble"]["combination"]
    out = TorchScorer(load_bundle(path), dtype="float64").score(x, method)
    # The product agrees with the document to 1e-10 (FLOAT64_PROJECTION_RTOL for projected) of the
    # parts' scale: a reference value that close to a row's could fall on either side, so each
    # member's score is bounded by the document's at the values moved that far down and up.
    rtol = FLOAT64_PROJECTION_RTOL if method == "projected" else 1e-10
    low, high, beyond = [], [], []
    for reference, refs in members:
        parts = reference.score(x, method)
        window = rtol * np.maximum(1.0, sum(map(np.abs, parts)))
        keys = ENSEMBLE_TERMS[combination](method)
        values = {key: term_values(key, *parts) for key in keys}
        low.append(sum(member_statistic(combination, refs[k], values[k] - window) for k in keys))
        high.append(sum(member_statistic(combination, refs[k], values[k] + window) for k in keys))
        beyond.append(any((values[k] > refs[k].max()).any() for k in keys))
    if combination == "factor_fisher_tail":  # the rows reach the tail: its formula is checked
        assert any(beyond)
    score = out.member_scores
    assert np.all((score >= np.array(low).T - 1e-12) & (score <= np.array(high).T + 1e-12))
    np.testing.assert_allclose(out.score, score.mean(axis=1), rtol=1e-15, atol=0)
    c = cal[method]
    p = (1 + (c[None, :] >= out.score[:, None]).sum(1)) / (c.size + 1)
    np.testing.assert_array_equal(out.p_value, p)
    threshold = c[c.size - int(np.floor(manifest["default_fpr"] * (c.size + 1) + 1e-9))]
    np.testing.assert_array_equal(out.is_anomaly, out.score > threshold)
    assert manifest["thresholds"][method]["fpr_0.05"]["value"] == threshold
