"""The ClientApp: one site's side of a round. Flower messages in and out, plain torch inside.

What a reply holds is a short, documented list (README, "What leaves a site"): the clipped
model update, `site-weight` (always 1: sites are averaged uniformly), the site id, whether it
refused, and its signed ledger record. No loss, count, timing or fingerprint of the site's
data; exact evaluation only when the site's node config opts in (`release-exact-eval`).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from client.node_config import NodeConfig
from client.private_round import SitePrivacy, private_round
from client.run_config import RunConfig
from client.site import SiteData, default_privacy_dir, load_site_data, node_anonymizer, site_id
from client.train import pick_device
from models.pretrained import freeze_except
from models.registry import build_model
from models.tasks import get_task
from privacy.dp_training import clip_update

app = ClientApp()


@lru_cache(maxsize=4)
def _site_data(config: RunConfig, node: NodeConfig, privacy_dir: Path) -> SiteData:
    # Memoised per process: in simulation a worker serves many rounds.
    return load_site_data(config, node, node_anonymizer(node), privacy_dir)


def site_of(context: Context) -> tuple[RunConfig, NodeConfig, SitePrivacy, SiteData]:
    """The run config, the site's own node config and privacy state, and its data."""
    config = RunConfig.from_mapping(context.run_config)
    node = NodeConfig.from_mapping(context.node_config)
    name = site_id(node, context.node_id)
    site = SitePrivacy(name, default_privacy_dir(node, name, config, context.run_id), node)
    return config, node, site, _site_data(config, node, site.privacy_dir)


def global_model(msg: Message, config: RunConfig, num_classes: int) -> torch.nn.Module:
    """The model the server sent, rebuilt from the shared registry, with only the run's
    `trainable-layers` left to train."""
    model = build_model(config.model_spec(num_classes))
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    freeze_except(model, config.trainable_layers)
    return model


def clip_update_when_asked(msg: Message, context: Context, call_next) -> Message:
    """Clip the update to the norm the server sends (DP runs) with the site's own clipping,
    which passes a refusing site's zero update through untouched."""
    reply = call_next(msg, context)
    if KEY_CLIPPING_NORM not in msg.content["config"] or reply.has_error():
        return reply
    sent, returned = msg.content["arrays"], reply.content["arrays"]
    clipped, _ = clip_update(returned.to_numpy_ndarrays(), sent.to_numpy_ndarrays(),
                             float(msg.content["config"][KEY_CLIPPING_NORM]))
    reply.content["arrays"] = ArrayRecord({k: Array(v) for k, v in zip(returned.keys(), clipped, strict=True)})
    return reply


@app.train(mods=[clip_update_when_asked])
def train(msg: Message, context: Context) -> Message:
    """Train the global model on the site's privacy units for `local-epochs` under DP-SGD.

    A site whose budget or policy refuses the round sends the global weights back untouched
    and says why in its ledger record.
    """
    config, node, site, data = site_of(context)
    device = pick_device(node.device)
    server_round = int(msg.content["config"]["server-round"])
    model = global_model(msg, config, len(data.classes)).to(device)
    outcome = private_round(model, data, config, site, str(context.run_id), server_round, device)
    arrays = ArrayRecord(model.cpu().state_dict()) if outcome.trained else msg.content["arrays"]
    reply = RecordDict({
        "arrays": arrays,
        "metrics": MetricRecord({"site-weight": 1.0}),
        "site": ConfigRecord({"site-id": site.site_id, "refused": outcome.refused,
                              "ledger-record": json.dumps(outcome.record)}),
    })
    return Message(content=reply, reply_to=msg)


@app.evaluate()
def evaluate_global(msg: Message, context: Context) -> Message:
    """Exact metrics of the global model on the site's validation units, only when the site's
    node config says `release-exact-eval = true`; those units are then recorded as released
    without DP. Otherwise the reply holds no metric at all."""
    config, node, site, data = site_of(context)
    if not node.release_exact_eval or data.val is None:
        return Message(content=RecordDict({"metrics": MetricRecord({})}), reply_to=msg)
    device = pick_device(node.device)
    model = global_model(msg, config, len(data.classes)).to(device)
    metrics = {f"val-{key}": value for key, value in get_task(config.task).evaluate(model, data.val, device).items()}
    site.budget().release_without_dp(data.val_units, run_id=str(context.run_id),
                                     round=int(msg.content["config"].get("server-round", 0)), what="exact evaluation")
    metrics.update({"num-examples": len(data.val), "site-weight": 1.0})
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
