"""The ClientApp: one site's side of a round. Flower messages in and out, plain torch inside."""

from __future__ import annotations

import time
from functools import lru_cache

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch.utils.data import DataLoader

from client.run_config import RunConfig
from client.site import SiteData, load_site_data, site_anonymizer
from client.train import evaluate, make_optimizer, pick_device, train_epochs
from models.registry import build_model

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


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the global model on the site's clips for `local-epochs`; reply with the weights."""
    config = RunConfig.from_mapping(context.run_config)
    data = site_data(config, context)
    device = pick_device(str(context.node_config.get("device", "")))
    server_round = int(msg.content["config"]["server-round"])
    torch.manual_seed(config.seed * 1000 + server_round)
    model = global_model(msg, config, len(data.classes)).to(device)
    loader = DataLoader(data.train.dataset(), batch_size=config.batch_size, shuffle=True)
    started = time.perf_counter()
    stats = train_epochs(model, loader, make_optimizer(model, config.learning_rate), config.local_epochs, device)
    metrics = {
        "train-loss": stats.loss,
        "train-accuracy": stats.accuracy,
        "train-seconds": time.perf_counter() - started,
        "faces-blurred": data.train.faces_blurred + data.val.faces_blurred,
        "videos-skipped": len(data.train.skipped) + len(data.val.skipped),
        "num-examples": len(data.train),
    }
    reply = RecordDict({"arrays": ArrayRecord(model.cpu().state_dict()), "metrics": MetricRecord(metrics)})
    return Message(content=reply, reply_to=msg)


@app.evaluate()
def evaluate_global(msg: Message, context: Context) -> Message:
    """Evaluate the global model on the site's validation clips."""
    config = RunConfig.from_mapping(context.run_config)
    data = site_data(config, context)
    device = pick_device(str(context.node_config.get("device", "")))
    model = global_model(msg, config, len(data.classes)).to(device)
    stats = evaluate(model, data.val.dataset(), device)
    metrics = {"val-loss": stats.loss, "val-accuracy": stats.accuracy, "num-examples": stats.examples}
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
