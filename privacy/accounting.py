"""Privacy accounting: the one place epsilon is computed, for the site budget, the ledger and the audit.

A privacy unit's history is a list of ``(noise_multiplier, sample_rate, steps)`` entries: each
entry is ``steps`` Poisson-subsampled Gaussian steps (sample_rate 1: the plain Gaussian
mechanism). No epsilon is computed by hand; three accountants are used, each for one job:

* **enforcement** (`filter_epsilon`): Opacus's RDP accountant. Rényi DP composes under fully
  adaptive choices of the mechanism (an RDP privacy filter: Feldman and Zrnic, NeurIPS 2021;
  Lécuyer 2021 for the best of a fixed set of orders), and the coordinator chooses the noise,
  the sample rate and the steps of every round, run after run. PRV/PLD composition is only
  proven for mechanisms fixed in advance, so a budget is never enforced with it;
* **report** (`pld_epsilon`): Google dp-accounting's PLD accountant (pessimistic estimate),
  the tight figure for the same history had it been fixed in advance, printed beside;
* **audit floor** (`pld_epsilon_optimistic`): PLD with the optimistic discretisation, a lower
  estimate of the true epsilon: no recorded epsilon may be below it.

JSON has no infinity: an infinite epsilon is written as the string "inf" (`encode_epsilon`,
`decode_epsilon`); every reader in fedvid goes through `decode_epsilon`.
"""

from __future__ import annotations

import functools
import logging
import math
import warnings
from typing import Any, Iterable, Sequence

History = tuple[tuple[float, float, int], ...]

FILTER = "rdp"  # the accountant a site's budget is enforced with
UNITS = ("video", "person", "clip")  # what one (epsilon, delta) protects; see privacy.site_budget


def encode_epsilon(x: float | None) -> float | str | None:
    """float -> JSON value: ``inf`` becomes the string "inf"; None stays None."""
    if x is None:
        return None
    x = float(x)
    if math.isnan(x):
        raise ValueError("epsilon is NaN")
    return "inf" if x == math.inf else x


def decode_epsilon(v: Any) -> float | None:
    """JSON value -> float: "inf" (or "Infinity") becomes ``math.inf``; None stays None."""
    if v is None:
        return None
    if isinstance(v, str):
        if v.lower() in ("inf", "infinity", "+inf"):
            return math.inf
        raise ValueError(f"bad epsilon value {v!r}")
    return float(v)


def merge_history(history: Iterable[Sequence[float]]) -> History:
    """Entries with steps > 0, consecutive ones with the same (sigma, q) merged."""
    out: list[tuple[float, float, int]] = []
    for sigma, q, steps in history:
        sigma, q, steps = float(sigma), float(q), int(steps)
        if steps <= 0:
            continue
        if out and out[-1][:2] == (sigma, q):
            out[-1] = (sigma, q, out[-1][2] + steps)
        else:
            out.append((sigma, q, steps))
    return tuple(out)


def check_step_args(noise_multiplier: float, sample_rate: float, steps: int) -> None:
    """Refuse a mechanism that no accountant here can account."""
    if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise ValueError(f"noise-multiplier must be finite and > 0, got {noise_multiplier!r}")
    if not (0.0 < sample_rate <= 1.0):
        raise ValueError(f"sample rate must be in (0, 1], got {sample_rate!r}")
    if int(steps) != steps or steps < 0:
        raise ValueError(f"steps must be a non-negative integer, got {steps!r}")


def filter_epsilon(history: Iterable[Sequence[float]], delta: float) -> float:
    """Epsilon of ``history`` at ``delta`` by Opacus's RDP accountant: the enforced figure."""
    return _rdp_epsilon(merge_history(history), float(delta))


