"""``fedvid audit RUN_DIR``: check a run's privacy ledger and recompute every epsilon.

What is checked:
  * the hash chain of ``RUN_DIR/ledger.jsonl`` (`privacy.ledger.verify_chain`);
  * every site epsilon (cumulative and per round), recomposed from the recorded
    ``(sigma, q, steps)`` history with an INDEPENDENT accountant: Google ``dp_accounting``
    PLD (default) or RDP for PRV-recorded entries (two-sided 1% with PLD; with RDP, which
    is looser, the record must not exceed it by more than 1%), and ``dp_accounting`` RDP
    with Opacus's orders for RDP-recorded entries (two-sided 1%). Agreement is relative,
    with an absolute floor of 1e-3 for tiny epsilons;
  * that each site's history only grows and contains the round it records;
  * the central epsilon, recomposed over the run's central records (one Poisson-subsampled
    Gaussian step per round at q = sampled/total, or q = 1 for ``sampling="none"``);
  * budgets: a site at >= 90% of its budget is a warning, over it is an error. An infinite
    epsilon (DP off) is never within a budget; it is only acceptable with no budget set.

Exit code (`exit_code`) is a bit mask: 1 chain broken, 2 recomputation disagrees,
4 a site over budget; 0 when all is well.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from privacy.ledger import (
    LEDGER_NAME,
    ChainCheck,
    central_sample_rate,
    decode_epsilon,
    encode_epsilon,
    verify_chain,
)

INDEPENDENT = ("pld", "rdp")
REL_TOL = 0.01
ABS_TOL = 1e-3
NEAR_BUDGET = 0.9

EXIT_CHAIN = 1
EXIT_RECOMPUTE = 2
EXIT_OVER_BUDGET = 4


# --------------------------------------------------------------------------------------------
# Independent accountants (Google dp_accounting)
# --------------------------------------------------------------------------------------------


def independent_epsilon(
    history: Sequence[Sequence[float]], delta: float, method: str = "pld"
) -> float:
    """Epsilon of ``[(sigma, q, steps), ...]`` at ``delta`` with Google ``dp_accounting``.

    ``method="pld"``: privacy-loss-distribution accountant (tight, like Opacus's PRV);
    ``"rdp"``: RDP accountant with Opacus's RDP orders (matches Opacus's RDP). q == 1 is
    the plain Gaussian mechanism; sigma == 0 gives ``inf``.
    """
    key = tuple((float(s), float(q), int(n)) for s, q, n in history if int(n) > 0)
    return _independent_epsilon(key, float(delta), method)


@functools.lru_cache(maxsize=1024)
def _independent_epsilon(history: tuple, delta: float, method: str) -> float:
    import dp_accounting

    if method not in INDEPENDENT:
        raise ValueError(f"independent accountant must be one of {INDEPENDENT}, got {method!r}")
    if not history:
        return 0.0
    if any(s <= 0 for s, _, _ in history):
        return math.inf
    if method == "pld":
        acc = dp_accounting.pld.PLDAccountant()
    else:
        from opacus.accountants import RDPAccountant

        acc = dp_accounting.rdp.RdpAccountant(orders=RDPAccountant.DEFAULT_ALPHAS)
    for sigma, q, steps in history:
        event: Any = dp_accounting.GaussianDpEvent(sigma)
        if q < 1.0:
            event = dp_accounting.PoissonSampledDpEvent(q, event)
        acc.compose(dp_accounting.SelfComposedDpEvent(event, steps))
    # dp_accounting's RDP logs a warning per order it drops (non-converging small orders at
    # large q); dropping orders only loosens the bound, so keep the log quiet.
    absl_log = logging.getLogger("absl")
    level = absl_log.level
    absl_log.setLevel(logging.ERROR)
    try:
        return float(acc.get_epsilon(delta))
    finally:
        absl_log.setLevel(level)


def _agrees(recorded: float, recomputed: float, recorded_mech: str, method: str) -> bool:
    if math.isinf(recorded) or math.isinf(recomputed):
        return math.isinf(recorded) and math.isinf(recomputed)
    tol = max(REL_TOL * abs(recomputed), ABS_TOL)
    if recorded_mech == "prv" and method == "rdp":
        return recorded <= recomputed + tol  # RDP is an upper bound on the PRV figure
    return abs(recorded - recomputed) <= tol


def _method_for(recorded_mech: str, independent: str) -> str:
    return "rdp" if recorded_mech == "rdp" else independent


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


@dataclass
class RoundAudit:
    """One site round as recorded and as recomputed."""

    seq: int
    run_id: str
    round: int
    steps: int
    noise_multiplier: float | None
    sample_rate: float | None
    max_grad_norm: float | None
    epsilon_round: float | None
    epsilon: float  # cumulative, as recorded
    epsilon_recomputed: float
    ok: bool
    refused: bool = False
    dp_off: bool = False
    note: str | None = None

    @property
    def epsilon_effective(self) -> float:
        """The recorded epsilon when the recomputation agrees, else the larger of the two."""
        return self.epsilon if self.ok else max(self.epsilon, self.epsilon_recomputed)


@dataclass
class SiteAudit:
    site_id: str
    delta: float | None
    budget: float | None
    accountant: str | None
    rounds: list[RoundAudit] = field(default_factory=list)
    steps_total: int = 0  # DP-SGD steps in the site's history (all runs)

    @property
    def epsilon(self) -> float:
        """Cumulative epsilon after the last round: as recorded when the independent
        recomputation agrees, else the larger of recorded and recomputed."""
        if not self.rounds:
            return 0.0
        return self.rounds[-1].epsilon_effective

    @property
    def budget_left(self) -> float | None:
        if self.budget is None or math.isinf(self.budget):
            return None
        return self.budget - self.epsilon

    @property
    def status(self) -> str:
        """"ok", "near" (>= 90% of budget), "over", "no budget" or "dp-off" (no budget)."""
        eps = self.epsilon
        if self.budget is None or math.isinf(self.budget):
            return "dp-off" if math.isinf(eps) else "no budget"
        if eps > self.budget:
            return "over"
        if eps >= NEAR_BUDGET * self.budget:
            return "near"
        return "ok"


@dataclass
class CentralRoundAudit:
    seq: int
    run_id: str
    round: int
    sampled_clients: int | None
    total_clients: int | None
    server_noise_multiplier: float | None
    update_clip_norm: float | None
    sampling: str | None
    epsilon: float
    epsilon_recomputed: float
    ok: bool
    dp_off: bool = False

    @property
    def epsilon_effective(self) -> float:
        """The recorded epsilon when the recomputation agrees, else the larger of the two."""
        return self.epsilon if self.ok else max(self.epsilon, self.epsilon_recomputed)


@dataclass
class CentralAudit:
    delta: float | None
    accountant: str | None
    sampling: str | None
    rounds: list[CentralRoundAudit] = field(default_factory=list)

    @property
    def epsilon(self) -> float:
        if not self.rounds:
            return 0.0
        return self.rounds[-1].epsilon_effective


@dataclass
class AuditReport:
    """Everything `audit_run` found. `to_json` for machines, `render_table` for people."""

    run_dir: str
    ledger: str
    independent: str
    chain: ChainCheck
    sites: dict[str, SiteAudit]
    central: CentralAudit | None
    errors: list[str]
    warnings: list[str]

    @property
    def chain_ok(self) -> bool:
        return self.chain.ok

    @property
    def recomputed_ok(self) -> bool:
        site_ok = all(r.ok for s in self.sites.values() for r in s.rounds)
        central_ok = self.central is None or all(r.ok for r in self.central.rounds)
        return site_ok and central_ok

    @property
    def over_budget(self) -> list[str]:
        return [sid for sid, s in self.sites.items() if s.status == "over"]

    def to_dict(self) -> dict:
        """JSON-ready dict; infinite epsilons are the string "inf" (see privacy.ledger)."""
        def e(x: float | None) -> float | str | None:
            if x is not None and x == -math.inf:
                return "-inf"
            return encode_epsilon(x)

        sites = {}
        for sid, s in self.sites.items():
            sites[sid] = {
                "epsilon": e(s.epsilon),
                "delta": s.delta,
                "budget": e(s.budget),
                "budget_left": e(s.budget_left),
                "steps_total": s.steps_total,
                "accountant": s.accountant,
                "status": s.status,
                "rounds": [
                    dict(asdict(r), epsilon=e(r.epsilon),
                         epsilon_recomputed=e(r.epsilon_recomputed),
                         epsilon_round=e(r.epsilon_round))
                    for r in s.rounds
                ],
            }
        central = None
        if self.central is not None:
            c = self.central
            central = {
                "epsilon": e(c.epsilon),
                "delta": c.delta,
                "accountant": c.accountant,
                "sampling": c.sampling,
                "rounds": [
                    dict(asdict(r), epsilon=e(r.epsilon),
                         epsilon_recomputed=e(r.epsilon_recomputed))
                    for r in c.rounds
                ],
            }
        return {
            "run_dir": self.run_dir,
            "ledger": self.ledger,
            "independent": self.independent,
            "chain_ok": self.chain_ok,
            "chain": {"records": self.chain.records, "bad_line": self.chain.bad_line,
                      "reason": self.chain.reason},
            "recomputed_ok": self.recomputed_ok,
            "sites": sites,
            "central": central,
            "errors": list(self.errors),
            "warnings": list(self.warnings),
            "exit_code": exit_code(self),
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)


# --------------------------------------------------------------------------------------------
# The audit
# --------------------------------------------------------------------------------------------


def _read_records(path: Path) -> list[dict]:
    """Every line that parses as a JSON object (the chain check reports the others)."""
    out = []
    if not path.exists():
        return out
    for raw in path.read_bytes().split(b"\n"):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
        except ValueError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def audit_run(run_dir: Path, independent: str = "pld") -> AuditReport:
    """Audit ``run_dir/ledger.jsonl`` (see the module docstring for what is checked)."""
    if independent not in INDEPENDENT:
        raise ValueError(f"independent must be one of {INDEPENDENT}, got {independent!r}")
    run_dir = Path(run_dir)
    path = run_dir / LEDGER_NAME
    chain = verify_chain(path)
    errors: list[str] = []
    warnings: list[str] = []
    if not chain.ok:
        where = f" at line {chain.bad_line}" if chain.bad_line else ""
        errors.append(f"ledger chain broken{where}: {chain.reason}")

    sites: dict[str, SiteAudit] = {}
    central: CentralAudit | None = None
    central_hist: dict[str, list[tuple[float, float, int]]] = {}
    central_off: dict[str, bool] = {}

    for rec in _read_records(path):
        kind = rec.get("kind")
        try:
            if kind == "site":
                _audit_site_record(rec, sites, independent, errors)
            elif kind == "dp-off" and rec.get("site_id") is not None:
                _audit_site_dp_off(rec, sites)
            elif kind in ("central", "dp-off"):
                central = _audit_central_record(
                    rec, central, central_hist, central_off, independent, errors
                )
            else:
                errors.append(f"seq {rec.get('seq')}: unknown record kind {kind!r}")
        except (KeyError, TypeError, ValueError) as exc:
            errors.append(f"seq {rec.get('seq')}: malformed {kind} record ({exc!r})")

    for sid, s in sites.items():
        if s.status == "over":
            errors.append(
                f"site {sid} is over budget: epsilon {_fmt(s.epsilon)} > budget {_fmt(s.budget)}"
            )
        elif s.status == "near":
            warnings.append(
                f"site {sid} is near its budget: epsilon {_fmt(s.epsilon)} "
                f">= {NEAR_BUDGET:.0%} of {_fmt(s.budget)}"
            )
        elif s.status == "dp-off":
            warnings.append(f"site {sid} trained without DP (epsilon = inf, no budget set)")
        for r in s.rounds:
            if r.refused:
                warnings.append(f"site {sid} refused round {r.round}: {r.note}")
    if central is not None and math.isinf(central.epsilon):
        warnings.append("central DP was off for at least one round (central epsilon = inf)")

    return AuditReport(
        run_dir=str(run_dir), ledger=str(path), independent=independent, chain=chain,
        sites=sites, central=central, errors=errors, warnings=warnings,
    )


def _audit_site_record(rec: dict, sites: dict, independent: str, errors: list[str]) -> None:
    sid = str(rec["site_id"])
    mech = rec["accountant"]
    delta = float(rec["delta"])
    site = sites.setdefault(
        sid, SiteAudit(sid, delta, decode_epsilon(rec["epsilon_budget"]), mech)
    )
    site.budget = decode_epsilon(rec["epsilon_budget"])  # the latest budget applies
    site.accountant = mech
    if site.delta != delta:
        errors.append(f"site {sid} seq {rec['seq']}: delta changed {site.delta} -> {delta}")
    method = _method_for(mech, independent)
    history = [(float(s), float(q), int(n)) for s, q, n in rec["history"]]
    recorded = decode_epsilon(rec["epsilon_cumulative"])
    recomputed = independent_epsilon(history, delta, method)
    notes = []
    ok = _agrees(recorded, recomputed, mech, method)
    if not ok:
        notes.append(
            f"cumulative epsilon {_fmt(recorded)} ({mech}) disagrees with "
            f"{_fmt(recomputed)} ({method})"
        )
    sigma, q, steps = rec["noise_multiplier"], rec["sample_rate"], int(rec["local_steps"])
    refused = bool(rec.get("refused"))
    # The history must only grow, and must end with this round's steps.
    total = sum(n for _, _, n in history)
    prev_total = site.steps_total
    if refused:
        if total < prev_total:
            ok = False
            notes.append(f"history shrank from {prev_total} to {total} steps")
    else:
        if total < prev_total + steps:
            ok = False
            notes.append(
                f"history holds {total} steps, fewer than the {prev_total} before plus this "
                f"round's {steps}"
            )
        if not history or history[-1][0] != sigma or history[-1][1] != q or history[-1][2] < steps:
            ok = False
            notes.append("history does not end with this round's (sigma, q, steps)")
        rec_round = decode_epsilon(rec.get("epsilon_round"))
        if rec_round is not None:
            rc = independent_epsilon([(sigma, q, steps)], delta, method)
            if not _agrees(rec_round, rc, mech, method):
                ok = False
                notes.append(f"round epsilon {_fmt(rec_round)} disagrees with {_fmt(rc)}")
    site.steps_total = max(prev_total, total)
    if not ok:
        errors.append(f"site {sid} round {rec['round']} (seq {rec['seq']}): " + "; ".join(notes))
    site.rounds.append(
        RoundAudit(
            seq=int(rec["seq"]), run_id=str(rec["run_id"]), round=int(rec["round"]),
            steps=steps, noise_multiplier=float(sigma), sample_rate=float(q),
            max_grad_norm=float(rec["max_grad_norm"]),
            epsilon_round=decode_epsilon(rec.get("epsilon_round")),
            epsilon=recorded, epsilon_recomputed=recomputed, ok=ok, refused=refused,
            note=rec.get("refused_reason") if refused else ("; ".join(notes) or None),
        )
    )


def _audit_site_dp_off(rec: dict, sites: dict) -> None:
    sid = str(rec["site_id"])
    budget = decode_epsilon(rec.get("epsilon_budget"))
    site = sites.setdefault(sid, SiteAudit(sid, None, budget, None))
    if budget is not None:
        site.budget = budget
    site.rounds.append(
        RoundAudit(
            seq=int(rec["seq"]), run_id=str(rec["run_id"]), round=int(rec["round"]),
            steps=0, noise_multiplier=None, sample_rate=None, max_grad_norm=None,
            epsilon_round=math.inf, epsilon=math.inf, epsilon_recomputed=math.inf,
            ok=True, dp_off=True, note=rec.get("reason"),
        )
    )


def _audit_central_record(
    rec: dict,
    central: CentralAudit | None,
    hist: dict,
    off: dict,
    independent: str,
    errors: list[str],
) -> CentralAudit:
    run_id = str(rec["run_id"])
    if central is None:
        central = CentralAudit(rec.get("delta"), rec.get("accountant"), rec.get("sampling"))
    if rec["kind"] == "dp-off":
        off[run_id] = True
        central.rounds.append(
            CentralRoundAudit(
                seq=int(rec["seq"]), run_id=run_id, round=int(rec["round"]),
                sampled_clients=None, total_clients=None, server_noise_multiplier=None,
                update_clip_norm=None, sampling=None, epsilon=math.inf,
                epsilon_recomputed=math.inf, ok=True, dp_off=True,
            )
        )
        return central
    delta = float(rec["delta"])
    mech = rec["accountant"]
    central.delta, central.accountant, central.sampling = delta, mech, rec["sampling"]
    h = hist.setdefault(run_id, [])
    h.append((float(rec["server_noise_multiplier"]), central_sample_rate(rec), 1))
    method = _method_for(mech, independent)
    recomputed = math.inf if off.get(run_id) else independent_epsilon(h, delta, method)
    recorded = decode_epsilon(rec["epsilon_cumulative"])
    ok = _agrees(recorded, recomputed, mech, method)
    if not ok:
        errors.append(
            f"central round {rec['round']} (seq {rec['seq']}): epsilon {_fmt(recorded)} "
            f"({mech}) disagrees with {_fmt(recomputed)} ({method}, {len(h)} rounds, "
            f"sampling={rec['sampling']})"
        )
    central.rounds.append(
        CentralRoundAudit(
            seq=int(rec["seq"]), run_id=run_id, round=int(rec["round"]),
            sampled_clients=int(rec["sampled_clients"]),
            total_clients=int(rec["total_clients"]),
            server_noise_multiplier=float(rec["server_noise_multiplier"]),
            update_clip_norm=float(rec["update_clip_norm"]), sampling=rec["sampling"],
            epsilon=recorded, epsilon_recomputed=recomputed, ok=ok,
        )
    )
    return central


def exit_code(report: AuditReport) -> int:
    """Bit mask: 1 chain broken, 2 a recomputed epsilon disagrees, 4 a site over budget."""
    code = 0
    if not report.chain_ok:
        code |= EXIT_CHAIN
    if not report.recomputed_ok:
        code |= EXIT_RECOMPUTE
    if report.over_budget:
        code |= EXIT_OVER_BUDGET
    return code


# --------------------------------------------------------------------------------------------
# Presentation
# --------------------------------------------------------------------------------------------


def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "-"
    if math.isinf(x):
        return "∞" if x > 0 else "-∞"
    return f"{x:.{digits}f}"


def render_table(report: AuditReport):
    """A rich renderable: sites x rounds (cumulative epsilon), budget, left, status; the
    central epsilon; the chain/recompute verdict; errors and warnings."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    rounds = sorted({r.round for s in report.sites.values() for r in s.rounds})
    table = Table(title=f"Privacy audit: {report.run_dir}", show_lines=False)
    table.add_column("site", style="bold")
    for rnd in rounds:
        table.add_column(f"r{rnd}", justify="right")
    for col in ("epsilon", "budget", "left", "status"):
        table.add_column(col, justify="right")
    style = {"ok": "green", "near": "yellow", "over": "bold red", "dp-off": "red",
             "no budget": "cyan"}
    for sid, s in sorted(report.sites.items()):
        by_round: dict[int, RoundAudit] = {}
        for r in s.rounds:
            by_round[r.round] = r  # the last record of a round wins (a re-run round)
        cells = []
        for rnd in rounds:
            r = by_round.get(rnd)
            if r is None:
                cells.append("")
            else:
                mark = "" if r.ok else " ✗"
                mark += " (refused)" if r.refused else ""
                cells.append(_fmt(r.epsilon_effective) + mark)
        left = s.budget_left
        table.add_row(sid, *cells, _fmt(s.epsilon), _fmt(s.budget), _fmt(left),
                      Text(s.status, style=style.get(s.status, "")))
    parts: list[Any] = [table]
    if report.central is not None:
        c = report.central
        parts.append(Text(
            f"central: epsilon {_fmt(c.epsilon)} at delta {c.delta} "
            f"({c.accountant}, sampling={c.sampling}, {len(c.rounds)} rounds)"
        ))
    parts.append(Text(
        f"chain: {'ok' if report.chain_ok else 'BROKEN'} ({report.chain.records} records)   "
        f"recomputed with {report.independent}: "
        f"{'ok' if report.recomputed_ok else 'MISMATCH'}   exit code {exit_code(report)}",
        style="green" if exit_code(report) == 0 else "bold red",
    ))
    for e in report.errors:
        parts.append(Text(f"ERROR: {e}", style="bold red"))
    for w in report.warnings:
        parts.append(Text(f"warning: {w}", style="yellow"))
    return Group(*parts)


