"""A site's private round: charged before training, refused over budget, recorded at the site
even when training crashes after the charge, and an update clipped to the server's norm."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, Metadata, MetricRecord, RecordDict
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

import client.private_round as private_round_module
from client.client_app import clip_update_when_asked
from client.dataset import ClipSet
from client.node_config import NodeConfig
from client.private_round import SitePrivacy, private_round
from client.run_config import RunConfig
from client.site import SiteData, privacy_units
from models.registry import build_model
from privacy.site_budget import SiteBudget


def tiny_site(videos: int = 20, clips_per_video: int = 2) -> SiteData:
    rng = np.random.default_rng(0)
    n = videos * clips_per_video
    clips = ClipSet(rng.integers(0, 255, (n, 4, 16, 16, 3), dtype=np.uint8), rng.integers(0, 3, n))
    clips.sources = [f"video-{i // clips_per_video}" for i in range(n)]
    return SiteData(("a", "b", "c"), clips, privacy_units(clips, "video", {s: s for s in clips.sources}), None, [])


def setup(tmp_path, budget: float, **overrides):
    config = RunConfig(model_size="tiny", clip_frames=4, frame_size=16, batch_size=5, local_epochs=1,
                       num_server_rounds=2, target_epsilon=4.0, delta=1e-3, **overrides)
    site = SitePrivacy("site-x", tmp_path, NodeConfig(data_dir="unused", epsilon_budget=budget, delta=1e-3))
    return config, build_model(config.model_spec(3)), site


def test_rounds_are_charged_until_the_site_budget_refuses(tmp_path):
    config, model, site = setup(tmp_path, budget=4.5)
    spent = []
    for server_round in (1, 2, 3):
        before = {k: v.clone() for k, v in model.state_dict().items()}
        outcome = private_round(model, tiny_site(), config, site, "run-1", server_round, torch.device("cpu"))
        changed = any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
        spent.append(outcome.record["epsilon_cumulative"])
        assert changed == outcome.trained != outcome.refused
    # Calibrated for 2 rounds at epsilon 4: two rounds fit a budget of 4.5, the third does not.
    assert spent[:2] == sorted(spent[:2]) and spent[1] <= 4.0 + 1e-6
    assert outcome.refused and "budget" in outcome.record["refused_reason"]
    assert spent[2] == pytest.approx(spent[1])


def test_a_crash_after_the_charge_leaves_the_ledger_record_at_the_site(tmp_path, monkeypatch):
    config, model, site = setup(tmp_path, budget=50.0)

    def power_cut(*args, **kwargs):
        raise KeyboardInterrupt("power cut mid-round")

    monkeypatch.setattr(private_round_module, "train_units", power_cut)
    with pytest.raises(KeyboardInterrupt):
        private_round(model, tiny_site(), config, site, "run-1", 1, torch.device("cpu"))
    records = [json.loads(line) for line in (tmp_path / "ledger.jsonl").read_text().splitlines()]
    assert len(records) == 1 and records[0]["round"] == 1 and records[0]["local_steps"] > 0
    charges = SiteBudget.open_existing(tmp_path).charges()
    assert len(charges) == 1 and charges[0]["steps_taken"] is None  # charged, never confirmed


def test_delta_not_below_one_over_the_units_is_refused_before_training(tmp_path):
    config, model, site = setup(tmp_path, budget=8.0)
    site.node = NodeConfig(data_dir="unused", delta=0.06)  # 20 videos: delta must be below 1/20
    with pytest.raises(ValueError, match="delta"):
        private_round(model, tiny_site(), config, site, "run-1", 1, torch.device("cpu"))
    assert not (tmp_path / "budget.json").exists()


def message(arrays: list[np.ndarray], clip: float) -> Message:
    metadata = Metadata(run_id=1, message_id="m1", src_node_id=0, dst_node_id=1, reply_to_message_id="",
                        group_id="", created_at=time.time(), ttl=3600, message_type="train")
    content = RecordDict({"arrays": ArrayRecord(arrays), "config": ConfigRecord({KEY_CLIPPING_NORM: clip})})
    return Message(content=content, metadata=metadata)


def test_the_update_sent_never_exceeds_the_clipping_norm():
    rng = np.random.default_rng(1)
    sent = [rng.normal(size=(50, 20)).astype(np.float32), rng.normal(size=20).astype(np.float32)]

    def train_far_away(msg, context):
        trained = [v + 10 * rng.normal(size=v.shape).astype(np.float32) for v in sent]
        return Message(RecordDict({"arrays": ArrayRecord(trained), "metrics": MetricRecord({"site-weight": 1.0})}),
                       reply_to=msg)

    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    reply = clip_update_when_asked(message(sent, 0.5), context, train_far_away)
    update = np.concatenate([(r - s).ravel() for r, s in zip(reply.content["arrays"].to_numpy_ndarrays(), sent)])
    assert 0.49 < np.linalg.norm(update) <= 0.5 * (1 + 1e-5)  # clipped to the norm, not zeroed


def test_a_refusing_sites_unchanged_weights_pass_the_clipping():
    """Before: Flower's fixedclipping_mod divided by the zero update norm (ZeroDivisionError),
    so a refusal reached the coordinator as a failure and never reached the ledger."""
    sent = [np.ones((4, 3), np.float32)]

    def refuse(msg, context):
        return Message(RecordDict({"arrays": msg.content["arrays"], "metrics": MetricRecord({"site-weight": 1.0})}),
                       reply_to=msg)

    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    reply = clip_update_when_asked(message(sent, 0.5), context, refuse)
    assert not reply.has_error()
    assert np.array_equal(reply.content["arrays"].to_numpy_ndarrays()[0], sent[0])
