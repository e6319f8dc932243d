"""Privacy accounting against independent oracles: opacus's accountant, the exact Gaussian mechanism,
and the Renyi divergence of two Laplace densities integrated numerically."""
from __future__ import annotations

import math

import numpy as np
import pytest

from src.ledger import ORDERS, gaussian_noise_multiplier, laplace_rdp, spent_epsilon

pytest.importorskip("opacus")


def exact_gaussian_delta(epsilon: float, noise_multiplier: float) -> float:
    """delta(epsilon) of one Gaussian mechanism with sensitivity 1, exactly (Balle and Wang 2018)."""
    def phi(t: float) -> float:
        return 0.5 * math.erfc(-t / math.sqrt(2))
    z = noise_multiplier
    return phi(1 / (2 * z) - epsilon * z) - math.exp(epsilon) * phi(-1 / (2 * z) - epsilon * z)


@pytest.mark.parametrize("sample_rate, noise_multiplier, steps", [(0.5, 1.1, 50), (1 / 3, 4.0, 300), (0.01, 0.8, 1000)])
def test_subsampled_gaussian_matches_opacus_accountant(sample_rate, noise_multiplier, steps):
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(noise_multiplier, sample_rate, steps)]
    expected = accountant.get_epsilon(delta=1e-5, alphas=list(ORDERS))
    mechanism = {"mechanism": "subsampled_gaussian", "noise_multiplier": noise_multiplier,
                 "sample_rate": sample_rate, "steps": steps}
    assert spent_epsilon([mechanism], 1e-5) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("noise_multiplier", [0.7, 2.0, 8.0])
def test_gaussian_mechanism_is_accounted_exactly(noise_multiplier):
    delta = 1e-5
    epsilon = spent_epsilon([{"mechanism": "gaussian", "noise_multiplier": noise_multiplier, "count": 1}], delta)
    assert exact_gaussian_delta(epsilon, noise_multiplier) <= delta  # a valid bound
    assert exact_gaussian_delta(epsilon * (1 - 1e-6), noise_multiplier) > delta  # and the exact one
    renyi = spent_epsilon([{"mechanism": "subsampled_gaussian", "noise_multiplier": noise_multiplier,
                            "sample_rate": 1.0, "steps": 1}], delta)  # the same mechanism, by Renyi DP
    assert epsilon < renyi


@pytest.mark.parametrize("multipliers", [(3.0, 3.0, 3.0, 3.0), (2.0, 5.0, 9.0), (0.9,)])
def test_gaussian_mechanisms_compose_as_one_with_the_root_sum_of_their_inverse_squares(multipliers):
    """k Gaussian mechanisms, adaptively composed, are exactly one with 1 / z^2 = sum 1 / z_i^2: their
    privacy-loss variables are Gaussians whose means and variances add (Dong, Roth and Su 2022)."""
    separate = [{"mechanism": "gaussian", "noise_multiplier": z, "count": 1} for z in multipliers]
    merged = 1 / math.sqrt(sum(1 / z ** 2 for z in multipliers))
    epsilon = spent_epsilon(separate, 1e-5)
    assert exact_gaussian_delta(epsilon, merged) <= 1e-5 < exact_gaussian_delta(epsilon * (1 - 1e-6), merged)
    counted = {"mechanism": "gaussian", "noise_multiplier": multipliers[0], "count": len(multipliers)}
    assert spent_epsilon([counted], 1e-5) == spent_epsilon([separate[0]] * len(multipliers), 1e-5)


@pytest.mark.parametrize("epsilon", [0.1, 1.0, 5.0])
@pytest.mark.parametrize("order", [1.5, 2.0, 8.0])
def test_laplace_rdp_equals_the_integrated_renyi_divergence(epsilon, order):
    scale = 1 / epsilon
    x = np.linspace(-60 * scale, 60 * scale, 2_000_001)
    p = np.exp(-np.abs(x) / scale) / (2 * scale)
    q = np.exp(-np.abs(x - 1) / scale) / (2 * scale)
    integrand = np.exp(order * np.log(p) + (1 - order) * np.log(q))
    divergence = np.log(np.sum(integrand) * (x[1] - x[0])) / (order - 1)
    assert laplace_rdp(epsilon, np.array([order]))[0] == pytest.approx(divergence, rel=1e-4)


def test_pure_laplace_costs_its_epsilon_and_composes_with_dp_sgd():
    laplace = {"mechanism": "laplace", "epsilon": 0.1}
    assert spent_epsilon([laplace], 1e-5) == pytest.approx(0.1)
    sgd = {"mechanism": "subsampled_gaussian", "noise_multiplier": 1.0, "sample_rate": 0.5, "steps": 100}
    both = spent_epsilon([sgd, laplace], 1e-5)
    assert spent_epsilon([sgd], 1e-5) < both <= spent_epsilon([sgd], 1e-5) + 0.1 + 1e-12


def test_composition_of_two_releases_costs_more_than_one_and_at_most_twice():
    sgd = {"mechanism": "subsampled_gaussian", "noise_multiplier": 1.0, "sample_rate": 0.5, "steps": 100}
    one, two = spent_epsilon([sgd], 1e-5), spent_epsilon([sgd, sgd], 1e-5)
    assert one < two < 2 * one


@pytest.mark.parametrize("epsilon, count", [(0.5, 1), (1.0, 3), (8.0, 2)])
def test_gaussian_noise_multiplier_is_calibrated(epsilon, count):
    fixed = [{"mechanism": "laplace", "epsilon": 0.05 * epsilon}]
    z = gaussian_noise_multiplier(epsilon, 1e-5, count, fixed)
    def spent(multiplier: float) -> float:
        return spent_epsilon([*fixed, {"mechanism": "gaussian", "noise_multiplier": multiplier, "count": count}],
                             1e-5)
    assert spent(z) <= epsilon
    assert spent(0.99 * z) > epsilon
