"""`fedvid audit`: an honest run passes; tampering, forged epsilons and overspending fail."""

from __future__ import annotations

import json
import math
import shutil

import dp_accounting
import pytest
from rich.console import Console

from privacy.audit import (
    EXIT_CHAIN,
    EXIT_OVER_BUDGET,
    EXIT_RECOMPUTE,
    audit_run,
    exit_code,
    plot_epsilon,
    render_table,
    run_audit_command,
)
from privacy.ledger import (
    PrivacyLedger,
    central_record,
    dp_off_record,
    site_record,
    site_record_from_charge,
    site_refusal_record,
)
from privacy.site_budget import BudgetExceeded, SiteBudget, composed_epsilon, dataset_fingerprint

DELTA = 1e-5
SITES = {"site-a": (1.0, 0.05, 30), "site-b": (1.4, 0.1, 20)}  # sigma, q, steps per round
BUDGET = {"site-a": 2.45, "site-b": 20.0}
ROUNDS = 2
CENTRAL = dict(sampled_clients=2, total_clients=4, server_noise_multiplier=1.2,
               update_clip_norm=0.5)


def google_pld(history, delta):
    acc = dp_accounting.pld.PLDAccountant()
    for sigma, q, steps in history:
        ev = dp_accounting.GaussianDpEvent(sigma)
        if q < 1:
            ev = dp_accounting.PoissonSampledDpEvent(q, ev)
        acc.compose(dp_accounting.SelfComposedDpEvent(ev, steps))
    return acc.get_epsilon(delta)


@pytest.fixture(scope="module")
def honest_run(tmp_path_factory):
    """A run written the way the ClientApp/ServerApp will write it: charge, then record."""
    run = tmp_path_factory.mktemp("run")
    ledger = PrivacyLedger(run / "ledger.jsonl")
    budgets = {
        sid: SiteBudget(run / "budgets", dataset_fingerprint([(f"{sid}/v.mp4", sid)]),
                        BUDGET[sid], DELTA)
        for sid in SITES
    }
    central_hist = []
    for rnd in range(1, ROUNDS + 1):
        for sid, (sigma, q, steps) in SITES.items():
            b = budgets[sid]
            try:
                charge = b.charge(sigma, q, steps, round_id=rnd, run_id="run-1")
            except BudgetExceeded as exc:
                ledger.append(site_refusal_record(
                    b, str(exc), site_id=sid, run_id="run-1", round=rnd,
                    noise_multiplier=sigma, sample_rate=q, requested_steps=steps,
                    max_grad_norm=1.0))
                continue
            ledger.append(site_record_from_charge(b, charge, site_id=sid, run_id="run-1",
                                                  round=rnd, max_grad_norm=1.0))
        q_c = CENTRAL["sampled_clients"] / CENTRAL["total_clients"]
        central_hist.append((CENTRAL["server_noise_multiplier"], q_c, 1))
        ledger.append(central_record(
            run_id="run-1", round=rnd, delta=DELTA, accountant="prv", sampling="poisson",
            epsilon_cumulative=composed_epsilon(central_hist, DELTA), **CENTRAL))
    return run


@pytest.fixture()
def run_copy(honest_run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(honest_run, dst)
    return dst


def test_honest_run_passes_and_matches_google_pld(honest_run):
    report = audit_run(honest_run)
    assert report.chain_ok and report.recomputed_ok and exit_code(report) == 0
    a, b = report.sites["site-a"], report.sites["site-b"]
    # site-a's budget fits one round only: round 2 was refused, and that is recorded.
    assert [r.refused for r in a.rounds] == [False, True]
    assert a.epsilon == pytest.approx(google_pld([SITES["site-a"]], DELTA), rel=0.01)
    sigma, q, steps = SITES["site-b"]
    assert b.epsilon == pytest.approx(google_pld([(sigma, q, steps * 2)], DELTA), rel=0.01)
    assert a.status == "near" and any("site-a is near" in w for w in report.warnings)
    central_ref = google_pld([(1.2, 0.5, ROUNDS)], DELTA)
    assert report.central.epsilon == pytest.approx(central_ref, rel=0.01)
    data = json.loads(report.to_json())
    assert data["chain_ok"] is True and data["recomputed_ok"] is True
    site = data["sites"]["site-b"]
    assert {"epsilon", "delta", "budget", "rounds"} <= site.keys()
    assert site["delta"] == DELTA and site["budget"] == 20.0 and len(site["rounds"]) == 2
    assert data["central"]["sampling"] == "poisson" and data["central"]["delta"] == DELTA


def test_rdp_as_independent_accountant_accepts_prv_records(honest_run):
    assert exit_code(audit_run(honest_run, independent="rdp")) == 0


def _rewrite(path, fn):
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(fn(lines)))


