"""`fedvid audit` against a hostile coordinator: an honest run passes with the sites' pinned keys;
edited, forged, re-chained, replayed or under-stated records fail; "inf" and empty ledgers are
never a clean result. (Site directories and budget files: test_audit_site_dir.py.)"""

from __future__ import annotations

import json
import math
import shutil

import pytest
from rich.console import Console

from client.cli import main as fedvid
from privacy.accounting import filter_epsilon, pld_epsilon, pld_epsilon_optimistic
from privacy.audit import (
    EXIT_CHAIN,
    EXIT_OVER_BUDGET,
    EXIT_RECOMPUTE,
    audit_run,
    epsilon_floor,
    exit_code,
    plot_epsilon,
    render_table,
    run_audit_command,
)
from privacy.ledger import PrivacyLedger, SiteLedger, central_record, dp_off_record

from honest_sites import DELTA, Site, central, keys_file, rechain, write_run

RUN = "run-1"
SITES = {"site-a": (0.7, 0.05, 30), "site-b": (1.0, 0.05, 30)}  # sigma, q, steps per round
BUDGET = {"site-a": 10.0, "site-b": 8.0}


@pytest.fixture(scope="module")
def honest(tmp_path_factory):
    """Two sites (their privacy dirs outside the run dir, as in a deployment), two rounds, and
    the central mechanism; returns (root, pinned keys)."""
    root = tmp_path_factory.mktemp("honest")
    sites = {sid: Site(root / "private" / sid, sid, budget=BUDGET[sid]) for sid in SITES}
    records = []
    for rnd in (1, 2):
        for sid, (sigma, q, steps) in SITES.items():
            records.append(sites[sid].train(RUN, rnd, sigma, q, steps))
        records.append(central(RUN, rnd))
    write_run(root / "run", records)
    return root, {sid: s.key for sid, s in sites.items()}


@pytest.fixture()
def copy(honest, tmp_path):
    """A copy of the honest run to tamper with: (run dir, pinned keys, site privacy dirs)."""
    root, keys = honest
    shutil.copytree(root, tmp_path / "c")
    return tmp_path / "c" / "run", keys, tmp_path / "c" / "private"


def test_honest_run_passes_with_pinned_keys(honest):
    root, keys = honest
    report = audit_run(root / "run", site_keys=keys)
    assert exit_code(report) == 0, report.errors
    assert report.keys == "pinned" and "hostile coordinator" in report.verified_against
    a = report.sites["site-a"]
    assert a.unit == "video" and a.signatures == "valid" and len(a.rounds) == 2
    assert a.epsilon == filter_epsilon([(0.7, 0.05, 60)], DELTA)
    assert a.epsilon_pld == pld_epsilon([(0.7, 0.05, 60)], DELTA) < a.epsilon  # PLD beside, tighter
    assert report.central.epsilon == pld_epsilon([(1.5, 1.0, 2)], DELTA)
    data = json.loads(report.to_json())
    assert data["exit_code"] == 0 and data["threat_model"]["keys"] == "pinned"
    assert data["verified_against"].startswith("a hostile coordinator")
    site = data["sites"]["site-b"]
    assert {"unit", "epsilon", "epsilon_pld", "budget", "status", "rounds", "delta"} <= site.keys()
    assert (site["unit"], site["budget"], site["status"], len(site["rounds"])) == ("video", 8.0, "ok", 2)
    assert data["central"]["sampling"] == "none" and "arithmetic only" in data["central"]["verified"]


def test_without_keys_the_audit_is_arithmetic_only_and_says_so(honest):
    report = audit_run(honest[0] / "run")
    assert report.keys == "none" and report.verified_against == "signatures not verified: arithmetic only"
    assert any("signatures not verified" in w for w in report.warnings)
    assert {s.signatures for s in report.sites.values()} == {"unverified"}


def _sigma_to_3(recs):
    """The attack: site-a's sigma 0.7 -> 3.0, every epsilon recomputed to match."""
    for r in recs:
        if r.get("site_id") == "site-a":
            steps = r["local_steps"]
            r["noise_multiplier"], r["history"] = 3.0, [[3.0, 0.05, steps * r["round"]]]
            r["epsilon_round"] = filter_epsilon([(3.0, 0.05, steps)], DELTA)
            r["epsilon_cumulative"] = filter_epsilon(r["history"], DELTA)
            r["epsilon_pld"] = pld_epsilon(r["history"], DELTA)
    return recs


