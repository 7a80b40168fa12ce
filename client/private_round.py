"""A site's private round, in one façade: plan, charge, record, wrap, train, confirm.

Plain torch + Opacus, no Flower. The order is what makes it safe against a coordinator that
chooses the run config and the weights:

1. plan: the mechanism the run asks for (noise, sample rate over the site's privacy units,
   steps), checked against the site's own delta; a round without DP only when the site's node
   config allows it (`allow-non-private`), else a recorded refusal;
2. charge: the site budget, per unit, write-ahead (refused when a unit would go over);
3. record: the round's ledger record is appended to the site's own signed ledger BEFORE
   training, so a crash after the charge still leaves it at the site;
4. wrap: Opacus with the site's own generators (`SiteRandomness`) and a step guard;
5. train: multi-clip DP-SGD, one clipped gradient per unit;
6. confirm: the steps taken (never more than charged).

A run that plants audit canaries (`privacy.canaries`) adds them as units of their own to the
plan, the charge and the loader, and scores them after training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import ConcatDataset, DataLoader

from client.node_config import NodeConfig
from client.run_config import RunConfig
from client.site import SiteData
from client.train import keep_freed_memory, make_optimizer, train_epochs
from models.tasks import get_task
from privacy.accounting import calibrate_noise, filter_epsilon, pld_epsilon
from privacy.canaries import RunCanaries
from privacy.dp_training import (
    SiteRandomness,
    UnitDataset,
    make_private,
    steps_taken,
    train_units,
    unit_loader,
    validate_dp_settings,
)
from privacy.ledger import SiteLedger, dp_off_record, site_record
from privacy.site_budget import BudgetExceeded, SiteBudget


@dataclass
class SitePrivacy:
    """A site's privacy settings and state: from its own node config and disk, not the server."""

    site_id: str
    privacy_dir: Path
    node: NodeConfig

    def budget(self) -> SiteBudget:
        return SiteBudget(self.privacy_dir, self.node.epsilon_budget, self.node.delta, self.node.privacy_unit)

    def log(self, record: dict) -> dict:
        """Append ``record`` to the site's own signed ledger; return the signed record to send."""
        return SiteLedger(self.privacy_dir).append(record)


@dataclass(frozen=True)
class RoundPlan:
    """The mechanism of one round at this site: what is charged and what Opacus runs."""

    noise_multiplier: float
    sample_rate: float
    steps: int

    @classmethod
    def for_site(cls, config: RunConfig, site: SitePrivacy, units: int) -> "RoundPlan":
        """Poisson sampling over `units` at rate 1/ceil(units / batch-size), `local-epochs`
        passes; the noise is the run's, or calibrated once for all its planned rounds."""
        validate_dp_settings(
            config.noise_multiplier or None, config.max_grad_norm, site.node.delta,
            None if config.noise_multiplier else config.target_epsilon, units,
        )
        batches = math.ceil(units / config.batch_size)
        sample_rate, steps = 1.0 / batches, config.local_epochs * batches
        sigma = config.noise_multiplier or calibrate_noise(
            config.target_epsilon, site.node.delta, sample_rate, steps * config.num_server_rounds
        )
        return cls(sigma, sample_rate, steps)


@dataclass
class RoundOutcome:
    """What a round did: whether the model was trained, and its signed ledger record."""

    trained: bool
    record: dict

    @property
    def refused(self) -> bool:
        return bool(self.record.get("refused"))


