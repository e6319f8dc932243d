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
conversion. Plain Gaussian mechanisms alone compose exactly instead: m mechanisms with multipliers z_i
are together mu-GDP with mu^2 = sum 1 / z_i^2, and mu-GDP's (epsilon, delta) curve is exact (Dong, Roth
and Su 2022), where Renyi DP's conversion overstates epsilon (at epsilon 1, delta 1e-5 one mechanism
needs z = 3.73 exactly against 4.05 by Renyi DP). Pure-DP parts may instead add their epsilons to the rest
by basic composition. Every bound holds, so the smallest is reported; plain Gaussians alone are
reported exactly, without opacus (the DP baselines need no opacus).
"""
from __future__ import annotations

import json
import math
import sys
import warnings
from pathlib import Path
from typing import Callable

import numpy as np

from src.cli import ArgumentParser, check_finite, run_cli
from src.defaults import DEFAULT_ROOTS

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


def normal_cdf(t: float) -> float:
    """Phi(t), accurate in the far lower tail (erfc keeps its relative precision there)."""
    return 0.5 * math.erfc(-t / math.sqrt(2))


def gdp_delta(epsilon: float, mu: float) -> float:
    """delta(epsilon) of a mu-GDP mechanism (Dong, Roth and Su 2022, Corollary 2.13): exact for the
    Gaussian mechanism with noise 1/mu times its sensitivity (Balle and Wang 2018)."""
    upper = normal_cdf(-epsilon / mu - mu / 2)
    return normal_cdf(-epsilon / mu + mu / 2) - (math.exp(epsilon + math.log(upper)) if upper > 0 else 0.0)


def gdp_epsilon(gaussians: list[dict], delta: float) -> float:
    """The exact epsilon at `delta` of plain Gaussian mechanisms composed (mu^2 = sum count / z^2): the
    smallest epsilon with gdp_delta(epsilon) <= delta, by bisection to 1e-12 and rounded up."""
    mu = math.sqrt(sum(m["count"] / m["noise_multiplier"] ** 2 for m in gaussians))
    if mu == 0 or gdp_delta(0.0, mu) <= delta:
        return 0.0
    low, high = 0.0, 1.0
    while gdp_delta(high, mu) > delta:
        low, high = high, 2 * high
    while high - low > 1e-12 * high:
        middle = (low + high) / 2
        low, high = (middle, high) if gdp_delta(middle, mu) > delta else (low, middle)
    return high


def spent_epsilon(mechanisms: list[dict], delta: float) -> float:
    """The epsilon at `delta` of all the mechanisms together: the smaller of Renyi composition of all of
    them and of the approximate-DP ones plus the pure epsilons by basic composition, where plain
    Gaussian mechanisms alone compose exactly (GDP). Renyi DP only bounds that exact curve from above, so
    a ledger of plain Gaussians is the exact value alone, and needs no opacus."""
    if not 0 < delta < 1:
        raise ValueError(f"delta {delta} must lie strictly between 0 and 1")
    pure = [mechanism for mechanism in mechanisms if mechanism["mechanism"] == "laplace"]
    rest = [mechanism for mechanism in mechanisms if mechanism["mechanism"] != "laplace"]
    pure_epsilon = sum(mechanism["epsilon"] for mechanism in pure)
    gaussian_only = all(mechanism["mechanism"] == "gaussian" for mechanism in rest)
    if gaussian_only and not pure:
        return gdp_epsilon(rest, delta)
    rest_epsilon = gdp_epsilon(rest, delta) if gaussian_only else rdp_epsilon(rest, delta)
    return min(rdp_epsilon(mechanisms, delta), rest_epsilon + pure_epsilon)


def noise_multiplier(epsilon: float, delta: float, mechanism: Callable[[float], dict],
                     fixed: list[dict] = ()) -> float:
    """The smallest noise multiplier z (to 0.1 %) such that `mechanism(z)`, composed with the `fixed`
    mechanisms, spends at most `epsilon` at `delta`: a bisection on `spent_epsilon` itself, so a release
    spends what the ledger will say it spent."""
    def spent(z: float) -> float:
        return spent_epsilon([*fixed, mechanism(z)], delta)

    low, high = 1e-3, 1.0
    while spent(high) > epsilon:
        low, high = high, high * 2
        if high > 1e6:
            raise ValueError(f"epsilon {epsilon} is out of reach at delta {delta} for any noise")
    while high - low > 1e-3 * high:
        middle = math.sqrt(low * high)
        low, high = (middle, high) if spent(middle) > epsilon else (low, middle)
    return high


def gaussian_noise_multiplier(epsilon: float, delta: float, count: int = 1, fixed: list[dict] = ()) -> float:
    """`noise_multiplier` of `count` Gaussian mechanisms with noise z times their sensitivity."""
    return noise_multiplier(epsilon, delta, lambda z: {"mechanism": "gaussian", "noise_multiplier": z,
                                                       "count": count}, fixed)


def composed(accountings: list[dict]) -> tuple[float, float]:
    """(epsilon, delta) of several DP releases of one split together: their deltas add, their mechanisms
    compose by Renyi DP at that total delta."""
    delta = sum(accounting["delta"] for accounting in accountings)
    return spent_epsilon([m for accounting in accountings for m in accounting["mechanisms"]], min(delta, 0.5)), delta


def split_ledger(releases: dict[str, list[tuple[str, dict]]], warn_epsilon: float | None) -> tuple[str, list[str]]:
    """A Markdown table of the budget each private split has spent (split -> its releases' (name, accounting)),
    and a warning line for each split whose composed epsilon passes `warn_epsilon`."""
    rows, warnings_ = ["| private split | DP releases | epsilon each | composed epsilon | at delta |",
                       "|---|---|---|---|---|"], []
    for split, named in sorted(releases.items()):
        epsilon, delta = composed([accounting for _, accounting in named])
        each = ", ".join(f"{name} {accounting['spent_epsilon']:.3g}" for name, accounting in named)
        rows.append(f"| {split} | {len(named)} | {each} | {epsilon:.3f} | {delta:.2g} |")
        if warn_epsilon is not None and epsilon > warn_epsilon:
            warnings_.append(f"warning: the DP releases of {split} compose to epsilon {epsilon:.3f} at delta "
                             f"{delta:.2g}, past --warn_epsilon {warn_epsilon:g}")
    return "\n".join(rows), warnings_


def add_warn_epsilon(parser: ArgumentParser) -> None:
    """--warn_epsilon, the threshold the ledger and the aggregate warn past, checked when parsed."""
    def positive_epsilon(text: str) -> float:
        return check_finite("--warn_epsilon", float(text), above=0)

    parser.add_argument("--warn_epsilon", type=positive_epsilon, default=None,
                        help="warn when one split's DP releases compose past this epsilon")


def main() -> None:
    """python -m src.ledger: the budget spent on each private split by the DP releases under a database root."""
    parser = ArgumentParser(description=main.__doc__.split(": ", 1)[1])
    parser.add_argument("--database_root", type=Path, default=DEFAULT_ROOTS["database_root"],
                        help="where the releases are (default assets/database)")
    add_warn_epsilon(parser)
    args = parser.parse_args()
    releases: dict[str, list[tuple[str, dict]]] = {}
    for path in sorted(Path(args.database_root).glob("*/*/train_*.npz")):
        with np.load(path, allow_pickle=False) as npz:
            meta = json.loads(str(npz["meta"])) if "meta" in npz.files else {}
        if "dp" in meta:
            split = f"{path.parent.parent.name}/{path.parent.name}/train"
            releases.setdefault(split, []).append((path.stem.removeprefix("train_"), meta["dp"]))
    if not releases:
        print(f"no DP releases under {args.database_root}")
        return
    table, warnings_ = split_ledger(releases, args.warn_epsilon)
    print(f"Relation: {ADJACENCY}.\n\n{table}")
    for line in warnings_:
        print(line, file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
