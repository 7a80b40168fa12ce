"""The one-run empirical audit (``fedvid audit --empirical``): a statistical LOWER bound on an
audited site's epsilon, measured from its canaries (`privacy.canaries`), beside the epsilon the
site accounted for them.

The bound is jax-privacy's `CanaryScoreAuditor.epsilon_one_run` (Steinke, Nasr and Jagielski,
NeurIPS 2023; extra ``fedvid[audit]``): at 95% confidence, a mechanism whose scores separate
the included canaries from the others this well is not (epsilon, delta)-DP for any smaller
epsilon. So a lower bound above the accounted epsilon is a privacy bug: the mechanism leaks
more than the ledger says. A bound below it proves nothing more than that the audit did not
catch a bug; one run of m canaries cannot prove more than `attainable_lower_bound` (a perfect
attack), which is reported beside.

The accounted epsilon is a canary unit's own: its history in the site budget (one run, every
round that charged it), by PLD (the tighter figure, the one compared) and by the enforced RDP
filter (reported beside).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from privacy.accounting import encode_epsilon, filter_epsilon, pld_epsilon
from privacy.canaries import FOLDER, RunCanaries
from privacy.site_budget import SiteBudget

SIGNIFICANCE = 0.05
INSTALL_HINT = "the empirical audit needs jax-privacy: pip install 'fedvid[audit]'"


@dataclass(frozen=True)
class CanaryAudit:
    """One site's one audited run."""

    site_id: str
    run_id: str
    kind: str
    canaries: int
    included: int
    rounds: int
    delta: float
    epsilon_accounted: float  # PLD of a canary unit's history: compared with the bound
    epsilon_accounted_rdp: float  # the enforced RDP figure of the same history
    empirical_epsilon_lower: float
    empirical_epsilon_max: float  # what a perfect attack proves with these counts
    significance: float = SIGNIFICANCE

    @property
    def violated(self) -> bool:
        return self.empirical_epsilon_lower > self.epsilon_accounted

    def to_dict(self) -> dict:
        out = asdict(self)
        for key in ("epsilon_accounted", "epsilon_accounted_rdp"):
            out[key] = encode_epsilon(out[key])
        out["violated"] = self.violated
        return out


def epsilon_lower_bound(in_scores: np.ndarray, out_scores: np.ndarray, delta: float,
                        significance: float = SIGNIFICANCE) -> float:
    """The one-run lower bound on epsilon from the scores of the included (``in_scores``) and
    the other canaries (higher score: more likely in)."""
    try:
        from jax_privacy.auditing import CanaryScoreAuditor
    except ImportError as err:
        raise ImportError(f"{INSTALL_HINT} ({err})") from None
    in_scores, out_scores = np.asarray(in_scores, dtype=np.float64), np.asarray(out_scores, dtype=np.float64)
    if not (np.isfinite(in_scores).all() and np.isfinite(out_scores).all()):
        # A NaN or inf score means the model blew up; the canaries cannot be ranked.
        raise ValueError("a canary score is NaN or infinite: the run diverged, its canaries cannot be ranked")
    return float(CanaryScoreAuditor(in_scores, out_scores).epsilon_one_run(significance, delta))


def attainable_lower_bound(included: int, excluded: int, delta: float, significance: float = SIGNIFICANCE) -> float:
    """The largest bound one run with these canary counts can give: every in canary ranked above
    every out one."""
    return epsilon_lower_bound(np.arange(included) + excluded + 1.0, np.arange(excluded, dtype=np.float64),
                               delta, significance)


def audit_run_canaries(site_id: str, canaries: RunCanaries, budget: SiteBudget,
                       significance: float = SIGNIFICANCE) -> CanaryAudit:
    """The empirical audit of one run's canaries at one site, against what its budget charged them."""
    if not canaries.rounds:
        raise ValueError(f"{canaries.path}: no round of run {canaries.run_id} finished training: nothing to audit")
    included = canaries.included
    if included.all() or not included.any():
        raise ValueError(f"{canaries.path}: every canary is on one side; the audit needs both")
    first = canaries.unit_ids()[0]
    history = budget.unit_history(first)
    if not history:
        raise ValueError(f"{canaries.path}: the site budget never charged canary {first}: "
                         "the canaries were not accounted")
    return CanaryAudit(
        site_id=site_id, run_id=canaries.run_id, kind=canaries.kind, canaries=canaries.count,
        included=int(included.sum()), rounds=len(canaries.rounds), delta=budget.delta,
        epsilon_accounted=pld_epsilon(history, budget.delta),
        epsilon_accounted_rdp=filter_epsilon(history, budget.delta),
        empirical_epsilon_lower=epsilon_lower_bound(canaries.scores[included], canaries.scores[~included],
                                                    budget.delta, significance),
        empirical_epsilon_max=attainable_lower_bound(int(included.sum()), int((~included).sum()),
                                                     budget.delta, significance),
        significance=significance,
    )


def audit_site_canaries(site_id: str, privacy_dir: Path, run_ids: Iterable[str] | None = None) -> list[CanaryAudit]:
    """Every audited run at a site (only ``run_ids`` when given) that left canary scores."""
    folder = Path(privacy_dir) / FOLDER
    paths = sorted(folder.glob("*.json")) if folder.is_dir() else []
    if run_ids is not None:
        wanted = {str(r) for r in run_ids}
        paths = [p for p in paths if p.stem in wanted]
    if not paths:
        return []
    budget = SiteBudget.open_existing(privacy_dir)
    return [audit_run_canaries(site_id, RunCanaries.load(p), budget) for p in paths]


def verdict(audit: CanaryAudit) -> str:
    """One line for people."""
    head = (f"site {audit.site_id} run {audit.run_id}: {audit.canaries} {audit.kind} canaries "
            f"({audit.included} in), lower bound {audit.empirical_epsilon_lower:.3f} "
            f"(at most {audit.empirical_epsilon_max:.3f} provable) vs accounted {_fmt(audit.epsilon_accounted)}")
    return head + (": ABOVE the accounted epsilon, the mechanism leaks more than recorded" if audit.violated else "")


def _fmt(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:.3f}"
