"""Hostile or broken site replies are rejected before any aggregation, and logged by site.

`UpdateGuard` wraps the whole strategy (outside the central-DP wrapper, which would crash on
a wrong shape and would average a NaN into the model) and, each round:

  * drops error replies (a site that crashed or dropped out) and counts them as failed,
    so one missing site never discards the round (Flower's DP wrapper skips aggregation
    when any reply is an error);
  * checks every other reply with `check_reply`: one ArrayRecord with exactly the global
    model's keys, shapes and dtypes, finite values, an update norm within `norm_limit`,
    finite scalar metrics, and a well-formed ledger record;
  * passes only the replies that pass to the strategy it wraps, and keeps the round's
    rejections (site, reason) for the run's metrics.
"""

from __future__ import annotations

import json
import math
from logging import INFO, WARNING
from typing import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from privacy.ledger import SITE_KINDS

# Clients clip their update to exactly `update-clip-norm` (fixedclipping_mod) in DP runs; this
# slack covers float32 rounding and is still far below what a broken or hostile site sends.
NORM_SLACK = 1.5


def site_of(msg: Message) -> str:
    """The site a reply names (its ConfigRecord `site`), else its node id."""
    try:
        return str(msg.content.config_records["site"]["site-id"])
    except (KeyError, TypeError, AttributeError):
        return f"node-{msg.metadata.src_node_id}"


def update_problem(reference: ArrayRecord, update: ArrayRecord, norm_limit: float | None) -> str | None:
    """Why `update` cannot be averaged into a model shaped like `reference`; None if it can."""
    expected, got = list(reference.keys()), list(update.keys())
    if got != expected:
        missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
        return f"wrong keys (missing {missing[:3]}, unexpected {extra[:3]})" if missing or extra else "keys out of order"
    squared = 0.0
    for key in expected:
        ref, new = reference[key], update[key]
        if tuple(new.shape) != tuple(ref.shape) or new.dtype != ref.dtype:
            return f"{key}: shape {tuple(new.shape)} {new.dtype}, expected {tuple(ref.shape)} {ref.dtype}"
        try:
            values = new.numpy()
        except Exception as exc:  # noqa: BLE001 - undecodable bytes from a site
            return f"{key}: cannot be decoded ({type(exc).__name__})"
        if values.dtype.kind == "f" and not np.isfinite(values).all():
            return f"{key}: NaN or Inf values"
        if values.dtype.kind in "fiu":
            diff = values.astype(np.float64) - ref.numpy().astype(np.float64)
            squared += float(np.sum(diff * diff))
    norm = math.sqrt(squared)
    if norm_limit is not None and norm > norm_limit:
        return f"update norm {norm:.4g} above the limit {norm_limit:.4g}"
    return None


def reply_problem(msg: Message, reference: ArrayRecord, norm_limit: float | None) -> str | None:
    """Why a train reply must be rejected; None when it is well-formed."""
    content = msg.content
    if len(content.array_records) != 1:
        return f"{len(content.array_records)} ArrayRecords, expected 1"
    if len(content.metric_records) != 1:
        return f"{len(content.metric_records)} MetricRecords, expected 1"
    problem = _metrics_problem(next(iter(content.metric_records.values())))
    if problem:
        return problem
    site = content.config_records.get("site")
    if site is not None:
        problem = _ledger_record_problem(site)
        if problem:
            return problem
        if bool(site.get("refused", False)):
            return None  # a refusing site sends the global model back; it is left out later
    return update_problem(reference, next(iter(content.array_records.values())), norm_limit)


def _ledger_record_problem(site: ConfigRecord) -> str | None:
    raw = site.get("ledger-record")
    if raw is None:
        return None
    try:
        record = json.loads(str(raw))
    except ValueError:
        return "ledger record is not JSON"
    if not isinstance(record, dict) or record.get("kind") not in SITE_KINDS:
        return "ledger record is not of a kind a site may send"
    if {"seq", "prev_hash", "hash"} & record.keys():
        return "ledger record sets chain fields"
    if str(record.get("site_id")) != str(site.get("site-id")):
        return "ledger record names another site"
    return None


class UpdateGuard(Strategy):
    """Wraps a strategy: error replies and ill-formed updates never reach aggregation."""

    def __init__(self, strategy: Strategy, norm_limit: float | None):
        self.strategy, self.norm_limit = strategy, norm_limit
        self.reference: ArrayRecord | None = None
        self.failed: list[str] = []
        self.rejected: list[dict] = []
        self.rejected_ledger_records: list[dict] = []
        self.node_of_site: dict[str, int] = {}  # a site id, once seen, belongs to that node

    def round_report(self) -> dict:
        """The last training round's failures and rejections, for the metrics line."""
        return {"sites-failed": len(self.failed), "sites-rejected": len(self.rejected), "rejected": list(self.rejected)}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self.reference = arrays
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Filter the replies, then let the wrapped strategy aggregate the rest."""
        self.failed, self.rejected, self.rejected_ledger_records = [], [], []
        accepted = []
        for msg in replies:
            if msg.has_error():
                self.failed.append(f"node-{msg.metadata.src_node_id}")
                log(WARNING, "fedvid: round %s: node %s failed: %s", server_round, msg.metadata.src_node_id, msg.error.reason)
                continue
            impostor = self._impersonation(msg)
            problem = impostor or reply_problem(msg, self.reference, self.norm_limit)
            if problem is None:
                accepted.append(msg)
                continue
            site = site_of(msg)
            self.rejected.append({"site": site, "reason": problem})
            log(WARNING, "fedvid: round %s: rejected the update of site %s: %s", server_round, site, problem)
            record = None if impostor else _site_ledger_record(msg)
            if record is not None:  # the site did spend budget on the round: keep its record
                self.rejected_ledger_records.append(record)
        if not accepted:
            log(WARNING, "fedvid: round %s: no acceptable update; the global model is kept", server_round)
            return None, None
        return self.strategy.aggregate_train(server_round, accepted)

    def _impersonation(self, msg: Message) -> str | None:
        """A node claiming the site id another node already used in this run."""
        site, node = site_of(msg), msg.metadata.src_node_id
        owner = self.node_of_site.setdefault(site, node)
        return None if owner == node else f"site id {site} belongs to node {owner}, not node {node}"

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        ok = [m for m in replies if not m.has_error() and _finite_metrics(m)]
        return self.strategy.aggregate_evaluate(server_round, ok) if ok else None

    def summary(self) -> None:
        log(INFO, "\t├── UpdateGuard: update norm limit %s", self.norm_limit)
        self.strategy.summary()


def _site_ledger_record(msg: Message) -> dict | None:
    site = msg.content.config_records.get("site")
    if site is None or _ledger_record_problem(site) or site.get("ledger-record") is None:
        return None
    return json.loads(str(site["ledger-record"]))


def _finite_metrics(msg: Message) -> bool:
    if len(msg.content.metric_records) != 1:
        return False
    return _metrics_problem(next(iter(msg.content.metric_records.values()))) is None


def _metrics_problem(metrics: MetricRecord) -> str | None:
    for key, value in metrics.items():
        values = value if isinstance(value, list) else [value]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
            return f"metric {key} is not finite"
    return None
