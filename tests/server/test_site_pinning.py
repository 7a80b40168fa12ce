"""A site pins the app code it runs (`client.app_pin`), on a real loopback deployment.

Each site runs `flower-supernode --isolation process` and its own `python -m client.app_pin
superexec`. The coordinator ships first an edited bundle (one line changed, as a hostile
coordinator would), then the approved one. Real processes, about a minute."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from client.app_pin import approved_fab_hash, read_refusals

from loopback import LoopbackFederation, write_probe_app

pytestmark = pytest.mark.slow


def run_probe(fed: LoopbackFederation, app: Path, out: Path, nodes: int) -> dict:
    result = fed.flwr("run", str(app), "fedvid", "--stream", "--run-config",
                      f'out="{out}" nodes={nodes} timeout=90', timeout=240)
    (fed.logs / f"flwr-run-{out.stem}.log").write_text(result.stdout + result.stderr)
    assert out.exists(), result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(out.read_text())


def test_a_site_runs_only_the_app_it_pinned_and_records_what_it_refused(tmp_path, request):
    fed = LoopbackFederation(tmp_path / "fed", ["pinned", "unpinned"])
    request.addfinalizer(fed.close)
    markers = tmp_path / "ran"
    approved = write_probe_app(tmp_path / "approved" / "pinprobe", "approved", markers)
    edited = write_probe_app(tmp_path / "edited" / "pinprobe", "edited", markers)
    allowed = approved_fab_hash(approved)  # what the site computes from the code it reviewed
    assert approved_fab_hash(edited) != allowed

    fed.start_superlink()
    configs = {
        "pinned": {"site-id": "pinned", "privacy-dir": str(tmp_path / "privacy-pinned"), "allowed-fab-hashes": allowed},
        "unpinned": {"site-id": "unpinned", "privacy-dir": str(tmp_path / "privacy-unpinned")},  # runs nothing
    }
    for site, config in configs.items():
        fed.register(site)
        fed.start_supernode(site, config, isolation="process")

    started = time.monotonic()
    hostile = run_probe(fed, edited, tmp_path / "edited.json", nodes=2)
    hostile_seconds = time.monotonic() - started
    assert len(hostile["replies"]) == 2, hostile
    assert all("site refused the app" in r.get("error", "") for r in hostile["replies"].values()), hostile
    assert not list(markers.glob("edited-*")), "code of the refused bundle ran"

    started = time.monotonic()
    approved_run = run_probe(fed, approved, tmp_path / "approved.json", nodes=2)
    approved_seconds = time.monotonic() - started
    outcomes = sorted(json.dumps(r, sort_keys=True) for r in approved_run["replies"].values())
    assert len(outcomes) == 2 and '{"trained": 1.0}' in outcomes, approved_run
    assert any("no allowed-fab-hashes" in o for o in outcomes), approved_run
    ran = list(markers.glob("approved-*"))
    assert len(ran) == 1, ran
    # The FAB's own `client` package ran, from Flower's install of the checked bytes, not the
    # site's installed `client` package of the same name.
    assert "flwr-home/apps/fedvidtest.pinprobe.1.0.0." + allowed[:8] in ran[0].read_text()

    pinned = read_refusals(configs["pinned"])
    assert [(r["fab_hash"], r["fab_id"], r["fab_version"], r["site_id"]) for r in pinned] == [
        (approved_fab_hash(edited), "fedvidtest/pinprobe", "1.0.0", "pinned")]
    assert pinned[0]["claimed_fab_hash"] == pinned[0]["fab_hash"] and pinned[0]["run_id"] and pinned[0]["time"]
    unpinned = read_refusals(configs["unpinned"])
    assert [r["fab_hash"] for r in unpinned] == [approved_fab_hash(edited), allowed]
    assert "fedvid: refused app fedvidtest/pinprobe" in fed.log_text("pinned-superexec")
    print(f"\npinning: refused run {hostile_seconds:.1f} s, approved run {approved_seconds:.1f} s")
