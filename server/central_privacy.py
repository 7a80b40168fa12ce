"""Site-level DP at the coordinator, and the run's privacy ledger.

Adjacency: two runs differ in one site being present or absent (add or remove one site, an
absent site contributing a zero update). Each site clips its update to `update-clip-norm` C
(the ClientApp, with the site's own clipping). The strategy divides the SUM of the trained
sites' updates by a FIXED n, the number of sites sampled, whoever refused, failed or was
rejected (they count as zero updates), so one site moves the average by at most C / n; Flower's
`DifferentialPrivacyClientSideFixedClipping` then adds Gaussian noise of std sigma * C / n.
Sites are sampled as a fixed-size subset (Flower's sampling), so no amplification is claimed:
each round is one Gaussian mechanism with noise multiplier sigma, composed over rounds with
dp-accounting's PLD. Poisson sampling of sites with n its expected count is the extension
that would add amplification.

Central DP protects the sites against users of the final model, not against the coordinator,
which sees every clipped update (there is no secure aggregation).
"""

from __future__ import annotations

import math
from pathlib import Path

from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping, Strategy

from client.run_config import RunConfig
from privacy.accounting import decode_epsilon, pld_epsilon
from privacy.ledger import PrivacyLedger, central_record, dp_off_record


def sampled_sites(config: RunConfig, total_sites: int) -> int:
    """The fixed denominator: the number of sites a round samples."""
    total = max(total_sites, config.min_sites)
    return max(config.min_sites, int(total * config.fraction_train))


class CentralPrivacy:
    """The server's side of DP: the noise wrapper, the central accountant, the run ledger."""

    def __init__(self, config: RunConfig, ledger_path: Path, run_id: str, total_sites: int):
        self.config, self.run_id = config, run_id
        self.ledger = PrivacyLedger(ledger_path)
        self.sites_expected = sampled_sites(config, total_sites)
        self.rounds = 0

    @property
    def noised(self) -> bool:
        return self.config.dp and self.config.server_noise_multiplier > 0

    def wrap(self, strategy: Strategy) -> Strategy:
        """Client-side update clipping + server noise for DP runs; the plain strategy otherwise."""
        if not self.config.dp:
            return strategy
        return DifferentialPrivacyClientSideFixedClipping(
            strategy,
            noise_multiplier=self.config.server_noise_multiplier,
            clipping_norm=self.config.update_clip_norm,
            num_sampled_clients=self.sites_expected,
        )

    def epsilon(self) -> float:
        """Site-level epsilon after the rounds so far (infinite without server noise)."""
        if not self.noised:
            return math.inf
        return pld_epsilon([(self.config.server_noise_multiplier, 1.0, self.rounds)], self.config.delta)

    def record_round(self, server_round: int, site_records: list[dict], sites_contributed: int) -> dict:
        """Append the sites' records and the central record; return the round's privacy metrics."""
        for record in site_records:
            self.ledger.append(record)
        self.rounds += 1
        if not self.noised:
            reason = "dp disabled" if not self.config.dp else "server-noise-multiplier = 0: no site-level DP"
            self.ledger.append(dp_off_record(run_id=self.run_id, round=server_round, reason=reason))
        else:
            self.ledger.append(central_record(
                run_id=self.run_id, round=server_round, sites_expected=self.sites_expected,
                sites_contributed=sites_contributed, server_noise_multiplier=self.config.server_noise_multiplier,
                update_clip_norm=self.config.update_clip_norm, delta=self.config.delta,
                epsilon_cumulative=self.epsilon(),
            ))
        site_eps = [decode_epsilon(r.get("epsilon_cumulative")) for r in site_records]
        site_eps = [e for e in site_eps if e is not None]
        return {"site-epsilon-max": max(site_eps) if site_eps else math.nan, "central-epsilon": self.epsilon()}
