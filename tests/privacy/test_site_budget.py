"""SiteBudget: epsilon agrees with an independent accountant, refusals, crash safety."""

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

from privacy.site_budget import (
    BudgetExceeded,
    SiteBudget,
    composed_epsilon,
    dataset_fingerprint,
)

REPO = Path(__file__).resolve().parents[2]
DELTA = 1e-5
FP = dataset_fingerprint([("site0/a.mp4", "h1"), ("site0/b.mp4", "h2")])


def google_pld_epsilon(history, delta):
    """The independent reference: Google dp_accounting's PLD accountant, written out here."""
    acc = dp_accounting.pld.PLDAccountant()
    for sigma, q, steps in history:
        event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
        acc.compose(dp_accounting.SelfComposedDpEvent(event, steps))
    return acc.get_epsilon(delta)


@pytest.mark.parametrize(
    "rounds",
    [
        [(1.0, 0.04, 500)],                                   # the documented example
        [(2.0, 0.05, 100)],                                   # small epsilon
        [(0.7, 0.02, 150)],                                   # large epsilon
        [(1.1, 0.02, 100), (0.9, 0.02, 100), (1.5, 0.05, 40)],  # rounds with new sigmas
        [(1.0, 0.1, 30), (1.0, 0.1, 30), (1.0, 0.1, 30)],       # identical rounds merge
    ],
)
def test_spent_matches_google_pld_within_1_percent(tmp_path, rounds):
    budget = SiteBudget(tmp_path, FP, epsilon_budget=math.inf, delta=DELTA)
    for i, (sigma, q, steps) in enumerate(rounds):
        projected = budget.project(sigma, q, steps)
        entry = budget.charge(sigma, q, steps, round_id=i, run_id="r")
        assert entry["epsilon_after"] == pytest.approx(projected)
        reference = google_pld_epsilon(rounds[: i + 1], DELTA)
        assert budget.spent() == pytest.approx(reference, rel=0.01)
        # PRV is an upper bound: it must not report LESS than PLD by more than noise.
        assert budget.spent() >= reference * (1 - 1e-3)
    assert budget.total_steps() == sum(s for _, _, s in rounds)


def test_rdp_budget_is_looser_than_prv(tmp_path):
    prv = SiteBudget(tmp_path / "prv", FP, math.inf, DELTA, accountant="prv")
    rdp = SiteBudget(tmp_path / "rdp", FP, math.inf, DELTA, accountant="rdp")
    for b in (prv, rdp):
        b.charge(1.0, 0.04, 200)
    assert rdp.spent() > prv.spent() * 1.03


def test_empty_budget_spends_nothing_and_noise_zero_is_infinite(tmp_path):
    budget = SiteBudget(tmp_path, FP, 8.0, DELTA)
    assert budget.spent() == 0.0
    assert budget.project(0.0, 0.1, 1) == math.inf
    assert not budget.fits(0.0, 0.1, 1)


def test_site_at_its_budget_refuses_and_state_file_is_unchanged(tmp_path):
    at_budget = composed_epsilon([(1.0, 0.05, 60)], DELTA)
    budget = SiteBudget(tmp_path, FP, epsilon_budget=at_budget, delta=DELTA)
    assert budget.fits(1.0, 0.05, 60)
    budget.charge(1.0, 0.05, 60, round_id=1, run_id="r")
    assert budget.spent() == pytest.approx(at_budget)
    before = budget.path.read_bytes()
    assert not budget.fits(1.0, 0.05, 1)
    with pytest.raises(BudgetExceeded) as exc:
        budget.charge(1.0, 0.05, 1, round_id=2, run_id="r")
    msg = str(exc.value)
    assert f"{at_budget:g}" in msg and "spent" in msg and "projected" in msg
    assert budget.path.read_bytes() == before
    assert [r["round"] for r in SiteBudget(tmp_path, FP, at_budget, DELTA).rounds()] == [1]


