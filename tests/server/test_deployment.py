"""Flower's deployment engine on loopback, as at real sites: TLS, SuperNode authentication,
the Control API on 127.0.0.1 only, three registered sites with their own data and budgets
(site-b pins the app bundle it runs), an intruder, and a site that dies mid-round and comes
back. Real processes; everything is stopped even when a test fails."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from client.app_pin import approved_fab_hash, refusals_file
from client.synth import write_synthetic_dataset
from privacy.audit import audit_run
from privacy.face_models import provision_face_models
from server.run_dir import read_metrics

from loopback import APP_DIR, LoopbackFederation

pytestmark = pytest.mark.slow

SITES = ["site-a", "site-b", "site-c"]
PINNED = "site-b"  # runs `--isolation process` + client.app_pin: only this checkout's bundle
CLASSES = "move-right,move-left,move-down,move-up,grow,shrink"
SMALL_RUN = (f'local-epochs=1 model-size="tiny" frame-size=24 batch-size=4 delta=0.001 '
             f'classes="{CLASSES}" central-eval=false')


def site_config(root: Path, site: str, data: Path) -> dict:
    return {"data-dir": str(data), "site-id": site, "privacy-dir": str(root / "privacy" / site),
            "cache-dir": str(root / "cache" / site), "epsilon-budget": 50.0, "delta": 0.001, "device": "cpu"}


@pytest.fixture(scope="module")
def federation(tmp_path_factory, request):
    root = tmp_path_factory.mktemp("loopback")
    models = provision_face_models()
    fed = LoopbackFederation(root, SITES, env={"FEDVID_HOME": str(root / "home"),
                                               "FEDVID_FACE_MODELS": str(models["short_range"].parent)})
    request.addfinalizer(fed.close)
    fed.start_superlink()
    fed.site_configs = {}
    for i, site in enumerate(SITES):
        fed.register(site)
        data = write_synthetic_dataset(root / "data" / site, seed=10 + i, videos_per_class=3)
        fed.site_configs[site] = site_config(root, site, data)
        if site == PINNED:  # what `flwr run` will ship from this checkout
            fed.site_configs[site]["allowed-fab-hashes"] = approved_fab_hash(APP_DIR)
        fed.start_supernode(site, fed.site_configs[site], isolation="process" if site == PINNED else "subprocess")
    return fed


def test_a_supernode_with_an_unregistered_key_is_refused(federation):
    federation.start_supernode("intruder", {"site-id": "intruder"})
    federation.wait_for_log("intruder", "Failed to activate SuperNode", 60)
    federation.kill("intruder")
    assert len(federation.nodes()) == len(SITES)  # the registered sites, nobody else


def test_two_dp_rounds_over_tls_with_authenticated_sites(federation):
    run_dir = federation.root / "run"
    started = time.monotonic()
    status = federation.run(f"num-server-rounds=2 min-sites=3 {SMALL_RUN}", run_dir)
    seconds = time.monotonic() - started
    assert status.get("status") == "completed", federation.log_text("flwr-run-run")[-4000:]
    rounds = read_metrics(run_dir / "metrics.jsonl")
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert all(r["sites-trained"] == 3 and r["sites-rejected"] == 0 for r in rounds[1:])
    assert {s["site"] for s in rounds[-1]["sites"]} == set(SITES)
    assert not refusals_file(federation.site_configs[PINNED]).exists()  # it trained the bundle it pinned
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["round-001.pt", "round-002.pt"]
    report = audited(federation, run_dir)
    assert report.chain_ok and report.recomputed_ok and not report.errors
    assert set(report.to_dict()["sites"]) == set(SITES)
    print(f"\nloopback run: {seconds:.1f} s for 2 rounds; per round {[round(r['seconds'], 1) for r in rounds[1:]]} s")


def audited(federation, run_dir: Path):
    """The audit as the sites' privacy officers run it: keys pinned from the sites themselves."""
    dirs = [Path(federation.site_configs[site]["privacy-dir"]) for site in SITES]
    keys = {site: (d / "ledger-key.pub").read_text().strip() for site, d in zip(SITES, dirs)}
    return audit_run(run_dir, site_keys=keys, site_dirs=dirs)


