"""Site-level (central) DP: one site moves the noised average by at most clip / n, whoever
refused or failed, and the epsilon on record is the Gaussian mechanism's over the rounds."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict
from opacus.accountants import PRVAccountant

from client.run_config import RunConfig
from server.central_privacy import CentralPrivacy
from server.strategy import make_strategy

CLIP, SITES = 1.0, 4


def reply(node: int, arrays: dict, refused: bool = False) -> Message:
    metadata = Metadata(run_id=1, message_id=f"r{node}", src_node_id=node, dst_node_id=0, reply_to_message_id="q",
                        group_id="1", created_at=time.time(), ttl=600, message_type="train")
    content = RecordDict({
        "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
        "metrics": MetricRecord({"site-weight": 1.0}),
        "site": ConfigRecord({"site-id": f"s{node}", "refused": refused, "ledger-record": "{}"}),
    })
    return Message(content=content, metadata=metadata)


def aggregate(tmp_path, updates: dict[int, np.ndarray | None]) -> np.ndarray:
    """The server's new model (noise ~0) from sites' updates; None: the site refused."""
    config = RunConfig(server_noise_multiplier=1e-12, update_clip_norm=CLIP)
    central = CentralPrivacy(config, tmp_path / "ledger.jsonl", "run-1", total_sites=SITES)
    strategy = make_strategy("fedavg", fixed_denominator=central.sites_expected if central.noised else None,
                             weighted_by_key="site-weight")
    wrapped = central.wrap(strategy)
    start = {"w": np.zeros(10, np.float32)}
    strategy.global_arrays = ArrayRecord({k: Array(v) for k, v in start.items()})
    replies = [reply(n, {"w": start["w"] if u is None else u.astype(np.float32)}, refused=u is None)
               for n, u in updates.items()]
    arrays, _ = wrapped.aggregate_train(1, replies)
    return arrays.to_numpy_ndarrays()[0].astype(np.float64)


def test_one_site_moves_the_average_by_at_most_clip_over_the_sampled_sites(tmp_path):
    """Hostile neighbour: the other sites refuse; the site present vs absent (refusing)."""
    u = np.zeros(10)
    u[0] = CLIP
    v = -u
    with_site = aggregate(tmp_path / "a", {1: u, 2: v, 3: None, 4: None})
    without_site = aggregate(tmp_path / "b", {1: None, 2: v, 3: None, 4: None})
    # Averaged over the 2 sites that trained, the difference would be C (sensitivity 2C/k);
    # summed over the fixed n = 4, it is C / 4.
    assert np.linalg.norm(with_site - without_site) <= CLIP / SITES * (1 + 1e-5)
    assert np.allclose(with_site, (u + v) / SITES)


def test_the_central_epsilon_is_the_gaussian_mechanism_composed_over_rounds(tmp_path):
    config = RunConfig(server_noise_multiplier=1.5, delta=1e-5)
    central = CentralPrivacy(config, tmp_path / "ledger.jsonl", "run-1", total_sites=SITES)
    epsilons = [central.record_round(r, [], sites_contributed=SITES)["central-epsilon"] for r in (1, 2, 3)]
    assert epsilons == sorted(epsilons) and math.isfinite(epsilons[-1])
    prv = PRVAccountant()  # an independent accountant: Opacus's PRV, no sampling (q = 1)
    prv.history = [(1.5, 1.0, 3)]
    assert epsilons[-1] == pytest.approx(prv.get_epsilon(1e-5), rel=0.02)


def test_no_server_noise_is_recorded_as_infinite_epsilon(tmp_path):
    central = CentralPrivacy(RunConfig(), tmp_path / "ledger.jsonl", "run-1", total_sites=SITES)
    assert central.record_round(1, [], sites_contributed=SITES)["central-epsilon"] == math.inf


def test_an_infinite_site_epsilon_is_the_maximum_not_ignored(tmp_path):
    central = CentralPrivacy(RunConfig(), tmp_path / "ledger.jsonl", "run-1", total_sites=SITES)
    records = [{"kind": "site", "site_id": "a", "epsilon_cumulative": 3.0},
               {"kind": "dp-off", "site_id": "b", "epsilon_cumulative": "inf"}]
    assert central.record_round(1, records, sites_contributed=2)["site-epsilon-max"] == math.inf
