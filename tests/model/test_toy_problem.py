"""The paper's Fig. 1: each classic score fails on one kind of anomaly, the likelihood on neither."""

import numpy as np
import pytest
import torch

from app.model.scores import score
from app.model.toy import sample_normal, sample_off_manifold_near, sample_on_manifold_far, toy_model
from app.train.selection import auc


def _auc(method, normal, anomalous):
    model = toy_model()
    x = torch.cat([normal, anomalous])
    labels = np.r_[np.zeros(len(normal)), np.ones(len(anomalous))]
    return auc(labels, score(model, x, method).score.numpy())


@pytest.fixture(scope="module")
def samples():
    g = torch.Generator().manual_seed(0)
    return sample_normal(2000, g), sample_on_manifold_far(300, g), sample_off_manifold_near(300, g)


def test_likelihood_catches_both_kinds_of_anomaly(samples):
    normal, far, off = samples
    assert _auc("likelihood", normal, far) >= 0.95
    assert _auc("likelihood", normal, off) >= 0.95
    assert _auc("projected", normal, far) >= 0.95
    assert _auc("projected", normal, off) >= 0.95


def test_reconstruction_error_misses_anomalies_on_the_manifold(samples):
    normal, far, off = samples
    assert _auc("reconstruction", normal, far) < 0.7
    assert _auc("reconstruction", normal, off) >= 0.95


def test_latent_density_misses_anomalies_off_the_manifold(samples):
    normal, far, off = samples
    assert _auc("latent", normal, off) < 0.7
    assert _auc("latent", normal, far) >= 0.95
