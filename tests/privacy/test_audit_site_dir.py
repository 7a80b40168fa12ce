"""`fedvid audit` with the sites' own directories (ledger, key, budget file): a deleted tail of
the run ledger is found, the simulation's RUN_DIR/sites default catches an edited run ledger,
and `fedvid audit --site-dir DIR` audits one site's own state. Uses the real `SiteBudget`."""

from __future__ import annotations

import json
import shutil

import pytest

from client.cli import main as fedvid
from privacy.accounting import filter_epsilon
from privacy.audit import EXIT_CHAIN, EXIT_OVER_BUDGET, EXIT_RECOMPUTE, audit_run, audit_sites, exit_code
from privacy.ledger import PrivacyLedger, SiteLedger
from privacy.site_budget import SiteBudget

from honest_sites import DELTA, BudgetedSite, central, keys_file, rechain, write_run

RUN = "run-1"


def run_with(root, sites_root, rounds=2, plan=None):
    """Sites site-a (video units) and site-b (person units) train ``rounds`` rounds."""
    plan = plan or {"site-a": (0.7, 0.05, 30, 8.0, "video"), "site-b": (1.0, 0.05, 30, 8.0, "person")}
    sites = {sid: BudgetedSite(sites_root / sid, sid, budget, unit) for sid, (_, _, _, budget, unit) in plan.items()}
    records = []
    for rnd in range(1, rounds + 1):
        for sid, (sigma, q, steps, _, _) in plan.items():
            records.append(sites[sid].train(RUN, rnd, sigma, q, steps))
        records.append(central(RUN, rnd))
    write_run(root / "run", records)
    return sites, records


def test_honest_sites_pass_with_their_own_directories(tmp_path):
    sites, _ = run_with(tmp_path, tmp_path / "private")
    dirs = [s.privacy_dir for s in sites.values()]
    report = audit_run(tmp_path / "run", site_dirs=dirs)
    assert exit_code(report) == 0, report.errors
    assert report.keys == "site-dir" and "hostile coordinator" in report.verified_against
    for sid, site in sites.items():
        audited, budget = report.sites[sid], SiteBudget.open_existing(site.privacy_dir)
        assert audited.unit == budget.unit == site.unit and audited.budget_file.charges == 2
        assert audited.epsilon == budget.epsilon() == filter_epsilon([(0.7 if sid == "site-a" else 1.0, 0.05, 60)], DELTA)
    pinned = audit_run(tmp_path / "run", site_keys={s.site_id: s.key for s in sites.values()}, site_dirs=dirs)
    assert exit_code(pinned) == 0 and pinned.keys == "pinned"


def test_deleting_the_last_record_of_an_over_budget_site_is_caught_with_its_site_dir(tmp_path):
    sites, _ = run_with(tmp_path, tmp_path / "private")
    a = sites["site-a"]
    a.budget = 7.0  # the site lowers its budget below what it spent: round 3 is refused, over budget
    write_run(tmp_path / "run", [a.train(RUN, 3, 0.7, 0.05, 30)])
    keys = keys_file(tmp_path / "keys.json", sites.values())
    pinned = json.loads(keys.read_text())
    assert exit_code(audit_run(tmp_path / "run", site_keys=pinned)) == EXIT_OVER_BUDGET

    rechain(tmp_path / "run" / "ledger.jsonl", lambda recs: recs[:-1])  # the coordinator hides it
    assert exit_code(audit_run(tmp_path / "run", site_keys=pinned)) == 0  # keys alone cannot tell
    report = audit_run(tmp_path / "run", site_keys=pinned, site_dirs=[a.privacy_dir])
    assert exit_code(report) == EXIT_CHAIN | EXIT_OVER_BUDGET
    assert any("missing from the run ledger" in e for e in report.errors)
    hidden = report.sites["site-a"].rounds[-1]
    assert hidden.missing_from_run_ledger and hidden.refused and hidden.round == 3
    assert fedvid(["audit", str(tmp_path / "run"), "--site-keys", str(keys), "--site-dir", str(a.privacy_dir)]) == 5


def test_a_round_the_site_died_in_is_accounted_and_only_a_warning(tmp_path):
    site = BudgetedSite(tmp_path / "p", "site-c", 8.0)
    write_run(tmp_path / "run", [site.train(RUN, 1, 1.0, 0.05, 30), central(RUN, 1, sites=1)])
    site.train(RUN, 2, 1.0, 0.05, 30, finish=False)  # recorded write-ahead, killed before its reply
    PrivacyLedger(tmp_path / "run" / "ledger.jsonl").append(dict(central(RUN, 2, sites=1), sites_contributed=0))
    report = audit_run(tmp_path / "run", site_dirs=[tmp_path / "p"])
    assert exit_code(report) == 0 and not report.errors, report.errors
    assert any("never finished that round" in w for w in report.warnings)
    assert report.sites["site-c"].epsilon == filter_epsilon([(1.0, 0.05, 60)], DELTA)  # counted all the same
    site.site_budget().confirm(RUN, 2, 30)  # had it finished, its reply was dropped or deleted
    assert exit_code(audit_run(tmp_path / "run", site_dirs=[tmp_path / "p"])) == EXIT_CHAIN


def _sigma_to_3(recs):
    for r in recs:
        if r.get("site_id") == "site-a":
            r["noise_multiplier"], r["history"] = 3.0, [[3.0, 0.05, 30 * r["round"]]]
            r["epsilon_cumulative"] = filter_epsilon(r["history"], DELTA)
    return recs


