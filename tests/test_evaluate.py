"""Metrics of `flowmatch eval` against known answers."""

import numpy as np
import torch
from scipy import linalg

from flowmatch.evaluate import frechet_distance, to_digit_features


def test_frechet_distance_matches_the_matrix_square_root_formula():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(600, 6))
    b = rng.normal(size=(500, 6)) @ rng.normal(size=(6, 6)) + 0.5
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    reference = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(ca + cb - 2 * linalg.sqrtm(ca @ cb).real)
    assert abs(frechet_distance(a, b) - reference) < 1e-8 * max(1.0, reference)
    assert abs(frechet_distance(a, a)) < 1e-9


def test_frechet_distance_of_diagonal_gaussians_and_blank_pixels():
    # Independent dims with variances s1, s2: FD = |mu1 - mu2|^2 + sum (sqrt s1 - sqrt s2)^2; a constant (blank)
    # dimension makes the covariances singular and adds nothing.
    rng = np.random.default_rng(1)
    n = 200_000
    a = np.stack([rng.normal(0, 1, n), rng.normal(2, 3, n), np.zeros(n)], 1)
    b = np.stack([rng.normal(1, 2, n), rng.normal(2, 3, n), np.zeros(n)], 1)
    expected = 1.0 + (1 - 2) ** 2 + 0.0
    assert abs(frechet_distance(a, b) - expected) < 0.05


def test_digit_features_pool_to_8x8_on_the_0_to_16_scale():
    ones = torch.ones(2, 1, 16, 16)
    feats = to_digit_features(ones)
    assert feats.shape == (2, 64) and np.allclose(feats, 16.0)
    checker = torch.zeros(1, 1, 16, 16)
    checker[..., ::2, ::2] = 1.0  # one bright pixel in each 2x2 block -> a quarter of full intensity
    assert np.allclose(to_digit_features(checker), 4.0)
