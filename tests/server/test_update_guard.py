"""Hostile or broken updates are rejected, logged by site, and never averaged in."""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, Metadata, MetricRecord, RecordDict

from server.strategy import AGGREGATIONS, RecordingFedAvg, make_strategy
from server.update_guard import UpdateGuard, reply_problem, update_problem

GLOBAL = OrderedDict(w=np.zeros((2, 3), np.float32), b=np.zeros(3, np.float32))


def record(arrays: dict) -> ArrayRecord:
    """An ArrayRecord as a site's torch state_dict makes it."""
    return ArrayRecord(OrderedDict((k, torch.from_numpy(np.asarray(v))) for k, v in arrays.items()))


def meta(site: str) -> Metadata:
    return Metadata(run_id=1, message_id=site, src_node_id=abs(hash(site)) % 1000, dst_node_id=0,
                    reply_to_message_id="x", group_id="1", created_at=time.time(), ttl=60, message_type="train")


def reply(site: str, arrays: dict | None = None, value: float = 0.1, metrics: dict | None = None,
          ledger: str | None = None) -> Message:
    arrays = arrays if arrays is not None else {k: np.full_like(v, value) for k, v in GLOBAL.items()}
    content = RecordDict({
        "arrays": record(arrays),
        "metrics": MetricRecord(metrics or {"train-loss": 1.0, "num-examples": 10}),
        "site": ConfigRecord({"site-id": site, "refused": False,
                              "ledger-record": ledger or json.dumps({"kind": "site", "site_id": site, "round": 1})}),
    })
    return Message(content=content, metadata=meta(site))


def failed(site: str) -> Message:
    return Message(Error(code=5, reason="Node Unavailable"), metadata=meta(site))


def guarded(norm_limit: float | None = 1.0, aggregation: str = "fedavg"):
    inner = make_strategy(aggregation, min_available_nodes=1)
    guard = UpdateGuard(inner, norm_limit)
    guard.reference = record(GLOBAL)
    return guard, inner


HOSTILE = {
    "nan": lambda: reply("evil", {"w": np.full((2, 3), np.nan, np.float32), "b": np.zeros(3, np.float32)}),
    "inf": lambda: reply("evil", {"w": np.zeros((2, 3), np.float32), "b": np.array([0, np.inf, 0], np.float32)}),
    "shape": lambda: reply("evil", {"w": np.zeros((3, 2), np.float32), "b": np.zeros(3, np.float32)}),
    "dtype": lambda: reply("evil", {"w": np.zeros((2, 3), np.float64), "b": np.zeros(3, np.float32)}),
    "missing-key": lambda: reply("evil", {"w": np.zeros((2, 3), np.float32)}),
    "extra-key": lambda: reply("evil", {**GLOBAL, "backdoor": np.ones(1, np.float32)}),
    "norm": lambda: reply("evil", value=100.0),
    "nan-metric": lambda: reply("evil", metrics={"train-loss": float("nan"), "num-examples": 10}),
    "bad-ledger": lambda: reply("evil", ledger="not json"),
    "forged-ledger": lambda: reply("evil", ledger=json.dumps({"kind": "site", "site_id": "good-1", "seq": 1})),
    "central-from-a-site": lambda: reply("evil", ledger=json.dumps({"kind": "central", "site_id": "evil", "round": 1})),
    "dp-off-for-another-site": lambda: reply("evil", ledger=json.dumps({"kind": "dp-off", "site_id": "good-1"})),
}


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_a_hostile_update_is_rejected_named_and_not_averaged(kind, caplog):
    guard, inner = guarded()
    with caplog.at_level(logging.WARNING, logger="flwr"):
        arrays, _ = guard.aggregate_train(1, [reply("good-1", value=0.1), HOSTILE[kind](), reply("good-2", value=0.3)])
    # The obvious implementation: the mean of the two good updates alone.
    assert np.allclose(arrays["w"].numpy(), 0.2) and np.allclose(arrays["b"].numpy(), 0.2)
    assert [r["site"] for r in guard.rejected] == ["evil"]
    assert guard.round_report()["sites-rejected"] == 1
    assert "evil" in caplog.text and "rejected" in caplog.text
    assert {r["site_id"] for r in inner.ledger_records} == {"good-1", "good-2"}