def test_rewritten_sigma_and_rechained_fails_with_pinned_keys(copy):
    run, keys, _ = copy
    rechain(run / "ledger.jsonl", _sigma_to_3)
    arithmetic = audit_run(run)
    assert exit_code(arithmetic) == 0  # consistent arithmetic: only the signatures can tell
    assert arithmetic.sites["site-a"].epsilon < 1.0
    report = audit_run(run, site_keys=keys)
    assert exit_code(report) & EXIT_CHAIN and not report.chain_ok
    assert sum("not signed by that site's key" in e for e in report.errors) == 2
    assert report.sites["site-a"].signatures == "invalid" and report.sites["site-b"].signatures == "valid"


def _forged(kind, tmp_path, honest_record):
    coordinator = SiteLedger(tmp_path / "coordinator")  # a key of the coordinator's own
    if kind == "relabelled":
        return dict(honest_record, site_id="site-b")  # site-a's genuine record, renamed
    if kind == "site":
        return coordinator.append(Site(tmp_path / "x", "site-b").record(RUN, 3, 5.0, 0.05, 30))
    if kind == "dp-off":
        return dp_off_record(run_id=RUN, round=3, site_id="site-b", unit="video")
    if kind == "signed-dp-off":
        return coordinator.append(dp_off_record(run_id=RUN, round=3, site_id="site-b", unit="video"))
    return dict(central(RUN, 3), site_id="site-b")


@pytest.mark.parametrize("kind", ["relabelled", "site", "dp-off", "signed-dp-off", "central"])
def test_a_record_under_another_sites_id_fails(copy, tmp_path, kind):
    run, keys, _ = copy
    ledger = PrivacyLedger(run / "ledger.jsonl")
    genuine = {k: v for k, v in ledger.records()[0].items() if k not in ("seq", "prev_hash", "hash")}
    assert genuine["site_id"] == "site-a"
    ledger.append(_forged(kind, tmp_path, genuine))
    report = audit_run(run, site_keys=keys)
    assert exit_code(report) & EXIT_CHAIN, report.errors
    assert any("site-b" in e for e in report.errors)


def _two_round_site(tmp_path, run, override_round_2):
    site = Site(tmp_path / "site-c", "site-c", budget=None)
    first = site.train(RUN, 1, 1.0, 0.05, 30)
    write_run(run, [first, site.train(RUN, 2, 1.0, 0.05, 30, **override_round_2(site))])
    return {"site-c": site.key}


HISTORY_2 = [(1.0, 0.05, 60)]


@pytest.mark.parametrize("override, bits", [
    (lambda s: {"epsilon_cumulative": 0.995 * filter_epsilon(HISTORY_2, DELTA)}, EXIT_RECOMPUTE),
    (lambda s: {"epsilon_round": 0.995 * filter_epsilon([(1.0, 0.05, 30)], DELTA)}, EXIT_RECOMPUTE),
    (lambda s: {"epsilon_pld": 0.995 * pld_epsilon_optimistic(HISTORY_2, DELTA)}, EXIT_RECOMPUTE),
    (lambda s: {"epsilon_cumulative": pld_epsilon(HISTORY_2, DELTA)}, EXIT_RECOMPUTE),  # PLD is not the filter
    (lambda s: {"history": [[1.0, 0.05, 10]]}, EXIT_RECOMPUTE),  # the worst unit's history shrinks
    (lambda s: {"epsilon_cumulative": 1.05 * filter_epsilon(HISTORY_2, DELTA)}, 0),
    (lambda s: {"epsilon_round": 1.05 * filter_epsilon([(1.0, 0.05, 30)], DELTA)}, 0),
    (lambda s: {"epsilon_pld": 1.05 * pld_epsilon(HISTORY_2, DELTA)}, 0),
    (lambda s: {"epsilon_cumulative": math.inf, "epsilon_pld": math.inf}, 0),  # over-stating is safe
], ids=["cumulative-0.5%-under", "round-0.5%-under", "pld-under-optimistic", "pld-as-enforced",
        "history-shrinks", "cumulative-over", "round-over", "pld-over", "inf-over"])
def test_understated_epsilons_fail_and_overstated_ones_pass(tmp_path, override, bits):
    keys = _two_round_site(tmp_path, tmp_path / "run", override)
    report = audit_run(tmp_path / "run", site_keys=keys)
    assert exit_code(report) == bits, report.errors


