"""One real Flower simulation, end to end, on tiny data: it finishes and writes the run."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch

from client.synth import write_synthetic_dataset
from client.synth_public import write_public_dataset
from privacy.audit import audit_run
from privacy.face_models import provision_face_models

pytestmark = pytest.mark.slow


def fedvid(home, *args: str) -> None:
    """A `fedvid` command in a fresh FEDVID_HOME; fails the test if it fails."""
    models = provision_face_models()
    env = dict(os.environ, FEDVID_HOME=str(home), FEDVID_FACE_MODELS=str(models["short_range"].parent))
    result = subprocess.run([sys.executable, "-m", "client.cli", *args], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def simulate(home, run_dir, overrides: str) -> None:
    """`fedvid simulate` of 2 sites."""
    fedvid(home, "simulate", "--sites", "2", "--run-config", overrides, "--out", str(run_dir))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """2 rounds, run as 1 round and then resumed for the second, as after a coordinator crash;
    the first run starts from `fedvid pretrain` weights, trains only the head, and plants 20
    audit canaries per site. The run's model is the average of the global models (`ema-decay`)."""
    home = tmp_path_factory.mktemp("home")
    data = write_synthetic_dataset(home / "data", seed=1, videos_per_class=4)
    run_dir = home / "run"
    overrides = (f'local-epochs=1 model-size="tiny" frame-size=24 target-epsilon=3.0 '
                 f'data-dir="{data}" test-fraction=0.25 batch-size=4 delta=0.001 ema-decay=0.25')
    public = write_public_dataset(home / "public", videos_per_class=3)
    fedvid(home, "pretrain", "--out", str(home / "pretrained.pt"), "--data", str(public), "--epochs", "1",
           "--run-config", overrides)
    simulate(home, run_dir, f'{overrides} num-server-rounds=1 audit-canaries=20 '
                            f'init-from="{home / "pretrained.pt"}" trainable-layers="head"')
    simulate(home, run_dir, f"{overrides} num-server-rounds=2 resume=true")
    return run_dir


def test_run_directory_is_complete(finished_run):
    names = {p.name for p in finished_run.iterdir()}
    assert {"config.json", "metrics.jsonl", "model.pt", "metrics.png", "ledger.jsonl", "status.json"} <= names
    assert json.loads((finished_run / "status.json").read_text())["status"] == "completed"
    assert sorted(p.name for p in (finished_run / "checkpoints").iterdir()) == ["round-001.pt", "round-002.pt"]
    rounds = [json.loads(line) for line in (finished_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert all(0 <= r["accuracy"] <= 1 and r["loss"] > 0 for r in rounds)
    assert rounds[-1]["sites-trained"] == 2
    assert {s["site"] for s in rounds[-1]["sites"]} == {"site-0", "site-1"}
    assert json.loads((finished_run / "config.json").read_text())["run-config"]["num-server-rounds"] == 2


def test_a_run_starts_from_public_weights_and_trains_only_its_layers(finished_run):
    pretrained_file = finished_run.parent / "pretrained.pt"
    init = json.loads((finished_run / "init-from.json").read_text())
    assert init["sha256"] == hashlib.sha256(pretrained_file.read_bytes()).hexdigest()
    assert init["reinitialised"] == ["head.bias", "head.weight"]  # trained on the public classes
    pretrained = torch.load(pretrained_file, weights_only=False)["state_dict"]
    after = torch.load(finished_run / "checkpoints" / "round-001.pt", weights_only=False)["state_dict"]
    for key, tensor in pretrained.items():
        if key.startswith("head."):
            assert not torch.equal(after[key], tensor), key
        else:  # frozen through DP-SGD, update clipping and aggregation
            assert torch.allclose(after[key], tensor, atol=1e-7), key


def test_the_runs_model_is_the_average_of_the_global_models_across_the_resume(finished_run):
    """round 1's model, then 0.25 x it + 0.75 x round 2's: the average survived the restart."""
    first, second = (torch.load(finished_run / "checkpoints" / f"round-00{n}.pt", weights_only=False) for n in (1, 2))
    final = torch.load(finished_run / "model.pt", weights_only=False)["state_dict"]
    head = "head.weight"
    assert not torch.equal(first["state_dict"][head], second["state_dict"][head])
    assert torch.equal(first["average"][head], first["state_dict"][head])
    expected = 0.25 * first["state_dict"][head] + 0.75 * second["state_dict"][head]
    assert torch.allclose(final[head], expected, atol=1e-7) and torch.equal(second["average"][head], final[head])
    rounds = [json.loads(line) for line in (finished_run / "metrics.jsonl").read_text().splitlines()]
    assert all(0 <= r["test-unaveraged-accuracy"] <= 1 for r in rounds[1:])  # the last round's model alone


def test_resumed_sites_keep_their_budget(finished_run):
    rounds = [json.loads(line) for line in (finished_run / "ledger.jsonl").read_text().splitlines()]
    spent = [r["epsilon_cumulative"] for r in rounds if r["kind"] == "site" and r["site_id"] == "site-0"]
    assert len(spent) == 2 and 3.0 * 0.9 < spent[0] < spent[1] <= 8.0
    assert (finished_run / "sites" / "site-0" / "ledger.jsonl").is_file()  # the site's own copy


def test_private_by_default_and_the_ledger_audits_clean(finished_run):
    report = audit_run(finished_run).to_dict()
    assert report["chain_ok"] and report["recomputed_ok"]
    assert set(report["sites"]) == {"site-0", "site-1"}
    for site in report["sites"].values():
        assert 0 < site["epsilon"] <= site["budget"]


def test_the_empirical_audit_of_a_run_with_canaries(finished_run):
    """`fedvid audit RUN_DIR --empirical`: each site's canaries of the run, a bound beside the epsilon."""
    result = subprocess.run([sys.executable, "-m", "client.cli", "audit", str(finished_run), "--empirical", "--json"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["empirical_ok"] is True
    for site in ("site-0", "site-1"):
        (audit,) = report["sites"][site]["empirical"]  # the resumed run planted none
        assert audit["canaries"] == 20 and audit["kind"] == "gradient" and audit["rounds"] == 1
        assert 0 <= report["sites"][site]["empirical_epsilon_lower"] <= audit["empirical_epsilon_max"]
        assert report["sites"][site]["empirical_epsilon_lower"] < audit["epsilon_accounted"]
