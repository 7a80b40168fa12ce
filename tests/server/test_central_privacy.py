"""Central (client-level) DP: the server's epsilon is recorded per round and audits clean."""

from __future__ import annotations

import math

import dp_accounting

from client.run_config import RunConfig
from privacy.audit import audit_run
from server.central_privacy import CentralPrivacy


def google_epsilon(sigma: float, rounds: int, delta: float) -> float:
    accountant = dp_accounting.pld.PLDAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(sigma), rounds)  # no sampling amplification
    return accountant.get_epsilon(delta)


def test_server_noise_is_accounted_over_rounds(tmp_path):
    config = RunConfig(server_noise_multiplier=1.5, delta=1e-5)
    central = CentralPrivacy(config, tmp_path / "ledger.jsonl", "run-1", total_sites=4)
    epsilons = [central.record_round(r, [])["central-epsilon"] for r in (1, 2, 3)]
    assert epsilons == sorted(epsilons) and math.isfinite(epsilons[-1])
    assert abs(epsilons[-1] - google_epsilon(1.5, 3, 1e-5)) / epsilons[-1] < 0.01
    report = audit_run(tmp_path).to_dict()
    assert report["chain_ok"] and report["recomputed_ok"]
    assert abs(float(report["central"]["epsilon"]) - epsilons[-1]) < 1e-9


def test_no_server_noise_is_recorded_as_infinite_epsilon(tmp_path):
    central = CentralPrivacy(RunConfig(), tmp_path / "ledger.jsonl", "run-1", total_sites=4)
    assert central.record_round(1, [])["central-epsilon"] == math.inf
    assert audit_run(tmp_path).to_dict()["central"]["epsilon"] == "inf"