def test_the_floor_is_one_sided_and_close_below_the_enforced_epsilon():
    h = [(1.0, 0.05, 60)]
    assert pld_epsilon_optimistic(h, DELTA) < epsilon_floor(h, DELTA) < filter_epsilon(h, DELTA)
    assert epsilon_floor(h, DELTA) >= 0.999 * filter_epsilon(h, DELTA) * (1 - 1e-9)
    assert epsilon_floor([(0.0, 0.05, 1)], DELTA) == math.inf and epsilon_floor([], DELTA) == 0.0
    # The run config's default plan (target epsilon 8, q = 1/4, 16 rounds of 12 steps): there
    # dp-accounting's RDP is 0.36% above Opacus's exact one, and the honest figure must pass.
    honest = [(2.3828125, 0.25, 192)]
    assert epsilon_floor(honest, DELTA) <= filter_epsilon(honest, DELTA)


def test_a_site_that_released_units_without_dp_is_infinite_and_over_budget(tmp_path):
    site = Site(tmp_path / "s", "site-r", budget=8.0)
    write_run(tmp_path / "run", [site.train(RUN, 1, 1.0, 0.05, 30),
                                 site.train(RUN, 2, 1.0, 0.05, 30, released_without_dp=2)])
    report = audit_run(tmp_path / "run", site_keys={"site-r": site.key})
    assert report.sites["site-r"].epsilon == math.inf and report.recomputed_ok and report.chain_ok
    assert exit_code(report) == EXIT_OVER_BUDGET
    assert json.loads(report.to_json())["sites"]["site-r"]["epsilon"] == "inf"
    console = Console(record=True, width=160)
    console.print(render_table(report))
    assert "∞" in console.export_text()


def test_a_finite_epsilon_where_inf_is_due_fails(tmp_path):
    site = Site(tmp_path / "s", "site-r", budget=None)
    released = site.record(RUN, 1, 1.0, 0.05, 30, released_without_dp=1)
    released["epsilon_cumulative"] = filter_epsilon([(1.0, 0.05, 30)], DELTA)  # hides the release
    noiseless = site.record(RUN, 2, 0.0, 0.05, 30)  # sigma 0 costs inf, whatever it says
    noiseless["epsilon_cumulative"] = noiseless["epsilon_round"] = 5.0
    for rec in (released, noiseless):
        run = tmp_path / f"run-{rec['round']}"
        write_run(run, [site.ledger.append(rec)])
        assert exit_code(audit_run(run, site_keys={"site-r": site.key})) & EXIT_RECOMPUTE


def test_after_inf_an_epsilon_can_only_stay_inf(tmp_path):
    site = Site(tmp_path / "s", "site-d", budget=None)
    off = site.ledger.append(dp_off_record(run_id=RUN, round=1, site_id="site-d", unit="video"))
    write_run(tmp_path / "run", [off])
    report = audit_run(tmp_path / "run", site_keys={"site-d": site.key})
    assert report.sites["site-d"].status == "dp-off" and exit_code(report) == 0
    assert any("trained without DP" in w for w in report.warnings)
    PrivacyLedger(tmp_path / "run" / "ledger.jsonl").append(site.train(RUN, 2, 1.0, 0.05, 30))
    report = audit_run(tmp_path / "run", site_keys={"site-d": site.key})
    assert exit_code(report) & EXIT_RECOMPUTE and any("decreased" in e for e in report.errors)
    assert report.sites["site-d"].epsilon == math.inf


def test_dp_off_is_never_within_a_budget(tmp_path):
    site = Site(tmp_path / "s", "site-d")
    trained = site.train(RUN, 1, 1.0, 0.05, 30)
    off = site.ledger.append(dp_off_record(run_id=RUN, round=2, site_id="site-d", epsilon_budget=8.0))
    write_run(tmp_path / "run", [trained, off])
    report = audit_run(tmp_path / "run", site_keys={"site-d": site.key})
    assert report.over_budget == ["site-d"] and exit_code(report) == EXIT_OVER_BUDGET


def test_an_empty_ledger_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "ledger.jsonl").write_bytes(b"")
    write_run(tmp_path / "central-only", [central(RUN, 1), central(RUN, 2)])
    for run in ("empty", "central-only", "missing"):
        report = audit_run(tmp_path / run)
        assert exit_code(report) & EXIT_CHAIN, run
        assert report.sites == {}
    assert any("no site record" in e for e in audit_run(tmp_path / "empty").errors)


