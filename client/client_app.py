"""The ClientApp: one site's side of a round. Flower messages in and out, plain torch inside."""

from __future__ import annotations

import json
import time
from functools import lru_cache

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from client.run_config import RunConfig
from client.private_round import SitePrivacy, train_round
from client.site import SiteData, default_privacy_dir, load_site_data, site_anonymizer, site_id
from client.train import pick_device
from models.registry import build_model
from models.tasks import get_task

app = ClientApp()


@lru_cache(maxsize=4)
def _site_data(config: RunConfig, node_items: tuple) -> SiteData:
    # Memoised per process: in simulation a worker serves many rounds.
    return load_site_data(config, dict(node_items), site_anonymizer())


def site_data(config: RunConfig, context: Context) -> SiteData:
    """This site's anonymized clips for the run."""
    return _site_data(config, tuple(sorted(context.node_config.items())))


def global_model(msg: Message, config: RunConfig, num_classes: int) -> torch.nn.Module:
    """The model the server sent, rebuilt from the shared registry."""
    model = build_model(config.model_spec(num_classes))
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    return model


def clip_update_when_asked(msg: Message, context: Context, call_next) -> Message:
    """Flower's `fixedclipping_mod` whenever the server sends a clipping norm (DP runs)."""
    if KEY_CLIPPING_NORM in msg.content["config"]:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


@app.train(mods=[clip_update_when_asked])
def train(msg: Message, context: Context) -> Message:
    """Train the global model on the site's clips for `local-epochs` (DP-SGD by default).

    The reply holds the weights, scalar metrics and the round's privacy-ledger record;
    a site whose budget cannot afford the round sends the global weights back untouched
    and says why in that record.
    """
    config = RunConfig.from_mapping(context.run_config)
    data = site_data(config, context)
    device = pick_device(str(context.node_config.get("device", "")))
    server_round = int(msg.content["config"]["server-round"])
    torch.manual_seed(config.seed * 1000 + server_round)
    model = global_model(msg, config, len(data.classes)).to(device)
    name = site_id(context.node_config, context.node_id)
    privacy = SitePrivacy.from_node_config(
        context.node_config, name, default_privacy_dir(context.node_config, name, config, context.run_id), config.delta
    )
    started = time.perf_counter()
    outcome = train_round(model, data.train, data.fingerprint, config, privacy, str(context.run_id), server_round, device)
    stats = outcome.stats
    metrics = {
        "train-loss": stats.loss if stats else 0.0,
        "train-seconds": time.perf_counter() - started,
        "faces-blurred": data.train.faces_blurred + data.val.faces_blurred,
        "videos-skipped": len(data.train.skipped) + len(data.val.skipped),
        "num-examples": 0 if outcome.refused else len(data.train),
        "site-weight": 1.0,
    }
    arrays = msg.content["arrays"] if outcome.refused else ArrayRecord(model.cpu().state_dict())
    reply = RecordDict({
        "arrays": arrays,
        "metrics": MetricRecord(metrics),
        "site": ConfigRecord({"site-id": name, "refused": outcome.refused, "ledger-record": json.dumps(outcome.record)}),
    })
    return Message(content=reply, reply_to=msg)


@app.evaluate()
def evaluate_global(msg: Message, context: Context) -> Message:
    """Evaluate the global model on the site's validation clips with the task's metrics."""
    config = RunConfig.from_mapping(context.run_config)
    data = site_data(config, context)
    device = pick_device(str(context.node_config.get("device", "")))
    model = global_model(msg, config, len(data.classes)).to(device)
    metrics = {f"val-{key}": value for key, value in get_task(config.task).evaluate(model, data.val, device).items()}
    metrics["num-examples"] = len(data.val)
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
