"""Coordinator crash and resume: the last complete round's checkpoint, checked against the ledger."""

from __future__ import annotations


import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord

from client.run_config import RunConfig
from models.registry import ModelSpec, build_model
from privacy.audit import audit_run
from privacy.ledger import verify_chain
from server.central_privacy import CentralPrivacy
from server.run_dir import RunDirectory, resume_point
from server.strategy import RoundOffset

SPEC = ModelSpec("classify", "cnn3d", "tiny", 3, 4, 16)
CLASSES = ("a", "b", "c")


def site_record(site: str, rnd: int) -> dict:
    return {"kind": "dp-off", "site_id": site, "run_id": "7", "round": rnd, "epsilon": "inf", "reason": "test"}


def play_rounds(path, rounds, run_id="7", central=None, first=1):
    """What ServerApp.after_round does per round: ledger, then checkpoint with the ledger head."""
    config = RunConfig(dp=False)
    run = RunDirectory(path, config.to_mapping(), SPEC, CLASSES, resumed=first > 1)
    central = central or CentralPrivacy(config, path / "ledger.jsonl", run_id, total_sites=2)
    model = build_model(SPEC)
    for rnd in range(first, first + rounds):
        with torch.no_grad():
            next(model.parameters()).fill_(float(rnd))
        central.record_round(rnd, [site_record("s1", rnd), site_record("s2", rnd)], sites_contributed=2)
        run.record_round(rnd, {"accuracy": 0.5}, model.state_dict(), ledger_head=list(central.ledger.head()),
                         central_rounds=central.rounds, run_id=run_id)
    return central


def test_resume_continues_from_the_last_complete_round_and_the_ledger_chain(tmp_path):
    play_rounds(tmp_path, 2)
    point = resume_point(tmp_path, SPEC, CLASSES)
    assert point.round == 2 and point.central_rounds == 2 and point.run_id == "7"
    assert float(next(iter(point.state_dict.values())).flatten()[0]) == 2.0
    # The resumed run continues: rounds 3 and 4 chain onto the same ledger.
    central = CentralPrivacy(RunConfig(dp=False), tmp_path / "ledger.jsonl", point.run_id, total_sites=2)
    central.rounds = point.central_rounds
    play_rounds(tmp_path, 2, central=central, first=3)
    check = verify_chain(tmp_path / "ledger.jsonl", expected_head=point.ledger_head)
    assert check.ok and check.records == 4 * 3
    assert resume_point(tmp_path, SPEC, CLASSES).round == 4
    assert audit_run(tmp_path).chain_ok


def test_a_torn_last_checkpoint_falls_back_to_the_previous_round(tmp_path):
    play_rounds(tmp_path, 2)
    (tmp_path / "checkpoints" / "round-002.pt").write_bytes(b"half a file")
    assert resume_point(tmp_path, SPEC, CLASSES).round == 1


def test_a_ledger_that_lost_records_after_the_checkpoint_refuses_to_resume(tmp_path):
    play_rounds(tmp_path, 2)
    ledger = tmp_path / "ledger.jsonl"
    ledger.write_text("".join(ledger.read_text().splitlines(keepends=True)[:-1]))
    with pytest.raises(ValueError, match="tail deleted"):
        resume_point(tmp_path, SPEC, CLASSES)


def test_a_checkpoint_of_another_model_refuses_to_resume(tmp_path):
    play_rounds(tmp_path, 1)
    with pytest.raises(ValueError, match="was made for model"):
        resume_point(tmp_path, ModelSpec("classify", "cnn3d", "tiny", 4, 4, 16), CLASSES + ("d",))


def test_no_checkpoint_means_a_fresh_start(tmp_path):
    assert resume_point(tmp_path, SPEC, CLASSES) is None


def test_a_new_run_never_overwrites_an_existing_run_directory(tmp_path):
    play_rounds(tmp_path, 1)
    with pytest.raises(FileExistsError, match="resume"):
        RunDirectory(tmp_path, {}, SPEC, CLASSES)


class Recorder:
    def __init__(self):
        self.rounds = []

    def configure_train(self, server_round, arrays, config, grid):
        self.rounds.append(("train", server_round))
        return []

    def aggregate_train(self, server_round, replies):
        self.rounds.append(("aggregate", server_round))
        return None, None

    configure_evaluate = configure_train
    aggregate_evaluate = aggregate_train


def test_a_resumed_strategy_sends_the_true_round_numbers():
    inner = Recorder()
    resumed = RoundOffset(inner, 5)
    resumed.configure_train(1, ArrayRecord(), ConfigRecord(), None)
    resumed.aggregate_train(2, [])
    assert inner.rounds == [("train", 6), ("aggregate", 7)]