@pytest.mark.parametrize(
    "tamper",
    [
        lambda ls: ls[:1] + [ls[1].replace(b'"local_steps":20', b'"local_steps":2')] + ls[2:],
        lambda ls: ls[:1] + ls[2:],                 # deleted line
        lambda ls: ls[:-1] + [ls[-1][:-30]],        # truncated last line
    ],
    ids=["edited", "deleted", "truncated"],
)
def test_tampered_ledger_fails_the_audit(run_copy, tamper):
    _rewrite(run_copy / "ledger.jsonl", tamper)
    report = audit_run(run_copy)
    assert not report.chain_ok
    assert exit_code(report) & EXIT_CHAIN


def test_forged_epsilon_with_a_valid_chain_fails_recomputation(run_copy):
    ledger = PrivacyLedger(run_copy / "ledger.jsonl")
    forged = site_record(
        site_id="site-b", run_id="run-1", round=3, local_steps=20, sample_rate=0.1,
        noise_multiplier=1.4, max_grad_norm=1.0, delta=DELTA, epsilon_round=0.5,
        epsilon_cumulative=1.0,  # far below what 60 steps at sigma 1.4, q 0.1 cost
        epsilon_budget=20.0, accountant="prv", history=[(1.4, 0.1, 60)],
    )
    ledger.append(forged)
    report = audit_run(run_copy)
    assert report.chain_ok and not report.recomputed_ok
    assert exit_code(report) == EXIT_RECOMPUTE


def test_history_that_drops_steps_fails_recomputation(run_copy):
    honest_eps = composed_epsilon([(1.4, 0.1, 20)], DELTA)
    PrivacyLedger(run_copy / "ledger.jsonl").append(site_record(
        site_id="site-b", run_id="run-1", round=3, local_steps=20, sample_rate=0.1,
        noise_multiplier=1.4, max_grad_norm=1.0, delta=DELTA, epsilon_round=honest_eps,
        epsilon_cumulative=honest_eps, epsilon_budget=20.0, accountant="prv",
        history=[(1.4, 0.1, 20)],  # consistent with its epsilon, but forgets 40 steps
    ))
    assert exit_code(audit_run(run_copy)) & EXIT_RECOMPUTE


def test_site_over_budget_fails(run_copy):
    eps = composed_epsilon([(1.4, 0.1, 60)], DELTA)
    PrivacyLedger(run_copy / "ledger.jsonl").append(site_record(
        site_id="site-b", run_id="run-1", round=3, local_steps=20, sample_rate=0.1,
        noise_multiplier=1.4, max_grad_norm=1.0, delta=DELTA,
        epsilon_round=composed_epsilon([(1.4, 0.1, 20)], DELTA), epsilon_cumulative=eps,
        epsilon_budget=eps * 0.9, accountant="prv", history=[(1.4, 0.1, 60)],
    ))
    report = audit_run(run_copy)
    assert report.over_budget == ["site-b"]
    assert exit_code(report) == EXIT_OVER_BUDGET


def test_dp_off_is_infinite_and_never_within_a_budget(run_copy):
    ledger = PrivacyLedger(run_copy / "ledger.jsonl")
    ledger.append(dp_off_record(run_id="run-1", round=3, site_id="site-c"))
    report = audit_run(run_copy)
    assert report.sites["site-c"].status == "dp-off" and exit_code(report) == 0
    assert json.loads(report.to_json())["sites"]["site-c"]["epsilon"] == "inf"
    ledger.append(dp_off_record(run_id="run-1", round=3, site_id="site-b",
                                epsilon_budget=20.0))
    report = audit_run(run_copy)
    assert report.sites["site-b"].epsilon == math.inf
    assert exit_code(report) == EXIT_OVER_BUDGET
    console = Console(record=True, width=150)
    console.print(render_table(report))
    assert "∞" in console.export_text()


def test_command_prints_json_and_plots(honest_run, tmp_path, capsys):
    png = tmp_path / "eps.png"
    assert run_audit_command(honest_run, as_json=True, plot=png) == 0
    assert json.loads(capsys.readouterr().out)["exit_code"] == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert run_audit_command(tmp_path / "no-such-run", as_json=False, plot=None) & EXIT_CHAIN
    assert plot_epsilon(audit_run(honest_run), tmp_path / "p2.png").exists()
