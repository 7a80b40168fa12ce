"""SiteBudget: per-unit accounting against independent accountants, refusals, crash safety."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import dp_accounting
import pytest
from opacus.accountants import RDPAccountant

from privacy.accounting import filter_epsilon, pld_epsilon, pld_epsilon_optimistic
from privacy.site_budget import BudgetExceeded, SiteBudget

REPO = Path(__file__).resolve().parents[2]
DELTA = 1e-5


def google_pld(history, delta):
    """The independent reference: Google dp_accounting's PLD accountant, written out here."""
    acc = dp_accounting.pld.PLDAccountant()
    for sigma, q, steps in history:
        event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
        acc.compose(dp_accounting.SelfComposedDpEvent(event, steps))
    return acc.get_epsilon(delta)


def opacus_rdp(history, delta):
    acc = RDPAccountant()
    acc.history = list(history)
    return acc.get_epsilon(delta)


HISTORIES = [
    [(1.0, 0.04, 500)],
    [(2.0, 0.05, 100)],
    [(0.7, 0.02, 150)],
    [(1.1, 0.02, 100), (0.9, 0.02, 100), (1.5, 0.05, 40)],
]


@pytest.mark.parametrize("history", HISTORIES)
def test_the_accountants_agree_with_independent_references(history):
    assert filter_epsilon(history, DELTA) == pytest.approx(opacus_rdp(history, DELTA), rel=1e-9)
    assert pld_epsilon(history, DELTA) == pytest.approx(google_pld(history, DELTA), rel=0.01)
    assert pld_epsilon_optimistic(history, DELTA) <= google_pld(history, DELTA)
    # The enforced RDP figure is never below the tight one: enforcing it is safe.
    assert filter_epsilon(history, DELTA) >= pld_epsilon(history, DELTA)


def test_each_unit_composes_only_the_rounds_it_was_in_and_the_site_is_the_maximum(tmp_path):
    budget = SiteBudget(tmp_path, 100.0, DELTA)
    budget.charge(["a", "b"], 1.0, 0.05, 40, run_id="r1", round=1, max_grad_norm=1.0)
    budget.charge(["b", "c"], 1.2, 0.1, 20, run_id="r2", round=1, max_grad_norm=1.0)  # another split
    assert budget.unit_history("a") == ((1.0, 0.05, 40),)
    assert budget.unit_history("b") == ((1.0, 0.05, 40), (1.2, 0.1, 20))
    assert budget.unit_history("c") == ((1.2, 0.1, 20),)
    assert budget.unit_history("new") == ()
    assert budget.epsilon() == pytest.approx(opacus_rdp(budget.unit_history("b"), DELTA))
    assert budget.epsilon_pld() == pytest.approx(google_pld(budget.unit_history("b"), DELTA), rel=0.01)
    assert budget.unit_count() == 3


def test_a_unit_at_its_budget_refuses_and_the_file_is_unchanged(tmp_path):
    one_round, two_rounds = filter_epsilon([(1.0, 0.05, 40)], DELTA), filter_epsilon([(1.0, 0.05, 80)], DELTA)
    budget = SiteBudget(tmp_path, (one_round + two_rounds) / 2, DELTA)
    budget.charge(["a"], 1.0, 0.05, 40, run_id="r", round=1, max_grad_norm=1.0)
    before = (tmp_path / "budget.json").read_bytes()
    with pytest.raises(BudgetExceeded, match="over its budget"):
        budget.charge(["a", "b"], 1.0, 0.05, 40, run_id="r", round=2, max_grad_norm=1.0)
    assert (tmp_path / "budget.json").read_bytes() == before
    # Units that were never charged may still train on their own.
    budget.charge(["b", "c"], 1.0, 0.05, 40, run_id="r", round=3, max_grad_norm=1.0)
    assert budget.epsilon() == pytest.approx(one_round)


def test_unit_and_delta_are_fixed_for_the_life_of_the_budget(tmp_path):
    SiteBudget(tmp_path, 8.0, DELTA)
    with pytest.raises(ValueError, match="delta"):
        SiteBudget(tmp_path, 8.0, 1e-6)
    with pytest.raises(ValueError, match="unit"):
        SiteBudget(tmp_path, 8.0, DELTA, unit="clip")
    SiteBudget(tmp_path, 4.0, DELTA)  # a new budget value is fine, and recorded
    assert SiteBudget.open_existing(tmp_path).epsilon_budget == 4.0


def test_units_released_without_dp_make_the_site_infinite_and_refuse_charges(tmp_path):
    budget = SiteBudget(tmp_path, 8.0, DELTA)
    budget.release_without_dp(["v1"], run_id="r", round=1, what="exact evaluation")
    assert budget.epsilon() == math.inf and budget.released_count() == 1
    with pytest.raises(BudgetExceeded):
        budget.charge(["v2"], 1.0, 0.05, 10, run_id="r", round=2, max_grad_norm=1.0)


CHILD = textwrap.dedent(
    """
    import sys, time
    from privacy.site_budget import SiteBudget
    budget = SiteBudget(sys.argv[1], 50.0, 1e-5)
    budget.charge(["a", "b"], 1.0, 0.05, 40, run_id="run", round=1, max_grad_norm=1.0)
    budget.confirm("run", 1, 40)
    budget.charge(["a", "b"], 1.0, 0.05, 40, run_id="run", round=2, max_grad_norm=1.0)  # write-ahead
    print("TRAINING", flush=True)
    time.sleep(60)  # killed here, mid-round
    """
)


def test_a_site_killed_mid_round_keeps_the_round_charged(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, cwd=REPO, text=True)
    try:
        assert proc.stdout.readline().strip() == "TRAINING", proc.stderr.read()
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=10) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    restarted = SiteBudget.open_existing(tmp_path)
    assert restarted.unit_history("a") == ((1.0, 0.05, 80),)  # the crashed round stays charged
    assert [c["steps_taken"] for c in restarted.charges()] == [40, None]
    assert restarted.epsilon() > filter_epsilon([(1.0, 0.05, 40)], DELTA)
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))


def test_confirm_refuses_more_steps_than_charged(tmp_path):
    budget = SiteBudget(tmp_path, 10.0, DELTA)
    budget.charge(["a"], 1.0, 0.05, 20, run_id="r", round=1, max_grad_norm=1.0)
    with pytest.raises(RuntimeError, match="only 20 were charged"):
        budget.confirm("r", 1, 21)
    budget.confirm("r", 1, 20)
    assert budget.charges()[0]["steps_taken"] == 20