def private_round(
    model: torch.nn.Module, data: SiteData, config: RunConfig, site: SitePrivacy, run_id: str,
    server_round: int, device: torch.device,
) -> RoundOutcome:
    """Train `model` in place for `local-epochs` on the site's units under DP-SGD (see module doc)."""
    if not config.dp:
        return _non_private_round(model, data, config, site, run_id, server_round, device)
    task, units = get_task(config.task), data.units
    canaries = run_canaries(config, site, run_id)
    slots = canaries.count if canaries else 0  # all of them: q must not depend on which are in
    plan = RoundPlan.for_site(config, site, len(units) + slots)  # a bad setting is refused before anything is written
    budget = site.budget()
    mechanism = dict(site_id=site.site_id, run_id=run_id, round=server_round, unit=units.kind,
                     clips_per_unit=config.clips_per_unit, sample_rate=plan.sample_rate,
                     noise_multiplier=plan.noise_multiplier, max_grad_norm=config.max_grad_norm,
                     delta=budget.delta, epsilon_budget=budget.epsilon_budget,
                     randomness="seeded" if site.node.seed is not None else "os-entropy")
    try:
        charged = units.ids + (canaries.unit_ids() if canaries else [])
        charge = budget.charge(charged, plan.noise_multiplier, plan.sample_rate, plan.steps,
                               run_id=run_id, round=server_round, max_grad_norm=config.max_grad_norm)
    except BudgetExceeded as refusal:
        return RoundOutcome(False, site.log(_refusal(budget, mechanism, str(refusal))))
    history = charge["history"]
    record = site.log(site_record(
        **mechanism, local_steps=plan.steps,
        epsilon_round=filter_epsilon([(plan.noise_multiplier, plan.sample_rate, plan.steps)], budget.delta),
        epsilon_cumulative=filter_epsilon(history, budget.delta), epsilon_pld=pld_epsilon(history, budget.delta),
        history=history, released_without_dp=budget.released_count(),
    ))
    randomness = SiteRandomness.for_site(device, site.node.seed)
    examples, classes = task.examples(data.train), len(data.classes)
    dataset, observer = UnitDataset(examples, units.members, config.clips_per_unit, randomness.sampling), None
    if canaries:
        observer = canaries.start_round(model, examples, classes, device)
        dataset = ConcatDataset([dataset, canaries.slots(examples, model, config.max_grad_norm, classes)])
    model.train()  # Opacus validates the mode: a model just evaluated must train again
    keep_freed_memory()
    private_model, optimizer, loader = make_private(
        model, make_optimizer(model, config.learning_rate), unit_loader(dataset, config.batch_size, randomness.sampling),
        plan.noise_multiplier, config.max_grad_norm, config.grad_sample_mode, poisson_sampling=False,
        max_steps=plan.steps, noise_generator=randomness.noise, observe_step=observer,
    )
    try:
        train_units(private_model, loader, optimizer, config.local_epochs, device, task.step_loss)
    finally:
        private_model.remove_hooks()  # `model` trained in place; leave it a plain module again
    budget.confirm(run_id, server_round, steps_taken(optimizer))
    if canaries:
        canaries.finish_round(server_round, model, observer, examples, classes, device)
    return RoundOutcome(True, record)


def run_canaries(config: RunConfig, site: SitePrivacy, run_id: str) -> RunCanaries | None:
    """The run's audit canaries at this site: made at the run's first round when the run asks for
    them and the site's node config takes part; then fixed for the run, whatever it asks later."""
    if not site.node.allow_audit_canaries:
        return None
    if config.audit_canaries == 0 and not RunCanaries.exists(site.privacy_dir, run_id):
        return None
    return RunCanaries.for_run(site.privacy_dir, run_id, config.audit_canary_kind, config.audit_canaries,
                               site.node.seed)


def _refusal(budget: SiteBudget, mechanism: dict, reason: str) -> dict:
    """A refused round's record: nothing trained, the site's epsilon as it stands."""
    history = list(budget.worst_history())
    return site_record(
        **mechanism, local_steps=0, epsilon_round=0.0, epsilon_cumulative=budget.epsilon(),
        epsilon_pld=budget.epsilon_pld(), history=history, released_without_dp=budget.released_count(),
        refused=True, refused_reason=reason,
    )


def _non_private_round(
    model: torch.nn.Module, data: SiteData, config: RunConfig, site: SitePrivacy, run_id: str,
    server_round: int, device: torch.device,
) -> RoundOutcome:
    """`dp = false`: trained only when the site's node config allows it, and then every unit is
    recorded as released without DP (its epsilon is infinite from now on)."""
    budget = site.budget()
    if not site.node.allow_non_private:
        mechanism = dict(site_id=site.site_id, run_id=run_id, round=server_round, unit=data.units.kind,
                         clips_per_unit=config.clips_per_unit, sample_rate=1.0, noise_multiplier=0.0,
                         max_grad_norm=config.max_grad_norm, delta=budget.delta,
                         epsilon_budget=budget.epsilon_budget,
                         randomness="seeded" if site.node.seed is not None else "os-entropy")
        reason = "the run asks for dp = false; this site's node config does not allow non-private rounds"
        return RoundOutcome(False, site.log(_refusal(budget, mechanism, reason)))
    task = get_task(config.task)
    budget.release_without_dp(data.units.ids, run_id=run_id, round=server_round, what="non-private training round")
    record = site.log(dp_off_record(run_id=run_id, round=server_round, site_id=site.site_id,
                                    reason="dp = false, allowed by node config allow-non-private",
                                    epsilon_budget=budget.epsilon_budget, unit=data.units.kind))
    loader = DataLoader(task.examples(data.train), batch_size=config.batch_size, shuffle=True)
    train_epochs(model, loader, make_optimizer(model, config.learning_rate), config.local_epochs, device, task.step_loss)
    return RoundOutcome(True, record)