def test_simulation_default_reads_run_dir_sites_and_catches_an_edited_run_ledger(tmp_path):
    run_with(tmp_path, tmp_path / "run" / "sites")
    shutil.copytree(tmp_path / "run", tmp_path / "deleted")
    report = audit_run(tmp_path / "run")
    assert exit_code(report) == 0, report.errors
    assert report.keys == "run-dir" and "edited run ledger only" in report.verified_against
    assert any("RUN_DIR/sites" in w for w in report.warnings)
    assert json.loads(report.to_json())["threat_model"]["keys"] == "run-dir"

    rechain(tmp_path / "run" / "ledger.jsonl", _sigma_to_3)
    report = audit_run(tmp_path / "run")
    assert exit_code(report) & EXIT_CHAIN and any("not signed" in e for e in report.errors)

    def drop_last_of_site_b(recs):
        last = max(i for i, r in enumerate(recs) if r.get("site_id") == "site-b")
        return recs[:last] + recs[last + 1:]

    rechain(tmp_path / "deleted" / "ledger.jsonl", drop_last_of_site_b)
    report = audit_run(tmp_path / "deleted")
    assert exit_code(report) & EXIT_CHAIN and any("site site-b's ledger line 2" in e for e in report.errors)


def test_site_view_reports_unit_budget_and_epsilon_from_the_budget_file(tmp_path, capsys):
    sites, _ = run_with(tmp_path, tmp_path / "private")
    b = sites["site-b"]
    assert fedvid(["audit", "--site-dir", str(b.privacy_dir), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    site, budget = data["sites"]["site-b"], SiteBudget.open_existing(b.privacy_dir)
    assert (site["unit"], site["budget"], site["epsilon"]) == ("person", 8.0, budget.epsilon())
    assert site["epsilon_pld"] == budget.epsilon_pld() and site["status"] == "ok" and len(site["rounds"]) == 2
    assert data["run_dir"] is None and data["threat_model"]["keys"] == "site-dir" and data["exit_code"] == 0
    other = SiteLedger(tmp_path / "someone-else").public_key_text()
    report = audit_sites([b.privacy_dir], site_keys={"site-b": other})
    assert exit_code(report) & EXIT_CHAIN  # its own key is not the one the auditors pinned
    assert fedvid(["audit"]) == 2 and "RUN_DIR" in capsys.readouterr().err


def test_a_rolled_back_budget_file_is_caught(tmp_path):
    site = BudgetedSite(tmp_path / "p", "site-a", 8.0)
    site.train(RUN, 1, 1.0, 0.05, 30)
    saved = (tmp_path / "p" / "budget.json").read_bytes()
    site.train(RUN, 2, 1.0, 0.05, 30)
    assert exit_code(audit_sites([tmp_path / "p"])) == 0
    (tmp_path / "p" / "budget.json").write_bytes(saved)  # the budget forgets round 2
    report = audit_sites([tmp_path / "p"])
    assert exit_code(report) == EXIT_CHAIN | EXIT_RECOMPUTE
    assert any("rolled back" in e for e in report.errors) and any("not charged" in e for e in report.errors)


def test_a_charge_without_its_record_is_counted_and_a_record_without_charge_is_not(tmp_path):
    site = BudgetedSite(tmp_path / "p", "site-a", 8.0)
    site.train(RUN, 1, 1.0, 0.05, 30)
    SiteBudget(tmp_path / "p", 8.0, DELTA).charge(site.units, 1.0, 0.05, 30, run_id=RUN, round=2, max_grad_norm=1.0)
    report = audit_sites([tmp_path / "p"])  # a crash between the charge and the record
    assert exit_code(report) == 0 and any("charged in its budget but not in its ledger" in w for w in report.warnings)
    assert report.sites["site-a"].epsilon == filter_epsilon([(1.0, 0.05, 60)], DELTA)  # the budget's, the larger


def test_an_edited_site_ledger_fails(tmp_path):
    site = BudgetedSite(tmp_path / "p", "site-a", 8.0)
    site.train(RUN, 1, 1.0, 0.05, 30)
    site.train(RUN, 2, 1.0, 0.05, 30)
    rechain(tmp_path / "p" / "ledger.jsonl", _sigma_to_3)
    report = audit_sites([tmp_path / "p"])
    assert exit_code(report) & EXIT_CHAIN and report.sites["site-a"].signatures == "invalid"


def test_a_site_dir_without_a_budget_file_but_with_charged_rounds_is_an_error(tmp_path):
    site = BudgetedSite(tmp_path / "p", "site-a", 8.0)
    sent = site.train(RUN, 1, 1.0, 0.05, 30)
    (tmp_path / "p" / "budget.json").unlink()
    write_run(tmp_path, [sent])
    report = audit_run(tmp_path, site_dirs=[tmp_path / "p"])
    assert exit_code(report) & EXIT_CHAIN and any("no budget file" in e for e in report.errors)


@pytest.mark.parametrize("unit", ["video", "person", "clip"])
def test_every_privacy_unit_is_named_in_the_report(tmp_path, unit):
    site = BudgetedSite(tmp_path / "p", "site-u", 8.0, unit=unit)
    write_run(tmp_path, [site.train(RUN, 1, 1.0, 0.05, 30)])
    report = audit_run(tmp_path, site_dirs=[tmp_path / "p"])
    assert exit_code(report) == 0 and json.loads(report.to_json())["sites"]["site-u"]["unit"] == unit