def test_a_site_over_budget_refuses_and_the_refusal_reaches_the_ledger(federation):
    """Before: Flower's fixedclipping_mod divided by the refusal's zero update norm, the site was
    counted as failed, the ledger got nothing and the audit passed an empty table."""
    run_dir = federation.root / "refused"
    status = federation.run(f"num-server-rounds=1 min-sites=3 noise-multiplier=0.05 {SMALL_RUN}", run_dir)
    assert status.get("status") == "completed", federation.log_text("flwr-run-refused")[-4000:]
    rounds = read_metrics(run_dir / "metrics.jsonl")
    assert rounds[1]["sites-refused"] == 3 and rounds[1]["sites-failed"] == 0
    ledger = [json.loads(line) for line in (run_dir / "ledger.jsonl").read_text().splitlines()]
    refusals = [x for x in ledger if x["kind"] == "site" and x["refused"]]
    assert {x["site_id"] for x in refusals} == set(SITES)
    assert all("over its budget" in x["refused_reason"] for x in refusals)
    report = audited(federation, run_dir)
    assert report.chain_ok and not report.over_budget


def charged_rounds(privacy_dir: Path) -> int:
    budget = privacy_dir / "budget.json"
    return len(json.loads(budget.read_text())["charges"]) if budget.is_file() else 0


def test_a_site_killed_mid_round_does_not_fail_the_run_and_rejoins_with_its_budget(federation):
    run_dir = federation.root / "dropout"
    victim = "site-c"
    privacy_dir = Path(federation.site_configs[victim]["privacy-dir"])
    before = charged_rounds(privacy_dir)
    run = federation.start_run(f"num-server-rounds=3 min-sites=2 {SMALL_RUN}", run_dir)
    deadline = time.monotonic() + 180
    while charged_rounds(privacy_dir) == before:  # the site charged round 1 and is training
        assert run.poll() is None and time.monotonic() < deadline, federation.log_text("flwr-run-dropout")[-3000:]
        time.sleep(0.2)
    federation.kill(victim)
    federation.wait_for_log("flwr-run-dropout", "failed:", 180)  # the SuperLink declares it unavailable
    federation.start_supernode(victim, federation.site_configs[victim], name=f"{victim}-restarted")
    run.wait(timeout=400)
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "completed", federation.log_text("flwr-run-dropout")[-4000:]

    rounds = read_metrics(run_dir / "metrics.jsonl")
    assert rounds[1]["sites-failed"] == 1 and rounds[1]["sites-trained"] == 2
    ledger = [json.loads(line) for line in (run_dir / "ledger.jsonl").read_text().splitlines()]
    by_round = {r: {x["site_id"] for x in ledger if x["kind"] == "site" and x["round"] == r} for r in (1, 2, 3)}
    assert by_round[1] == {"site-a", "site-b"}  # who took part in the round the site died in
    rejoined = [x for x in ledger if x["kind"] == "site" and x["site_id"] == victim]
    assert rejoined, f"{victim} never came back: {by_round}"
    # Its accountant is intact: the round it died in stays charged (write-ahead) and is
    # part of the history it reports after rejoining.
    budget = json.loads((privacy_dir / "budget.json").read_text())
    charges = [(r["run_id"], r["round"]) for r in budget["charges"]]
    assert (rejoined[0]["run_id"], 1) in charges
    upto = charges.index((rejoined[0]["run_id"], rejoined[0]["round"])) + 1
    # Every unit of the site is in every round: the worst unit's history is all the charges.
    assert sum(n for _, _, n in rejoined[0]["history"]) == sum(r["steps"] for r in budget["charges"][:upto])
    report = audited(federation, run_dir)
    assert report.chain_ok and report.recomputed_ok and not report.errors