def test_budget_is_keyed_by_dataset_fingerprint_only(tmp_path):
    a = SiteBudget(tmp_path, FP, 10.0, DELTA)
    a.charge(1.0, 0.05, 20, round_id=1, run_id="run-a", max_grad_norm=1.0)
    # New noise, new clipping, new run: same budget, growing history.
    b = SiteBudget(tmp_path, FP, 10.0, DELTA)
    b.charge(1.3, 0.05, 20, round_id=1, run_id="run-b", max_grad_norm=0.5)
    assert b.history() == [(1.0, 0.05, 20), (1.3, 0.05, 20)]
    assert a.spent() == b.spent() > composed_epsilon([(1.0, 0.05, 20)], DELTA)
    other = SiteBudget(tmp_path, dataset_fingerprint([("site0/a.mp4", "CHANGED")]), 10.0, DELTA)
    assert other.spent() == 0.0
    with pytest.raises(ValueError, match="delta"):
        SiteBudget(tmp_path, FP, 10.0, 1e-6)


def test_accountant_snapshot_is_restored_from_the_charged_history(tmp_path):
    budget = SiteBudget(tmp_path, FP, 10.0, DELTA)
    budget.charge(1.0, 0.05, 20)
    budget.charge(1.2, 0.05, 10)
    acc = budget.accountant()
    assert acc.mechanism() == "prv"
    assert acc.state_dict()["history"] == [(1.0, 0.05, 20), (1.2, 0.05, 10)]
    assert acc.get_epsilon(DELTA) == pytest.approx(budget.spent(), abs=0.02)
    acc.step(noise_multiplier=1.2, sample_rate=0.05)  # a snapshot: the file does not change
    assert budget.total_steps() == 30


def test_dataset_fingerprint_is_order_independent_and_content_sensitive():
    items = [("b.mp4", "2"), ("a.mp4", "1")]
    assert dataset_fingerprint(items) == dataset_fingerprint(reversed(items))
    assert dataset_fingerprint(items) != dataset_fingerprint([("b.mp4", "2"), ("a.mp4", "X")])
    assert dataset_fingerprint(items) != dataset_fingerprint(items[:1])


CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from privacy.site_budget import SiteBudget
    b = SiteBudget(Path(sys.argv[1]), sys.argv[2], 50.0, 1e-5)
    b.charge(1.0, 0.05, 40, round_id=1, run_id="run")   # round 1 completes
    b.confirm(1, "run", 40)
    b.charge(1.0, 0.05, 40, round_id=2, run_id="run")   # round 2: write-ahead ...
    print("TRAINING", flush=True)                          # ... then "training"
    time.sleep(60)
    """
)


def test_site_killed_mid_round_resumes_and_epsilon_never_goes_back(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path), FP],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=REPO, text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.strip() == "TRAINING", proc.stderr.read()
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=10) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    restarted = SiteBudget(tmp_path, FP, 50.0, DELTA)
    assert restarted.history() == [(1.0, 0.05, 80)]  # the crashed round stays charged
    rounds = restarted.rounds()
    assert [r["round"] for r in rounds] == [1, 2]
    assert rounds[1]["steps_taken"] is None            # never confirmed: it crashed
    eps_round1 = composed_epsilon([(1.0, 0.05, 40)], DELTA)
    assert restarted.spent() > eps_round1
    assert restarted.spent() == pytest.approx(rounds[1]["epsilon_after"])
    # The resumed site continues from there; epsilon only grows.
    restarted.charge(1.0, 0.05, 40, round_id=3, run_id="run")
    assert restarted.spent() > rounds[1]["epsilon_after"]
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))


def test_confirm_refuses_more_steps_than_charged(tmp_path):
    budget = SiteBudget(tmp_path, FP, 10.0, DELTA)
    budget.charge(1.0, 0.05, 20, round_id=1, run_id="r")
    with pytest.raises(RuntimeError, match="only 20 were charged"):
        budget.confirm(1, "r", 21)
    budget.confirm(1, "r", 20)
    assert budget.rounds()[0]["steps_taken"] == 20
