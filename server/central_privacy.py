"""Client-level DP at the coordinator, and the run's privacy ledger.

Sites clip their model update to `update-clip-norm` (Flower's `fixedclipping_mod`); Flower's
`DifferentialPrivacyClientSideFixedClipping` adds Gaussian noise of std
`server-noise-multiplier * update-clip-norm / sampled sites` to the average. The server
accounts that mechanism with Opacus over rounds, without claiming amplification by client
sampling (Flower samples a fixed-size subset, not a Poisson sample). Every round the sites'
own ledger records and one central record are appended to `ledger.jsonl`.
"""

from __future__ import annotations

import math
from pathlib import Path

from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping, Strategy

from client.run_config import RunConfig
from privacy.ledger import PrivacyLedger, central_record, dp_off_record
from privacy.site_budget import composed_epsilon


class CentralPrivacy:
    """The server's side of DP: the strategy wrapper, the central accountant, the ledger."""

    def __init__(self, config: RunConfig, ledger_path: Path, run_id: str, total_sites: int):
        self.config, self.run_id = config, run_id
        self.ledger = PrivacyLedger(ledger_path)
        self.total_sites = max(total_sites, config.min_sites)
        self.sampled_sites = max(config.min_sites, int(self.total_sites * config.fraction_train))
        self.rounds = 0

    def wrap(self, strategy: Strategy) -> Strategy:
        """Client-side update clipping + server noise for DP runs; the plain strategy otherwise."""
        if not self.config.dp:
            return strategy
        return DifferentialPrivacyClientSideFixedClipping(
            strategy,
            noise_multiplier=self.config.server_noise_multiplier,
            clipping_norm=self.config.update_clip_norm,
            num_sampled_clients=self.sampled_sites,
        )

    def epsilon(self) -> float:
        """User-level epsilon after the rounds so far (infinite without server noise)."""
        sigma = self.config.server_noise_multiplier
        if not self.config.dp or sigma <= 0:
            return math.inf
        return composed_epsilon([(sigma, 1.0, self.rounds)], self.config.delta, "prv")

    def record_round(self, server_round: int, site_records: list[dict]) -> dict:
        """Append the sites' records and the central record; return the round's privacy metrics."""
        for record in site_records:
            self.ledger.append(record)
        self.rounds += 1
        if self.epsilon() == math.inf:
            reason = "dp disabled" if not self.config.dp else "server-noise-multiplier = 0: no client-level DP"
            self.ledger.append(dp_off_record(run_id=self.run_id, round=server_round, reason=reason))
        else:
            self.ledger.append(central_record(
                run_id=self.run_id, round=server_round, sampled_clients=self.sampled_sites,
                total_clients=self.total_sites, server_noise_multiplier=self.config.server_noise_multiplier,
                update_clip_norm=self.config.update_clip_norm, delta=self.config.delta,
                epsilon_cumulative=self.epsilon(), accountant="prv", sampling="none",
            ))
        site_eps = [r["epsilon_cumulative"] for r in site_records if isinstance(r.get("epsilon_cumulative"), (int, float))]
        return {"site-epsilon-max": max(site_eps) if site_eps else math.inf, "central-epsilon": self.epsilon()}