def plot_epsilon(report: AuditReport, png_path: Path) -> Path:
    """PNG of cumulative epsilon per round per site (solid), budgets (dashed), central
    (black dotted). Infinite epsilons are drawn as an 'x' at the top, labelled DP off."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    finite = [r.epsilon_effective for s in report.sites.values()
              for r in s.rounds] + [s.budget for s in report.sites.values() if s.budget]
    finite = [v for v in finite if v is not None and math.isfinite(v)] or [1.0]
    top = max(finite) * 1.1
    for i, (sid, s) in enumerate(sorted(report.sites.items())):
        color = f"C{i % 10}"
        xs = [r.round for r in s.rounds]
        ys = [r.epsilon_effective for r in s.rounds]
        ax.plot(xs, [y if math.isfinite(y) else float("nan") for y in ys],
                marker="o", color=color, label=f"site {sid}")
        inf_x = [x for x, y in zip(xs, ys) if math.isinf(y)]
        if inf_x:
            ax.plot(inf_x, [top] * len(inf_x), "x", color=color, markersize=10,
                    label=f"site {sid}: DP off (∞)")
        if s.budget is not None and math.isfinite(s.budget):
            ax.axhline(s.budget, color=color, linestyle="--", linewidth=1)
    if report.central is not None and report.central.rounds:
        c = report.central
        ys = [r.epsilon_effective for r in c.rounds]
        ax.plot([r.round for r in c.rounds],
                [y if math.isfinite(y) else float("nan") for y in ys],
                "k:", marker=".", label="central")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("cumulative epsilon")
    ax.set_title("Privacy spent (dashed: site budgets)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return png_path


def run_audit_command(
    run_dir: Path, as_json: bool = False, plot: Path | None = None,
    independent: str = "pld",
) -> int:
    """The body of ``fedvid audit RUN_DIR [--json] [--plot PNG]``: prints, returns exit code."""
    from rich.console import Console

    report = audit_run(Path(run_dir), independent=independent)
    if as_json:
        print(report.to_json())
    else:
        Console(width=max(Console().width, 140)).print(render_table(report))
    if plot is not None:
        plot_epsilon(report, Path(plot))
    return exit_code(report)
