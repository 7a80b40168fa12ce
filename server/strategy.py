"""The coordinator's strategies: FedAvg or a robust aggregator, recording what the run needs.

`make_strategy(aggregation, ...)` builds FedAvg, FedMedian, FedTrimmedAvg or Krum with the
same recording behaviour (per-round and per-site metrics, the sites' ledger records, refusing
sites left out). `RoundOffset` lets a resumed run number its rounds after the checkpoint.
"""

from __future__ import annotations

import json
from typing import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedMedian, FedTrimmedAvg, Krum, Strategy

# Counts add up across sites; everything else is averaged weighted by examples.
SUMMED_METRICS = ("num-examples",)


def aggregate_site_metrics(contents: list[RecordDict], weighting_key: str) -> MetricRecord:
    """Weighted mean of each metric, except counts, which are summed. Sites that sent no metric
    (the default: exact evaluation stays at the site) are left out."""
    records = [next(iter(c.metric_records.values())) for c in contents]
    records = [r for r in records if weighting_key in r]
    if not records:
        return MetricRecord({})
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


class RecordingStrategy:
    """Mixin for a FedAvg-family strategy: its last round's metrics can be read back.

    With ``fixed_denominator`` n (central DP) the new model is the global one plus the SUM of
    the trained sites' updates divided by n, the number of sites sampled: a site that refused,
    failed or was rejected counts as a zero update, so one site changes the average by at most
    clip / n, the sensitivity the central noise is calibrated to.
    """

    def __init__(self, fixed_denominator: int | None = None, **kwargs):
        kwargs.setdefault("train_metrics_aggr_fn", aggregate_site_metrics)
        kwargs.setdefault("evaluate_metrics_aggr_fn", aggregate_site_metrics)
        super().__init__(**kwargs)
        self.fixed_denominator = fixed_denominator
        self.global_arrays: ArrayRecord | None = None
        self.round_metrics: dict[str, float] = {}
        self.site_metrics: list[dict] = []
        self.ledger_records: list[dict] = []

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self.global_arrays = arrays
        return super().configure_train(server_round, arrays, config, grid)

    def _sum_over_fixed_denominator(self, trained: list[Message]) -> ArrayRecord:
        reference = self.global_arrays.to_numpy_ndarrays()
        total = [np.zeros(r.shape, np.float64) for r in reference]
        for msg in trained:
            update = next(iter(msg.content.array_records.values())).to_numpy_ndarrays()
            for t, new, old in zip(total, update, reference, strict=True):
                t += new.astype(np.float64) - old.astype(np.float64)
        averaged = [(old + t / self.fixed_denominator).astype(old.dtype) for old, t in zip(reference, total)]
        return ArrayRecord({k: Array(v) for k, v in zip(self.global_arrays.keys(), averaged, strict=True)})

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Average the sites that trained; a site that refused (privacy budget) is left out."""
        replies = list(replies)
        answered = [m for m in replies if not m.has_error()]
        self.ledger_records = [json.loads(m.content["site"]["ledger-record"]) for m in answered if "site" in m.content]
        trained = [m for m in answered if not _refused(m)]
        if self.fixed_denominator and trained:
            arrays, metrics = self._sum_over_fixed_denominator(trained), MetricRecord({})
        else:
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
        """Average the metrics of the sites that sent any (exact evaluation is a site's opt-in)."""
        replies = [m for m in replies if self.weighted_by_key in next(iter(m.content.metric_records.values()), {})]
        metrics = super().aggregate_evaluate(server_round, replies) if replies else None
        self.round_metrics.update(_renamed(metrics, "num-examples", "val-examples"))
        return metrics


class RecordingFedAvg(RecordingStrategy, FedAvg):
    """FedAvg whose last round's aggregated and per-site metrics can be read back."""


class RecordingFedMedian(RecordingStrategy, FedMedian):
    """Coordinate-wise median of the site models (Flower's FedMedian)."""


class RecordingFedTrimmedAvg(RecordingStrategy, FedTrimmedAvg):
    """Coordinate-wise mean after trimming the `beta` largest and smallest (FedTrimmedAvg)."""


class RecordingKrum(RecordingStrategy, Krum):
    """The site model closest to its neighbours (Flower's Krum)."""


# Run-config key `aggregation`: value -> strategy class.
AGGREGATIONS = {
    "fedavg": RecordingFedAvg,
    "median": RecordingFedMedian,
    "trimmed-mean": RecordingFedTrimmedAvg,
    "krum": RecordingKrum,
}


def make_strategy(aggregation: str = "fedavg", **kwargs) -> RecordingStrategy:
    """The recording strategy for run-config `aggregation` (fedavg, median, trimmed-mean, krum)."""
    try:
        kind = AGGREGATIONS[aggregation]
    except KeyError:
        raise ValueError(f"aggregation = {aggregation!r} must be one of {', '.join(AGGREGATIONS)}") from None
    return kind(**kwargs)


class RoundOffset(Strategy):
    """Runs `strategy` with its rounds numbered from `offset + 1` (a resumed run).

    Flower's `Strategy.start` always counts from 1; sites seed, charge their budget and
    write their ledger records by the round number they are sent, so a resumed run must
    send the true round numbers.
    """

    def __init__(self, strategy: Strategy, offset: int):
        self.strategy, self.offset = strategy, offset

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_train(server_round + self.offset, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.strategy.aggregate_train(server_round + self.offset, replies)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round + self.offset, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round + self.offset, replies)

    def summary(self) -> None:
        self.strategy.summary()


def _refused(msg: Message) -> bool:
    site = msg.content.config_records.get("site")
    return bool(site and site["refused"])


def _renamed(metrics: MetricRecord | None, old: str, new: str) -> dict[str, float]:
    """Metrics as a dict with key `old` renamed to `new` (train and evaluate share names)."""
    out = dict(metrics or {})
    if old in out:
        out[new] = out.pop(old)
    return out
