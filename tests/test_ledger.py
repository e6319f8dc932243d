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
def test_gaussian_mechanism_bound_holds_and_is_close_to_exact(noise_multiplier):
    delta = 1e-5
    epsilon = spent_epsilon([{"mechanism": "gaussian", "noise_multiplier": noise_multiplier, "count": 1}], delta)
    assert exact_gaussian_delta(epsilon, noise_multiplier) <= delta  # a valid bound
    assert exact_gaussian_delta(0.7 * epsilon, noise_multiplier) > delta  # and not loose by more than 30 %


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
