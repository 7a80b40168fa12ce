"""One round of local training under DP-SGD, with the site's own budget and ledger.

Plain torch + Opacus, no Flower. The order is what makes it safe: check the settings,
charge the site's budget write-ahead (refuse if the round does not fit), then train with a
step guard that stops at the charged number of steps. A process killed mid-round keeps the
round charged; epsilon on record never goes back.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from torch.utils.data import DataLoader

from client.dataset import ClipSet
from client.run_config import RunConfig
from client.train import EpochStats, make_optimizer, train_epochs
from models.tasks import get_task
from privacy.dp_training import calibrate_noise, make_private, round_plan, steps_taken, validate_dp_settings
from privacy.ledger import PrivacyLedger, dp_off_record, site_record_from_charge, site_refusal_record
from privacy.site_budget import BudgetExceeded, SiteBudget

DEFAULT_SITE_BUDGET = 8.0  # epsilon a site spends on one dataset unless its node config says otherwise


@dataclass
class SitePrivacy:
    """A site's privacy settings and state: its own, from its node config, not the server's."""

    site_id: str
    state_dir: Path
    epsilon_budget: float
    delta: float

    @classmethod
    def from_node_config(cls, node_config: Mapping, site_id: str, default_dir: Path, delta: float) -> "SitePrivacy":
        """Node config keys `privacy-dir`, `epsilon-budget` and `delta` (default: the run's)."""
        return cls(
            site_id=site_id,
            state_dir=Path(str(node_config.get("privacy-dir") or default_dir)).expanduser(),
            epsilon_budget=float(node_config.get("epsilon-budget", DEFAULT_SITE_BUDGET)),
            delta=float(node_config.get("delta", delta)),
        )

    def budget(self, fingerprint: str) -> SiteBudget:
        return SiteBudget(self.state_dir / "budget", fingerprint, self.epsilon_budget, self.delta)

    def log(self, record: dict) -> dict:
        """Append `record` to the site's own ledger; return it unchained, for the server's."""
        PrivacyLedger(self.state_dir / "ledger.jsonl").append(dict(record))
        return record


@dataclass
class RoundOutcome:
    """What a round did: training stats (None when refused) and its ledger record."""

    stats: EpochStats | None
    record: dict

    @property
    def refused(self) -> bool:
        return bool(self.record.get("refused"))


def train_round(
    model: torch.nn.Module,
    train: ClipSet,
    fingerprint: str,
    config: RunConfig,
    site: SitePrivacy,
    run_id: str,
    server_round: int,
    device: torch.device,
) -> RoundOutcome:
    """Train `local-epochs` on `train`, under DP-SGD unless the run config says `dp = false`."""
    task = get_task(config.task)
    loader = DataLoader(task.examples(train), batch_size=config.batch_size, shuffle=True)
    optimizer = make_optimizer(model, config.learning_rate)
    if not config.dp:
        stats = train_epochs(model, loader, optimizer, config.local_epochs, device, task.step_loss)
        record = dp_off_record(run_id=run_id, round=server_round, site_id=site.site_id, epsilon_budget=site.epsilon_budget)
        return RoundOutcome(stats, site.log(record))

    validate_dp_settings(
        config.noise_multiplier or None, config.max_grad_norm, site.delta,
        None if config.noise_multiplier else config.target_epsilon, len(train),
    )
    sample_rate, steps = round_plan(loader, config.local_epochs)
    # Calibrated once for the whole planned run, so every round uses the same noise.
    sigma = config.noise_multiplier or calibrate_noise(
        config.target_epsilon, site.delta, sample_rate, steps * config.num_server_rounds
    )
    budget = site.budget(fingerprint)
    try:
        charge = budget.charge(sigma, sample_rate, steps, round_id=server_round, run_id=run_id, max_grad_norm=config.max_grad_norm)
    except BudgetExceeded as refusal:
        record = site_refusal_record(
            budget, str(refusal), site_id=site.site_id, run_id=run_id, round=server_round,
            noise_multiplier=sigma, sample_rate=sample_rate, requested_steps=steps, max_grad_norm=config.max_grad_norm,
        )
        return RoundOutcome(None, site.log(record))
    model.train()  # Opacus validates the mode: a model just evaluated must train again
    private_model, optimizer, loader = make_private(
        model, optimizer, loader, sigma, config.max_grad_norm, config.grad_sample_mode, max_steps=steps
    )
    try:
        stats = train_epochs(private_model, loader, optimizer, config.local_epochs, device, task.step_loss)
    finally:
        private_model.remove_hooks()  # `model` trained in place; leave it a plain module again
    budget.confirm(server_round, run_id, steps_taken(optimizer))
    record = site_record_from_charge(
        budget, charge, site_id=site.site_id, run_id=run_id, round=server_round, max_grad_norm=config.max_grad_norm
    )
    return RoundOutcome(stats, site.log(record))