@functools.lru_cache(maxsize=4096)
def _rdp_epsilon(history: History, delta: float) -> float:
    from opacus.accountants import RDPAccountant

    if not history:
        return 0.0
    if any(sigma <= 0 for sigma, _, _ in history):
        return math.inf
    accountant = RDPAccountant()
    accountant.load_state_dict({"history": list(history), "mechanism": "rdp"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # RDP warns when the best order is at the range's edge
        return float(accountant.get_epsilon(delta))


def pld_epsilon(history: Iterable[Sequence[float]], delta: float) -> float:
    """Epsilon of ``history`` at ``delta`` by dp-accounting's PLD accountant (an upper bound)."""
    return _pld_epsilon(merge_history(history), float(delta), True)


def pld_epsilon_optimistic(history: Iterable[Sequence[float]], delta: float) -> float:
    """The optimistic PLD estimate: below the true epsilon, so no honest record is below it."""
    return _pld_epsilon(merge_history(history), float(delta), False)


@functools.lru_cache(maxsize=4096)
def _pld_epsilon(history: History, delta: float, pessimistic: bool) -> float:
    from dp_accounting.pld import privacy_loss_distribution as pld

    if not history:
        return 0.0
    if any(sigma <= 0 for sigma, _, _ in history):
        return math.inf
    # The PLD's support grows with the privacy loss: at a noise multiplier of 0.01 a 1e-3 grid
    # takes gigabytes. A grid coarser in proportion to the (RDP) epsilon keeps it small; a
    # coarser grid only moves each estimate further in its own safe direction.
    interval = max(1e-3, _rdp_epsilon(history, delta) / 2000)
    total = None
    for sigma, q, steps in history:
        one = pld.from_gaussian_mechanism(
            standard_deviation=sigma, sampling_prob=q, pessimistic_estimate=pessimistic,
            value_discretization_interval=interval, use_connect_dots=pessimistic,  # the only kind each supports
        ).self_compose(steps)
        total = one if total is None else total.compose(one)
    return float(total.get_epsilon_for_delta(delta))


def independent_rdp_epsilon(history: Iterable[Sequence[float]], delta: float) -> float:
    """Epsilon by dp-accounting's RDP accountant with Opacus's orders: the audit's check of
    `filter_epsilon` by code that shares none of Opacus's."""
    return _independent_rdp(merge_history(history), float(delta))


@functools.lru_cache(maxsize=4096)
def _independent_rdp(history: History, delta: float) -> float:
    import dp_accounting
    from opacus.accountants import RDPAccountant

    if not history:
        return 0.0
    if any(sigma <= 0 for sigma, _, _ in history):
        return math.inf
    absl_log = logging.getLogger("absl")  # it logs each order it drops; dropping only loosens
    level = absl_log.level
    absl_log.setLevel(logging.ERROR)
    try:
        accountant = dp_accounting.rdp.RdpAccountant(orders=RDPAccountant.DEFAULT_ALPHAS)
        for sigma, q, steps in history:
            event: Any = dp_accounting.GaussianDpEvent(sigma)
            if q < 1.0:
                event = dp_accounting.PoissonSampledDpEvent(q, event)
            accountant.compose(dp_accounting.SelfComposedDpEvent(event, steps))
        return float(accountant.get_epsilon(delta))
    finally:
        absl_log.setLevel(level)


@functools.lru_cache(maxsize=64)
def calibrate_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """The noise multiplier whose enforced (RDP) epsilon after ``steps`` steps at
    ``sample_rate`` is at most ``target_epsilon``: calibrate once for the whole plan
    (remembered: a bisection over Opacus's RDP takes seconds, and every round asks again)."""
    from opacus.accountants.utils import get_noise_multiplier

    if not target_epsilon > 0:
        raise ValueError(f"target-epsilon must be > 0, got {target_epsilon!r}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    check_step_args(1.0, sample_rate, steps)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sigma = float(get_noise_multiplier(
            target_epsilon=float(target_epsilon), target_delta=float(delta), sample_rate=float(sample_rate),
            steps=int(steps), accountant=FILTER,
        ))
    # Opacus's bisection stops within 0.01 of the target; step up until the plan really fits.
    while filter_epsilon([(sigma, sample_rate, steps)], delta) > target_epsilon:
        sigma *= 1.01
    return sigma
