"""Honest sites and a hostile coordinator's tools, for the ledger and audit tests.

`Site` keeps its one unit's history itself (no budget file); `BudgetedSite` charges a real
`SiteBudget` the way `client.private_round` does. Both sign their records with their own
`SiteLedger`. `rechain` is what a hostile coordinator does after editing the run ledger.
"""

from __future__ import annotations

import json
from pathlib import Path

from privacy.accounting import encode_epsilon, filter_epsilon, merge_history, pld_epsilon
from privacy.ledger import GENESIS_HASH, PrivacyLedger, SiteLedger, canonical_json, central_record, record_hash, site_record

DELTA = 1e-5


class Site:
    """A site without a budget file: one privacy unit, its history kept in memory."""

    def __init__(self, privacy_dir: Path, site_id: str, budget: float | None = 8.0, unit: str = "video") -> None:
        self.site_id, self.budget, self.unit = site_id, budget, unit
        self.ledger = SiteLedger(privacy_dir)
        self.history: list = []

    @property
    def key(self) -> str:
        return self.ledger.public_key_text()

    def record(self, run_id: str, rnd: int, sigma: float, q: float, steps: int, **overrides) -> dict:
        """This round's record as an honest site computes it; ``overrides`` replace fields
        afterwards (epsilons given as floats are encoded), except ``released_without_dp``,
        which goes through `site_record`."""
        history = merge_history(self.history + [(sigma, q, steps)])
        rec = site_record(
            site_id=self.site_id, run_id=run_id, round=rnd, unit=self.unit, clips_per_unit=2,
            local_steps=steps, sample_rate=q, noise_multiplier=sigma, max_grad_norm=1.0, delta=DELTA,
            epsilon_round=filter_epsilon([(sigma, q, steps)], DELTA),
            epsilon_cumulative=filter_epsilon(history, DELTA), epsilon_pld=pld_epsilon(history, DELTA),
            epsilon_budget=self.budget, history=history, randomness="os-entropy",
            released_without_dp=overrides.pop("released_without_dp", 0),
        )
        for key, value in overrides.items():
            rec[key] = encode_epsilon(value) if key.startswith("epsilon") and isinstance(value, float) else value
        return rec

    def train(self, run_id: str, rnd: int, sigma: float, q: float, steps: int, **overrides) -> dict:
        """Record the round in the site's own ledger; return the signed record it sends."""
        rec = self.record(run_id, rnd, sigma, q, steps, **overrides)
        self.history = [tuple(e) for e in rec["history"]]
        return self.ledger.append(rec)


class BudgetedSite:
    """A site with a real `SiteBudget` in its privacy dir, charged write-ahead per unit."""

    def __init__(self, privacy_dir: Path, site_id: str, budget: float, unit: str = "video",
                 units: tuple[str, ...] = ("v1", "v2", "v3")) -> None:
        self.privacy_dir, self.site_id, self.budget, self.unit, self.units = Path(privacy_dir), site_id, budget, unit, units
        self.ledger = SiteLedger(privacy_dir)

    @property
    def key(self) -> str:
        return self.ledger.public_key_text()

    def site_budget(self):
        from privacy.site_budget import SiteBudget

        return SiteBudget(self.privacy_dir, self.budget, DELTA, self.unit)

    def train(self, run_id: str, rnd: int, sigma: float, q: float, steps: int, finish: bool = True) -> dict:
        """Charge, record, (train,) confirm; ``finish=False``: the site dies before confirming."""
        from privacy.site_budget import BudgetExceeded

        budget = self.site_budget()
        mechanism = dict(site_id=self.site_id, run_id=run_id, round=rnd, unit=self.unit, clips_per_unit=2,
                         sample_rate=q, noise_multiplier=sigma, max_grad_norm=1.0, delta=DELTA,
                         epsilon_budget=self.budget, randomness="os-entropy")
        try:
            charge = budget.charge(self.units, sigma, q, steps, run_id=run_id, round=rnd, max_grad_norm=1.0)
        except BudgetExceeded as refusal:
            return self.ledger.append(site_record(
                **mechanism, local_steps=0, epsilon_round=0.0, epsilon_cumulative=budget.epsilon(),
                epsilon_pld=budget.epsilon_pld(), history=budget.worst_history(),
                released_without_dp=budget.released_count(), refused=True, refused_reason=str(refusal)))
        history = charge["history"]
        sent = self.ledger.append(site_record(
            **mechanism, local_steps=steps, epsilon_round=filter_epsilon([(sigma, q, steps)], DELTA),
            epsilon_cumulative=filter_epsilon(history, DELTA), epsilon_pld=pld_epsilon(history, DELTA),
            history=history, released_without_dp=budget.released_count()))
        if finish:
            budget.confirm(run_id, rnd, steps)
        return sent


def central(run_id: str, rnd: int, sigma: float = 1.5, sites: int = 2) -> dict:
    """The server's honest central record after ``rnd`` rounds at noise ``sigma``."""
    return central_record(
        run_id=run_id, round=rnd, sites_expected=sites, sites_contributed=sites, server_noise_multiplier=sigma,
        update_clip_norm=0.5, delta=DELTA, epsilon_cumulative=pld_epsilon([(sigma, 1.0, rnd)], DELTA),
    )


def write_run(run_dir: Path, records: list[dict]) -> PrivacyLedger:
    """The coordinator's run ledger holding ``records`` (as the sites sent them)."""
    ledger = PrivacyLedger(Path(run_dir) / "ledger.jsonl")
    for rec in records:
        ledger.append(rec)
    return ledger


def rechain(path: Path, edit) -> None:
    """Rewrite the ledger at ``path`` as ``edit(records)`` and re-hash the whole chain: what a
    coordinator that controls RUN_DIR can always do."""
    recs = [json.loads(line) for line in Path(path).read_bytes().splitlines()]
    recs = edit(recs)
    prev = GENESIS_HASH
    for i, rec in enumerate(recs, start=1):
        rec.pop("hash", None)
        rec["seq"], rec["prev_hash"] = i, prev
        rec["hash"] = prev = record_hash(rec)
    Path(path).write_bytes(b"".join(canonical_json(r) + b"\n" for r in recs))


def keys_file(path: Path, sites) -> Path:
    """A --site-keys file pinning each site's public key."""
    Path(path).write_text(json.dumps({s.site_id: s.key for s in sites}))
    return Path(path)