def test_a_change_of_delta_or_unit_is_an_error(tmp_path):
    site = Site(tmp_path / "s", "site-u")
    first = site.train(RUN, 1, 1.0, 0.05, 30)
    for field, value in (("delta", 1e-6), ("unit", "clip")):
        run = tmp_path / f"run-{field}"
        write_run(run, [first, site.ledger.append(site.record(RUN, 2, 1.0, 0.05, 30, **{field: value}))])
        report = audit_run(run, site_keys={"site-u": site.key})
        assert exit_code(report) & EXIT_RECOMPUTE and any("changed" in e for e in report.errors), field


def test_a_replayed_or_reordered_record_is_caught(copy):
    run, keys, _ = copy
    ledger = PrivacyLedger(run / "ledger.jsonl")
    first = {k: v for k, v in ledger.records()[0].items() if k not in ("seq", "prev_hash", "hash")}
    ledger.append(first)  # site-a's round 1, again, after its round 2
    report = audit_run(run, site_keys=keys)
    assert exit_code(report) & EXIT_CHAIN and any("replayed" in e for e in report.errors)


def test_a_central_epsilon_that_claims_amplification_fails(tmp_path):
    site = Site(tmp_path / "s", "site-a")
    amplified = central_record(run_id=RUN, round=1, sites_expected=4, sites_contributed=2,
                               server_noise_multiplier=1.5, update_clip_norm=0.5, delta=DELTA,
                               epsilon_cumulative=pld_epsilon([(1.5, 0.5, 1)], DELTA))
    write_run(tmp_path / "run", [site.train(RUN, 1, 1.0, 0.05, 30), amplified])
    report = audit_run(tmp_path / "run", site_keys={"site-a": site.key})
    assert exit_code(report) == EXIT_RECOMPUTE and any("central round 1" in e for e in report.errors)
    too_many = dict(central(RUN, 1), sites_contributed=3)
    write_run(tmp_path / "run2", [site.ledger.append(site.record(RUN, 2, 1.0, 0.05, 30)), too_many])
    assert exit_code(audit_run(tmp_path / "run2", site_keys={"site-a": site.key})) & EXIT_RECOMPUTE


def test_command_takes_pinned_keys_prints_json_and_plots(honest, tmp_path, capsys):
    root, keys = honest
    pinned = tmp_path / "keys.json"
    pinned.write_text(json.dumps(keys))
    png = tmp_path / "eps.png"
    assert run_audit_command(root / "run", as_json=True, plot=png, site_keys=pinned) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["exit_code"] == 0 and data["threat_model"]["keys"] == "pinned"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert fedvid(["audit", str(root / "run"), "--site-keys", str(pinned)]) == 0
    out = capsys.readouterr().out
    assert "verified against: a hostile coordinator" in out and "video" in out
    assert run_audit_command(tmp_path / "no-such-run") & EXIT_CHAIN
    assert plot_epsilon(audit_run(root / "run"), tmp_path / "p2.png").exists()
    pinned.write_text(json.dumps({"site-a": "not a key"}))
    assert fedvid(["audit", str(root / "run"), "--site-keys", str(pinned)]) == 2
    assert "site-a" in capsys.readouterr().err


def test_ledger_key_command_prints_the_key_to_pin(tmp_path, capsys):
    assert fedvid(["ledger-key", "--privacy-dir", str(tmp_path / "p")]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == SiteLedger(tmp_path / "p").public_key_text() and printed.startswith("ed25519:")
    keys_file(tmp_path / "k.json", [])  # the helper writes the --site-keys format
    assert json.loads((tmp_path / "k.json").read_text()) == {}


def test_malformed_records_never_crash_the_audit_and_never_pass(copy):
    run, keys, private = copy

    def break_records(recs):
        recs[0].pop("history")
        recs[1]["epsilon_cumulative"] = "lots"
        recs[3]["site_chain"] = "nowhere"
        return recs

    rechain(run / "ledger.jsonl", break_records)
    with open(run / "ledger.jsonl", "a") as f:  # NaN cannot even be chained: JSON has none
        f.write(json.dumps(dict(json.loads((run / "ledger.jsonl").read_text().splitlines()[3]),
                                epsilon_pld=float("nan"), seq=7)) + "\n")
    for kwargs in ({}, {"site_keys": keys}, {"site_dirs": sorted(private.iterdir())}):
        report = audit_run(run, **kwargs)
        assert exit_code(report) & (EXIT_CHAIN | EXIT_RECOMPUTE), kwargs
        assert report.sites["site-a"].epsilon == math.inf  # an unreadable record counts as inf
        report.to_json()
