"""FedAvg that keeps what the run directory needs: per-round and per-site metrics."""

from __future__ import annotations

import json
from typing import Iterable

from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

# Counts add up across sites; everything else is averaged weighted by examples.
SUMMED_METRICS = ("num-examples", "faces-blurred", "videos-skipped")


def aggregate_site_metrics(contents: list[RecordDict], weighting_key: str) -> MetricRecord:
    """Example-weighted mean of each metric, except counts, which are summed."""
    records = [next(iter(c.metric_records.values())) for c in contents]
    weights = [float(r[weighting_key]) for r in records]
    total = sum(weights)
    merged: dict[str, float] = {}
    for key in records[0]:
        values = [float(r[key]) for r in records]
        if key in SUMMED_METRICS:
            merged[key] = sum(values)
        else:
            merged[key] = sum(w * v for w, v in zip(weights, values)) / total if total else 0.0
    return MetricRecord(merged)


def site_name(msg: Message) -> str:
    """The site id a reply carries, else its node id."""
    site = msg.content.config_records.get("site")
    return str(site["site-id"]) if site else f"node-{msg.metadata.src_node_id}"


class RecordingFedAvg(FedAvg):
    """FedAvg whose last round's aggregated and per-site metrics can be read back."""

    def __init__(self, **kwargs):
        kwargs.setdefault("train_metrics_aggr_fn", aggregate_site_metrics)
        kwargs.setdefault("evaluate_metrics_aggr_fn", aggregate_site_metrics)
        super().__init__(**kwargs)
        self.round_metrics: dict[str, float] = {}
        self.site_metrics: list[dict] = []
        self.ledger_records: list[dict] = []

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Average the sites that trained; a site that refused (privacy budget) is left out."""
        replies = list(replies)
        answered = [m for m in replies if not m.has_error()]
        self.ledger_records = [json.loads(m.content["site"]["ledger-record"]) for m in answered if "site" in m.content]
        trained = [m for m in answered if not _refused(m)]
        arrays, metrics = super().aggregate_train(server_round, trained) if trained else (None, None)
        self.round_metrics = {
            "sites-trained": len(trained),
            "sites-refused": len(answered) - len(trained),
            "sites-failed": len(replies) - len(answered),
        }
        self.round_metrics.update(_renamed(metrics, "num-examples", "train-examples"))
        self.site_metrics = [
            {"site": site_name(m), **dict(next(iter(m.content.metric_records.values())))} for m in answered
        ]
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        metrics = super().aggregate_evaluate(server_round, replies)
        self.round_metrics.update(_renamed(metrics, "num-examples", "val-examples"))
        return metrics


def _refused(msg: Message) -> bool:
    site = msg.content.config_records.get("site")
    return bool(site and site["refused"])


def _renamed(metrics: MetricRecord | None, old: str, new: str) -> dict[str, float]:
    """Metrics as a dict with key `old` renamed to `new` (train and evaluate share names)."""
    out = dict(metrics or {})
    if old in out:
        out[new] = out.pop(old)
    return out