def test_a_node_cannot_speak_for_a_site_id_another_node_holds():
    guard, inner = guarded()
    guard.aggregate_train(1, [reply("good-1", value=0.1)])
    impostor = reply("good-1", value=0.3)  # another node claims site good-1
    impostor = Message(impostor.content, metadata=Metadata(
        run_id=1, message_id="x", src_node_id=999_999, dst_node_id=0, reply_to_message_id="x", group_id="2",
        created_at=time.time(), ttl=60, message_type="train"))
    arrays, _ = guard.aggregate_train(2, [reply("good-1", value=0.1), impostor])
    assert np.allclose(arrays["w"].numpy(), 0.1)
    assert "belongs to node" in guard.rejected[0]["reason"]


def test_update_problem_measures_the_norm_of_the_update_not_of_the_model():
    reference = record(dict(w=np.full(4, 50.0, np.float32)))
    close = record(dict(w=np.full(4, 50.4, np.float32)))  # update norm 0.8
    assert update_problem(reference, close, 1.0) is None
    assert "norm" in update_problem(reference, record(dict(w=np.full(4, 51.0, np.float32))), 1.0)
    assert update_problem(reference, record(dict(w=np.full(4, 1e6, np.float32))), None) is None


def test_a_refusing_site_is_not_norm_checked_and_its_ledger_record_is_kept():
    guard, inner = guarded()
    refusing = reply("tired", value=0.0)
    refusing.content["site"]["refused"] = True
    arrays, _ = guard.aggregate_train(1, [reply("good", value=0.2), refusing])
    assert np.allclose(arrays["w"].numpy(), 0.2)
    assert reply_problem(refusing, guard.reference, 1.0) is None
    assert [r["site_id"] for r in inner.ledger_records] == ["good", "tired"]


def test_a_failed_site_does_not_discard_the_round_even_under_the_dp_wrapper():
    from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping

    inner = RecordingFedAvg(min_available_nodes=1)
    dp = DifferentialPrivacyClientSideFixedClipping(inner, noise_multiplier=0.0, clipping_norm=1.0, num_sampled_clients=3)
    dp.current_arrays = record(GLOBAL)
    guard = UpdateGuard(dp, 1.5)
    guard.reference = record(GLOBAL)
    arrays, _ = guard.aggregate_train(1, [reply("a", value=0.1), failed("b"), reply("c", value=0.3)])
    assert arrays is not None and np.allclose(arrays["w"].numpy(), 0.2)
    assert guard.round_report()["sites-failed"] == 1
    # Without the guard Flower's DP wrapper throws the whole round away.
    assert dp.aggregate_train(1, [reply("a", value=0.1), failed("b"), reply("c", value=0.3)]) == (None, None)


def test_a_round_with_only_bad_updates_keeps_the_global_model():
    guard, _ = guarded()
    assert guard.aggregate_train(1, [HOSTILE["nan"](), failed("x")]) == (None, None)
    assert guard.round_report()["sites-rejected"] == 1 and guard.round_report()["sites-failed"] == 1


@pytest.mark.parametrize("aggregation", sorted(AGGREGATIONS))
def test_every_aggregation_records_sites_and_aggregates(aggregation):
    guard, inner = guarded(norm_limit=None, aggregation=aggregation)
    values = [0.1, 0.2, 0.3, 0.4, 10.0]  # one outlier that passes the (absent) norm check
    arrays, _ = guard.aggregate_train(1, [reply(f"s{i}", value=v) for i, v in enumerate(values)])
    w = float(arrays["w"].numpy()[0, 0])
    expected = {"fedavg": np.mean(values), "median": 0.3, "trimmed-mean": np.mean([0.2, 0.3, 0.4])}
    if aggregation == "krum":
        assert any(abs(w - v) < 1e-6 for v in values[:4])  # one of the clustered models, never the outlier
    else:
        assert w == pytest.approx(expected[aggregation], rel=1e-5)
    assert inner.round_metrics["sites-trained"] == 5


def test_an_unknown_aggregation_is_refused_with_its_name():
    with pytest.raises(ValueError, match="aggregation = 'mean'"):
        make_strategy("mean")
