"""The audit's accountants against the obvious computations: Opacus's RDP accountant stepped
one step at a time, and dp-accounting's PLD accountant composed event by event."""

from __future__ import annotations

import dp_accounting
import pytest
from opacus.accountants import RDPAccountant

from privacy.accounting import filter_epsilon, independent_rdp_epsilon, pld_epsilon, pld_epsilon_optimistic
from privacy.audit import epsilon_floor

DELTA = 1e-5
HISTORIES = [
    [(1.0, 0.05, 60)],
    [(0.7, 0.05, 30), (1.2, 0.1, 40)],
    [(1.5, 1.0, 5)],  # the central mechanism: q = 1, one step per round
    [(2.0, 0.02, 200), (1.0, 0.02, 20), (2.0, 0.02, 100)],  # interleaved: merged only when adjacent
]


def opacus_stepped(history, delta):
    acc = RDPAccountant()
    for sigma, q, steps in history:
        for _ in range(steps):
            acc.step(noise_multiplier=sigma, sample_rate=q)
    return acc.get_epsilon(delta)


def google_pld(history, delta):
    acc = dp_accounting.pld.PLDAccountant(value_discretization_interval=5e-4)  # finer than ours
    for sigma, q, steps in history:
        event = dp_accounting.GaussianDpEvent(sigma)
        if q < 1:
            event = dp_accounting.PoissonSampledDpEvent(q, event)
        acc.compose(dp_accounting.SelfComposedDpEvent(event, steps))
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("history", HISTORIES, ids=range(len(HISTORIES)))
def test_filter_epsilon_is_opacus_rdp_stepped_one_step_at_a_time(history):
    assert filter_epsilon(history, DELTA) == pytest.approx(opacus_stepped(history, DELTA), rel=1e-9)


@pytest.mark.parametrize("history", HISTORIES, ids=range(len(HISTORIES)))
def test_pld_figures_bracket_dp_accountings_own_pld(history):
    reference = google_pld(history, DELTA)
    assert pld_epsilon_optimistic(history, DELTA) <= reference * (1 + 1e-3)
    assert reference * (1 - 1e-3) <= pld_epsilon(history, DELTA) <= reference * 1.02
    assert pld_epsilon(history, DELTA) <= filter_epsilon(history, DELTA)  # RDP is the looser one


@pytest.mark.parametrize("history", HISTORIES, ids=range(len(HISTORIES)))
def test_the_audit_floor_accepts_the_enforced_figure_and_refuses_half_a_percent_less(history):
    enforced = filter_epsilon(history, DELTA)
    assert independent_rdp_epsilon(history, DELTA) == pytest.approx(enforced, rel=1e-2)
    assert epsilon_floor(history, DELTA) <= enforced < epsilon_floor(history, DELTA) / 0.995
