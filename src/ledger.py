"""Privacy accounting shared by every DP release: the mechanisms a release ran, composed into one epsilon.

Every DP release states its guarantee under one neighbouring relation, `ADJACENCY`, and records the
mechanisms that read the private split in its metadata (`meta["dp"]["mechanisms"]`), as plain dicts:

- `{"mechanism": "subsampled_gaussian", "noise_multiplier": z, "sample_rate": q, "steps": T}`: DP-SGD,
  T steps of Poisson sampling at rate q, Gaussian noise of std z times the clipping norm;
- `{"mechanism": "gaussian", "noise_multiplier": z, "count": m}`: m Gaussian mechanisms, each with noise
  of std z times its L2 sensitivity;
- `{"mechanism": "laplace", "epsilon": e}`: one Laplace mechanism of scale (L1 sensitivity) / e.

`spent_epsilon` composes any list of them (one release's, or every release of one split) by Renyi DP:
orders add under composition (Mironov 2017), and the total is converted to (epsilon, delta) by opacus's
conversion. Pure-DP parts may instead add their epsilons to the rest by basic composition; both bounds
hold, so the smaller is reported.
"""
from __future__ import annotations

import math
import warnings

import numpy as np

ADJACENCY = "add/remove one record: datasets that differ by one labelled record of the private train split"
ORDERS = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(11, 64)) + [80, 128, 256, 512])
MECHANISMS = ("subsampled_gaussian", "gaussian", "laplace")


def laplace_rdp(epsilon: float, orders: np.ndarray) -> np.ndarray:
    """Renyi DP of the Laplace mechanism with scale sensitivity / epsilon (Mironov 2017, Proposition 6)."""
    alpha = np.asarray(orders, dtype=np.float64)
    log_terms = np.logaddexp(np.log(alpha / (2 * alpha - 1)) + (alpha - 1) * epsilon,
                             np.log((alpha - 1) / (2 * alpha - 1)) - alpha * epsilon)
    return np.minimum(log_terms / (alpha - 1), epsilon)  # never above its pure epsilon


def mechanism_rdp(mechanism: dict, orders: np.ndarray) -> np.ndarray:
    """One recorded mechanism's Renyi DP at each order."""
    from opacus.accountants.analysis.rdp import compute_rdp

    kind = mechanism["mechanism"]
    if kind == "subsampled_gaussian":
        return np.asarray(compute_rdp(q=mechanism["sample_rate"], noise_multiplier=mechanism["noise_multiplier"],
                                      steps=mechanism["steps"], orders=list(orders)))
    if kind == "gaussian":
        return mechanism["count"] * np.asarray(orders) / (2 * mechanism["noise_multiplier"] ** 2)
    if kind == "laplace":
        return laplace_rdp(mechanism["epsilon"], orders)
    raise ValueError(f"unknown mechanism {kind!r}; known: {', '.join(MECHANISMS)}")


def rdp_epsilon(mechanisms: list[dict], delta: float) -> float:
    """(epsilon, delta) of the mechanisms composed by Renyi DP (0 for none)."""
    from opacus.accountants.analysis.rdp import get_privacy_spent

    if not mechanisms:
        return 0.0
    orders = np.asarray(ORDERS)
    total = sum(mechanism_rdp(mechanism, orders) for mechanism in mechanisms)
    with warnings.catch_warnings():  # opacus warns when the best order is at an end of the range:
        warnings.simplefilter("ignore", UserWarning)  # the bound is looser there, never wrong
        epsilon, _ = get_privacy_spent(orders=list(orders), rdp=list(total), delta=delta)
    return max(0.0, float(epsilon))


def spent_epsilon(mechanisms: list[dict], delta: float) -> float:
    """The epsilon at `delta` of all the mechanisms together: Renyi composition of all of them, or of the
    approximate-DP ones plus the pure epsilons by basic composition, whichever is smaller."""
    if not 0 < delta < 1:
        raise ValueError(f"delta {delta} must lie strictly between 0 and 1")
    pure = [mechanism for mechanism in mechanisms if mechanism["mechanism"] == "laplace"]
    rest = [mechanism for mechanism in mechanisms if mechanism["mechanism"] != "laplace"]
    basic = rdp_epsilon(rest, delta) + sum(mechanism["epsilon"] for mechanism in pure)
    return min(rdp_epsilon(mechanisms, delta), basic)


def gaussian_noise_multiplier(epsilon: float, delta: float, count: int = 1, fixed: list[dict] = ()) -> float:
    """The smallest noise multiplier z (to 0.1 %) such that `count` Gaussian mechanisms with noise z times
    their sensitivity, composed with the `fixed` mechanisms, spend at most `epsilon` at `delta`."""
    def spent(z: float) -> float:
        return spent_epsilon([*fixed, {"mechanism": "gaussian", "noise_multiplier": z, "count": count}], delta)

    low, high = 1e-3, 1.0
    while spent(high) > epsilon:
        low, high = high, high * 2
        if high > 1e6:
            raise ValueError(f"epsilon {epsilon} is out of reach at delta {delta} for any noise")
    while high - low > 1e-3 * high:
        middle = math.sqrt(low * high)
        low, high = (middle, high) if spent(middle) > epsilon else (low, middle)
    return high
