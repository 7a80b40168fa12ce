"""A site's DP round: budget charged before training, refusals, clipped updates, DP-off records."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, Metadata, MetricRecord, RecordDict
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from client.client_app import clip_update_when_asked
from client.dataset import ClipSet
from client.private_round import SitePrivacy, train_round
from client.run_config import RunConfig
from models.registry import build_model
from privacy.ledger import verify_chain
from privacy.site_budget import dataset_fingerprint

FINGERPRINT = dataset_fingerprint([("a/1.mp4", "h1")])


def tiny_site(n: int = 40) -> ClipSet:
    rng = np.random.default_rng(0)
    return ClipSet(rng.integers(0, 255, (n, 4, 16, 16, 3), dtype=np.uint8), rng.integers(0, 3, n))


def setup(tmp_path, budget: float, **overrides):
    config = RunConfig(model_size="tiny", clip_frames=4, frame_size=16, batch_size=8, local_epochs=1,
                       num_server_rounds=2, target_epsilon=4.0, delta=1e-3, **overrides)
    model = build_model(config.model_spec(3))
    site = SitePrivacy("site-x", tmp_path, budget, 1e-3)
    return config, model, site


def test_rounds_are_charged_until_the_site_budget_refuses(tmp_path):
    config, model, site = setup(tmp_path, budget=4.5)
    spent = []
    for server_round in (1, 2, 3):
        before = {k: v.clone() for k, v in model.state_dict().items()}
        outcome = train_round(model, tiny_site(), FINGERPRINT, config, site, "run-1", server_round, torch.device("cpu"))
        changed = any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
        spent.append(outcome.record["epsilon_cumulative"])
        assert changed != outcome.refused
    # Calibrated for 2 rounds at epsilon 4: two rounds fit a budget of 4.5, the third does not.
    assert [r for r in spent[:2]] == sorted(spent[:2]) and spent[1] <= 4.0 + 1e-6
    assert outcome.refused and "budget" in outcome.record["refused_reason"].lower()
    assert spent[2] == pytest.approx(spent[1])
    assert verify_chain(tmp_path / "ledger.jsonl").ok


def test_budget_survives_a_new_process_state(tmp_path):
    config, model, site = setup(tmp_path, budget=100.0)
    first = train_round(model, tiny_site(), FINGERPRINT, config, site, "run-1", 1, torch.device("cpu"))
    again = SitePrivacy("site-x", tmp_path, 100.0, 1e-3)  # as a restarted process would
    assert again.budget(FINGERPRINT).spent() == pytest.approx(first.record["epsilon_cumulative"])
    second = train_round(model, tiny_site(), FINGERPRINT, config, again, "run-2", 1, torch.device("cpu"))
    assert second.record["epsilon_cumulative"] > first.record["epsilon_cumulative"]


def test_dp_off_is_recorded_as_infinite_epsilon(tmp_path):
    config, model, site = setup(tmp_path, budget=8.0, dp=False)
    outcome = train_round(model, tiny_site(), FINGERPRINT, config, site, "run-1", 1, torch.device("cpu"))
    assert outcome.record["kind"] == "dp-off" and outcome.record["epsilon_cumulative"] == "inf"


def test_delta_not_below_one_over_n_is_refused_before_training(tmp_path):
    config, model, site = setup(tmp_path, budget=8.0)
    site.delta = 0.1  # 40 examples: delta must be below 1/40
    with pytest.raises(ValueError, match="delta"):
        train_round(model, tiny_site(), FINGERPRINT, config, site, "run-1", 1, torch.device("cpu"))


def test_the_update_sent_never_exceeds_the_clipping_norm():
    rng = np.random.default_rng(1)
    sent = {"w": rng.normal(size=(50, 20)).astype(np.float32), "b": rng.normal(size=20).astype(np.float32)}
    metadata = Metadata(run_id=1, message_id="m1", src_node_id=0, dst_node_id=1, reply_to_message_id="",
                        group_id="", created_at=time.time(), ttl=3600, message_type="train")
    content = RecordDict({"arrays": ArrayRecord(list(sent.values())), "config": ConfigRecord({KEY_CLIPPING_NORM: 0.5})})
    message = Message(content=content, metadata=metadata)

    def train_far_away(msg, context):
        trained = [v + 10 * rng.normal(size=v.shape).astype(np.float32) for v in sent.values()]
        return Message(RecordDict({"arrays": ArrayRecord(trained), "metrics": MetricRecord({"num-examples": 1})}), reply_to=msg)

    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    reply = clip_update_when_asked(message, context, train_far_away)
    returned = reply.content["arrays"].to_numpy_ndarrays()
    update = np.concatenate([(r - s).ravel() for r, s in zip(returned, sent.values())])
    assert np.linalg.norm(update) <= 0.5 * (1 + 1e-5)
    assert np.linalg.norm(update) > 0.49  # clipped to the norm, not zeroed
