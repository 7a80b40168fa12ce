"""The server strategy: refusing sites are left out, counts add up, ledger records are kept."""

from __future__ import annotations

import json
import time

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict

from server.strategy import RecordingFedAvg


def reply(site: str, value: float, refused: bool = False, examples: int = 10) -> Message:
    metadata = Metadata(run_id=1, message_id=site, src_node_id=hash(site) % 1000, dst_node_id=0,
                        reply_to_message_id="x", group_id="1", created_at=time.time(), ttl=60, message_type="train")
    content = RecordDict({
        "arrays": ArrayRecord([np.full(3, value, dtype=np.float32)]),
        "metrics": MetricRecord({"site-weight": 1.0, "num-examples": examples}),
        "site": ConfigRecord({"site-id": site, "refused": refused, "ledger-record": json.dumps({"site_id": site})}),
    })
    return Message(content=content, metadata=metadata)


def test_refusing_site_is_not_averaged_in_and_is_recorded():
    strategy = RecordingFedAvg(min_available_nodes=1, weighted_by_key="site-weight")
    arrays, metrics = strategy.aggregate_train(1, [reply("a", 1.0), reply("b", 3.0, examples=30), reply("c", 100.0, refused=True)])
    assert np.allclose(arrays.to_numpy_ndarrays()[0], 2.0)  # uniform: a site's size is not sent
    assert metrics["num-examples"] == 40  # counts add up
    assert strategy.round_metrics["sites-trained"] == 2 and strategy.round_metrics["sites-refused"] == 1
    assert [r["site_id"] for r in strategy.ledger_records] == ["a", "b", "c"]


def test_a_round_where_every_site_refuses_keeps_the_model():
    strategy = RecordingFedAvg(min_available_nodes=1, weighted_by_key="site-weight")
    arrays, metrics = strategy.aggregate_train(1, [reply("a", 1.0, refused=True)])
    assert arrays is None and metrics is None
    assert strategy.round_metrics["sites-refused"] == 1


def test_every_aggregation_the_run_config_accepts_exists():
    from client.run_config import AGGREGATIONS as accepted
    from server.strategy import AGGREGATIONS as built

    assert set(accepted) == set(built)


def test_sites_that_send_no_metrics_are_left_out_of_the_evaluation_average():
    from server.strategy import aggregate_site_metrics

    contents = [RecordDict({"metrics": MetricRecord({})}),
                RecordDict({"metrics": MetricRecord({"val-accuracy": 0.5, "num-examples": 4})})]
    assert dict(aggregate_site_metrics(contents, "num-examples")) == {"val-accuracy": 0.5, "num-examples": 4}
    assert dict(aggregate_site_metrics(contents[:1], "num-examples")) == {}
