"""``fedvid audit``: check privacy ledgers against a hostile coordinator, and every epsilon.

Two views:

* ``fedvid audit RUN_DIR [--site-keys FILE] [--site-dir DIR ...]`` (`audit_run`): the run
  ledger the coordinator wrote, checked against the sites;
* ``fedvid audit --site-dir DIR [--site-keys FILE]`` (`audit_sites`): one site's own state,
  its ledger and its budget file (a privacy officer's view).

Who is trusted: a site's records are signed by its ledger key (`privacy.ledger.LedgerKey`);
the coordinator cannot sign. Keys come, in order of strength, from ``--site-keys`` (pinned
out of band: verified against a hostile coordinator), from the sites' own directories given
with ``--site-dir`` (as strong as the auditor's trust in those folders), or, with neither, from
``RUN_DIR/sites/SITE/`` (a simulation, where one user plays every site: valid against an
edited run ledger, not against a coordinator that also writes the sites' folders). With no
key at all the signatures are not verified: arithmetic only, a warning, not a clean audit.

What is checked:
  * the run ledger's hash chain; every site record's signature against its site's key (a
    record under another site's id, an edited or an invented one fails; a site sends only
    "site" and "dp-off" records, so a "central" record naming a site fails too);
  * with a site's directory: its chain and signatures; every record of that site in the run
    ledger is in the site's ledger (same body, same signature), and every record of the
    site's ledger for a run of the run ledger is in the run ledger (a deleted tail is found,
    and the missing records are still accounted, so an overspent site stays overspent; only a
    round the site's budget shows it never finished, a site killed mid-round after its
    write-ahead record, is a warning rather than an error); its
    budget file (``budget.json``): its charges against the site's records, its epsilon against
    the last record's;
  * every epsilon, ONE-SIDED: a recorded epsilon may be over-stated (safe) but never below
    what the recorded mechanism costs: not below `privacy.accounting.pld_epsilon_optimistic`
    (a lower estimate of the true epsilon) nor, for the enforced RDP figures, below the RDP
    recomputation minus a relative 1e-3 (`epsilon_floor`); "inf" is handled everywhere and a
    site that released units without DP must say "inf";
  * per site: one delta and one privacy unit; its epsilon never decreases and its worst
    unit's history never loses steps; a site over its budget is an error, at >= 90% a warning;
  * central records (the coordinator's own statement, so arithmetic only): not below the
    optimistic PLD of one Gaussian step per round at q = 1 (no amplification claimed).
  * an audit with no site record at all is an error, never a clean result.

With ``--empirical`` (`privacy.empirical_audit`), each site dir's audit canaries of the audited
runs give a measured lower bound on epsilon, compared with the epsilon accounted for them.

Exit code (`exit_code`) is a bit mask: 1 a chain broken, a signature invalid or records
missing; 2 a recomputation disagrees (an under-stated epsilon, an inconsistent record);
4 a site over budget; 8 (``--empirical``) a measured lower bound above the accounted epsilon,
or no canaries to audit; 0 when all is well.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from privacy.accounting import (
    filter_epsilon,
    independent_rdp_epsilon,
    merge_history,
    pld_epsilon,
    pld_epsilon_optimistic,
)
from privacy.ledger import (
    CHAIN_FIELDS,
    LEDGER_NAME,
    PUBLIC_KEY_NAME,
    SITE_KINDS,
    ChainCheck,
    canonical_json,
    decode_epsilon,
    encode_epsilon,
    public_key_from_text,
    sent_record,
    verify_chain,
    verify_site_record,
)

if TYPE_CHECKING:  # the empirical audit imports torch: only `--empirical` pays for it
    from privacy.empirical_audit import CanaryAudit

INDEPENDENT = ("pld", "rdp")
REL_TOL = 1e-3  # how far below the RDP recomputation a recorded epsilon may be (float noise)
NEAR_BUDGET = 0.9

EXIT_CHAIN = 1
EXIT_RECOMPUTE = 2
EXIT_OVER_BUDGET = 4
EXIT_EMPIRICAL = 8

# Where the site keys came from, strongest first, and what that verifies.
KEY_SOURCES = ("pinned", "site-dir", "run-dir", "none")
VERIFIED_AGAINST = {
    "pinned": "a hostile coordinator (site records signed by keys pinned with --site-keys)",
    "site-dir": "a hostile coordinator (site records signed by the keys in the sites' own "
                "directories given with --site-dir)",
    "run-dir": "an edited run ledger only (simulation: keys from RUN_DIR/sites, which the "
               "coordinator also writes)",
    "none": "signatures not verified: arithmetic only",
}


# --------------------------------------------------------------------------------------------
# The epsilon the audit accepts
# --------------------------------------------------------------------------------------------


def epsilon_floor(history: Iterable[Sequence[float]], delta: float) -> float:
    """The least epsilon the audit accepts for ``history`` at ``delta``.

    The larger of the optimistic PLD (below the true epsilon, so no honest figure is below
    it) and the RDP recomputation less `REL_TOL`: dp-accounting's RDP with Opacus's orders,
    or Opacus's own where it is lower (dp-accounting falls back to looser bounds for small
    fractional orders at small noise, up to ~1% above the exact RDP at epsilon <= 20).
    Infinite when a step has no noise.
    """
    h = merge_history(history)
    if not h:
        return 0.0
    if any(sigma <= 0 for sigma, _, _ in h):
        return math.inf
    rdp = min(independent_rdp_epsilon(h, delta), filter_epsilon(h, delta))
    return max(pld_epsilon_optimistic(h, delta), rdp * (1 - REL_TOL))


def independent_epsilon(history: Sequence[Sequence[float]], delta: float, method: str = "pld") -> float:
    """The audit's independent figure for ``history``: dp-accounting PLD (pessimistic, the
    figure reported beside the enforced one) or, with ``method="rdp"``, dp-accounting RDP."""
    if method not in INDEPENDENT:
        raise ValueError(f"independent accountant must be one of {INDEPENDENT}, got {method!r}")
    h = merge_history(history)
    if any(sigma <= 0 for sigma, _, _ in h):
        return math.inf
    return pld_epsilon(h, delta) if method == "pld" else independent_rdp_epsilon(h, delta)


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


@dataclass
class RoundAudit:
    """One site record as recorded and as checked."""

    seq: int | None  # line in the run ledger; None: only in the site's own ledger
    site_seq: int | None  # line in the site's own ledger (its site_chain)
    run_id: str
    round: int
    kind: str
    steps: int
    noise_multiplier: float | None
    sample_rate: float | None
    max_grad_norm: float | None
    epsilon_round: float | None
    epsilon: float  # the site's cumulative epsilon, as recorded
    epsilon_pld: float | None
    epsilon_budget: float | None
    epsilon_floor: float  # the least the audit accepts (`epsilon_floor`)
    epsilon_recomputed: float  # the independent figure (`independent_epsilon`)
    ok: bool
    signature: str = "unverified"  # "valid", "invalid" or "unverified"
    refused: bool = False
    dp_off: bool = False
    released_without_dp: int = 0
    missing_from_run_ledger: bool = False
    note: str | None = None

    @property
    def epsilon_effective(self) -> float:
        """The recorded epsilon when it passed, else the largest of recorded, recomputed and
        floor (an unreadable record counts as infinite)."""
        if self.ok:
            return self.epsilon
        return max(self.epsilon, self.epsilon_recomputed, self.epsilon_floor)


@dataclass
class BudgetFileAudit:
    """A site's budget file (``PRIVACY_DIR/budget.json``) as read through `SiteBudget`."""

    path: str
    unit: str
    delta: float
    epsilon_budget: float
    epsilon: float  # max over the site's units (inf once a unit was released without DP)
    epsilon_pld: float
    units: int
    released: int
    charges: int
    unrecorded_charges: int


@dataclass
class SiteAudit:
    site_id: str
    unit: str | None = None
    delta: float | None = None
    budget: float | None = None  # the latest record's budget
    keys: str = "none"  # where the key that checked this site's signatures came from
    rounds: list[RoundAudit] = field(default_factory=list)
    budget_file: BudgetFileAudit | None = None
    randomness: set[str] = field(default_factory=set)

    @property
    def epsilon(self) -> float:
        """The site's epsilon: the largest over its records (as checked) and its budget file."""
        values = [r.epsilon_effective for r in self.rounds]
        if self.budget_file is not None:
            values.append(self.budget_file.epsilon)
        return max(values, default=0.0)

    @property
    def epsilon_pld(self) -> float | None:
        values = [math.inf if r.dp_off else r.epsilon_pld for r in self.rounds]
        if self.budget_file is not None:
            values.append(self.budget_file.epsilon_pld)
        values = [v for v in values if v is not None]
        return max(values) if values else None

    @property
    def budget_left(self) -> float | None:
        if self.budget is None or math.isinf(self.budget):
            return None
        return self.budget - self.epsilon

    @property
    def overspent_rounds(self) -> list[int]:
        """Rounds whose epsilon was over the budget the record itself stated."""
        return [r.round for r in self.rounds
                if r.epsilon_budget is not None and r.epsilon_effective > r.epsilon_budget]

    @property
    def status(self) -> str:
        """"ok", "near" (>= 90% of budget), "over", "no budget" or "dp-off" (no budget)."""
        eps = self.epsilon
        if self.budget is None or math.isinf(self.budget):
            return "dp-off" if math.isinf(eps) else "no budget"
        if eps > self.budget or self.overspent_rounds:
            return "over"
        if eps >= NEAR_BUDGET * self.budget:
            return "near"
        return "ok"

    @property
    def signatures(self) -> str:
        states = {r.signature for r in self.rounds}
        if "invalid" in states:
            return "invalid"
        return states.pop() if len(states) == 1 else ("mixed" if states else "none")


@dataclass
class CentralRoundAudit:
    seq: int
    run_id: str
    round: int
    sites_expected: int | None
    sites_contributed: int | None
    server_noise_multiplier: float | None
    update_clip_norm: float | None
    epsilon: float
    epsilon_floor: float
    ok: bool
    dp_off: bool = False

    @property
    def epsilon_effective(self) -> float:
        return self.epsilon if self.ok else max(self.epsilon, self.epsilon_floor)


@dataclass
class CentralAudit:
    delta: float | None = None
    rounds: list[CentralRoundAudit] = field(default_factory=list)

    @property
    def epsilon(self) -> float:
        return self.rounds[-1].epsilon_effective if self.rounds else 0.0


@dataclass
class AuditReport:
    """Everything an audit found. `to_json` for machines, `render_table` for people."""

    run_dir: str | None
    ledger: str | None
    independent: str
    chain: ChainCheck | None  # the run ledger's; None for a site-only audit
    sites: dict[str, SiteAudit]
    central: CentralAudit | None
    errors: list[str]
    warnings: list[str]
    code: int = 0  # the bits of `exit_code` found while auditing
    keys: str = "none"  # the weakest key source used (see KEY_SOURCES)
    unverified_sites: list[str] = field(default_factory=list)
    empirical: dict[str, list[CanaryAudit]] | None = None  # --empirical: site -> its audited runs

    @property
    def chain_ok(self) -> bool:
        """No chain broken, no signature invalid, no record missing."""
        return not self.code & EXIT_CHAIN

    @property
    def recomputed_ok(self) -> bool:
        return not self.code & EXIT_RECOMPUTE

    @property
    def over_budget(self) -> list[str]:
        return sorted(sid for sid, s in self.sites.items() if s.status == "over")

    @property
    def verified_against(self) -> str:
        text = VERIFIED_AGAINST[self.keys]
        if self.keys != "none" and self.unverified_sites:
            text += f"; NOT verified for {', '.join(self.unverified_sites)} (no key)"
        return text

    def to_dict(self) -> dict:
        """JSON-ready dict; infinite epsilons are the string "inf" (see privacy.ledger), and an
        infinitely overspent budget's "left" is "-inf"."""
        def e(x: float | None) -> float | str | None:
            return "-inf" if x == -math.inf else encode_epsilon(x)

        sites = {}
        for sid, s in sorted(self.sites.items()):
            sites[sid] = {
                "unit": s.unit,
                "epsilon": e(s.epsilon),
                "epsilon_pld": e(s.epsilon_pld),
                "delta": s.delta,
                "budget": e(s.budget),
                "budget_left": e(s.budget_left),
                "status": s.status,
                "keys": s.keys,
                "signatures": s.signatures,
                "randomness": sorted(s.randomness),
                "budget_file": None if s.budget_file is None else {
                    k: (e(v) if k in ("epsilon", "epsilon_pld", "epsilon_budget") else v)
                    for k, v in asdict(s.budget_file).items()
                },
                **_empirical_fields(self.empirical, sid),
                "rounds": [
                    dict(asdict(r), **{k: e(getattr(r, k)) for k in (
                        "epsilon", "epsilon_round", "epsilon_pld", "epsilon_budget",
                        "epsilon_floor", "epsilon_recomputed")})
                    for r in s.rounds
                ],
            }
        central = None
        if self.central is not None:
            c = self.central
            central = {
                "epsilon": e(c.epsilon),
                "delta": c.delta,
                "accountant": "pld",
                "sampling": "none",
                "verified": "arithmetic only (the coordinator's own records)",
                "rounds": [dict(asdict(r), epsilon=e(r.epsilon), epsilon_floor=e(r.epsilon_floor))
                           for r in c.rounds],
            }
        chain = None if self.chain is None else {
            "records": self.chain.records, "bad_line": self.chain.bad_line, "reason": self.chain.reason}
        return {
            "run_dir": self.run_dir,
            "ledger": self.ledger,
            "independent": self.independent,
            "verified_against": self.verified_against,
            "threat_model": {"keys": self.keys, "unverified_sites": list(self.unverified_sites),
                             "text": self.verified_against},
            "chain_ok": self.chain_ok,
            "chain": chain,
            "recomputed_ok": self.recomputed_ok,
            "sites": sites,
            "central": central,
            "errors": list(self.errors),
            "warnings": list(self.warnings),
            "empirical_ok": None if self.empirical is None else not self.code & EXIT_EMPIRICAL,
            "exit_code": exit_code(self),
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)


def _empirical_fields(empirical: dict[str, list[CanaryAudit]] | None, sid: str) -> dict:
    if empirical is None:
        return {}
    audits = empirical.get(sid, [])
    return {"empirical_epsilon_lower": max((a.empirical_epsilon_lower for a in audits), default=None),
            "empirical": [a.to_dict() for a in audits]}


def exit_code(report: AuditReport) -> int:
    """Bit mask: 1 chain/signature/missing records, 2 an epsilon under-stated or a record
    inconsistent, 4 a site over budget, 8 an empirical lower bound above the accounted epsilon."""
    code = report.code
    if report.over_budget:
        code |= EXIT_OVER_BUDGET
    return code


class _Findings:
    def __init__(self) -> None:
        self.errors: list[str] = []
        self.warnings: list[str] = []
        self.code = 0

    def error(self, bit: int, message: str) -> None:
        self.code |= bit
        self.errors.append(message)

    def warn(self, message: str) -> None:
        self.warnings.append(message)


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def load_site_keys(path: Path) -> dict[str, str]:
    """The pinned keys file of ``--site-keys``: a JSON object ``{site_id: public key text}``
    (the text `fedvid ledger-key` prints, e.g. "ed25519:..."), each key checked."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: site keys must be a JSON object {{site_id: key}} ({exc})") from None
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise ValueError(f"{path}: site keys must be a JSON object {{site_id: \"ed25519:...\"}}")
    for sid, text in data.items():
        try:
            public_key_from_text(text)
        except ValueError as exc:
            raise ValueError(f"{path}: site {sid}: {exc}") from None
    return {str(k): v.strip() for k, v in data.items()}


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


@dataclass
class _SiteDir:
    path: Path
    site_id: str
    lines: list[dict]
    public_key: str | None


def _load_site_dir(path: Path, f: _Findings) -> _SiteDir:
    path = Path(path)
    ledger = path / LEDGER_NAME
    chain = verify_chain(ledger)
    if not chain.ok:
        where = f" at line {chain.bad_line}" if chain.bad_line else ""
        f.error(EXIT_CHAIN, f"site dir {path}: its ledger chain is broken{where}: {chain.reason}")
    lines = _read_records(ledger)
    ids = sorted({str(line.get("site_id")) for line in lines})
    if len(ids) > 1:
        f.error(EXIT_CHAIN, f"site dir {path}: its ledger holds records of several sites {ids}")
    pub = path / PUBLIC_KEY_NAME
    return _SiteDir(path, ids[0] if ids else path.name, lines,
                    pub.read_text().strip() if pub.is_file() else None)


def _sent_by_seq(sd: _SiteDir) -> dict[int, dict]:
    """{seq: the record the site sent} for the well-formed lines of the site's ledger (the
    chain check reports the others)."""
    return {line["seq"]: sent_record(line) for line in sd.lines
            if isinstance(line.get("seq"), int) and isinstance(line.get("prev_hash"), str)}


def _same(a: dict, b: dict) -> bool:
    try:
        return canonical_json(a) == canonical_json(b)
    except ValueError:  # NaN or inf smuggled into a line: not what a site writes
        return False


def _site_seq(rec: dict) -> int | None:
    chain = rec.get("site_chain")
    seq = chain.get("seq") if isinstance(chain, dict) else None
    return seq if isinstance(seq, int) else None


def _without_run_chain(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if k not in CHAIN_FIELDS}


def _eps(value: Any, name: str) -> float | None:
    x = decode_epsilon(value)
    if x is not None and (math.isnan(x) or x < 0):
        raise ValueError(f"{name} = {value!r}")
    return x


def _parse_history(raw: Any) -> tuple[tuple[float, float, int], ...]:
    if not isinstance(raw, list):
        raise ValueError("history is not a list")
    out = []
    for entry in raw:
        sigma, q, steps = entry
        sigma, q = float(sigma), float(q)
        if not (math.isfinite(sigma) and sigma >= 0 and 0 < q <= 1 and int(steps) == steps >= 0):
            raise ValueError(f"history entry {entry!r}")
        out.append((sigma, q, int(steps)))
    return merge_history(out)


# --------------------------------------------------------------------------------------------
# Site records
# --------------------------------------------------------------------------------------------


@dataclass
class _Entry:
    rec: dict  # as sent (no run chain fields)
    seq: int | None  # run-ledger line
    signature: str
    missing: bool = False


class _SiteChecker:
    """Checks one site's records in the order the site wrote them."""

    def __init__(self, site: SiteAudit, f: _Findings, independent: str) -> None:
        self.site, self.f, self.independent = site, f, independent
        self.last_epsilon: float | None = None
        self.last_history: tuple | None = None

    def add(self, entry: _Entry) -> None:
        rec, s = entry.rec, self.site
        where = f"site {s.site_id} run {rec.get('run_id')} round {rec.get('round')} " + (
            f"(run ledger seq {entry.seq})" if entry.seq is not None else f"(site ledger seq {_site_seq(rec)})")
        try:
            r, notes = (self._site(rec) if rec.get("kind") == "site" else self._dp_off(rec))
        except (KeyError, TypeError, ValueError) as exc:
            r = RoundAudit(entry.seq, _site_seq(rec), str(rec.get("run_id")), _int(rec.get("round")),
                           str(rec.get("kind")), 0, None, None, None, None, math.inf, None, None,
                           math.inf, math.inf, False)
            notes = [f"malformed record ({exc!r}): counted as epsilon inf"]
        r.seq, r.site_seq, r.signature, r.missing_from_run_ledger = (
            entry.seq, _site_seq(rec), entry.signature, entry.missing)
        if self.last_epsilon is not None and r.epsilon < self.last_epsilon * (1 - 1e-9):
            notes.append(f"epsilon decreased from {_fmt(self.last_epsilon)} to {_fmt(r.epsilon)}")
        if notes:
            r.ok = False
            r.note = "; ".join(([r.note] if r.note else []) + notes)
            self.f.error(EXIT_RECOMPUTE, f"{where}: " + "; ".join(notes))
        self.last_epsilon = max(self.last_epsilon or 0.0, r.epsilon_effective)
        s.rounds.append(r)

    def _common(self, rec: dict, notes: list[str]) -> None:
        s = self.site
        unit = rec.get("unit")
        if unit is not None:
            if s.unit is None:
                s.unit = str(unit)
            elif unit != s.unit:
                notes.append(f"privacy unit changed from {s.unit!r} to {unit!r}")
        budget = _eps(rec.get("epsilon_budget"), "epsilon_budget")
        if budget is not None or rec.get("kind") == "site":
            s.budget = budget  # the latest budget applies

    def _site(self, rec: dict) -> tuple[RoundAudit, list[str]]:
        s, notes = self.site, []
        delta = float(rec["delta"])
        if not 0 < delta < 1:
            raise ValueError(f"delta = {delta}")
        from privacy.site_budget import UNITS

        if rec["unit"] not in UNITS:
            raise ValueError(f"unit = {rec['unit']!r}")
        history = _parse_history(rec["history"])
        sigma, q, steps = float(rec["noise_multiplier"]), float(rec["sample_rate"]), int(rec["local_steps"])
        refused, released = bool(rec["refused"]), int(rec.get("released_without_dp") or 0)
        eps = _eps(rec["epsilon_cumulative"], "epsilon_cumulative")
        if eps is None:
            raise ValueError("epsilon_cumulative is null")
        eps_round = _eps(rec.get("epsilon_round"), "epsilon_round")
        eps_pld = _eps(rec.get("epsilon_pld"), "epsilon_pld")
        self._common(rec, notes)
        s.randomness.add(str(rec.get("randomness")))
        if rec.get("accountant") != "rdp":
            notes.append(f"accountant {rec.get('accountant')!r}: the enforced epsilon must be the RDP filter's")
        if s.delta is None:
            s.delta = delta
        elif delta != s.delta:
            notes.append(f"delta changed from {s.delta} to {delta}")

        floor = math.inf if released else epsilon_floor(history, delta)
        recomputed = math.inf if released else independent_epsilon(history, delta, self.independent)
        if eps < floor:
            why = f"{released} units released without DP" if released else "its history"
            notes.append(f"epsilon {_fmt(eps, 4)} is below the {_fmt(floor, 4)} that {why} costs")
        round_floor = 0.0
        if refused and steps:
            notes.append(f"a refused round claims {steps} steps")
        elif not refused and steps:
            round_floor = epsilon_floor([(sigma, q, steps)], delta)
            if eps_round is None or eps_round < round_floor:
                notes.append(f"round epsilon {_fmt(eps_round, 4)} is below the {_fmt(round_floor, 4)} "
                             f"of its {steps} steps at noise {sigma:g}, sample rate {q:g}")
            if eps < round_floor:
                notes.append(f"epsilon {_fmt(eps, 4)} is below this round's alone ({_fmt(round_floor, 4)})")
        if eps_pld is not None:
            pld_floor = math.inf if released else (
                math.inf if any(sg <= 0 for sg, _, _ in history) else pld_epsilon_optimistic(history, delta))
            if eps_pld < pld_floor:
                notes.append(f"PLD epsilon {_fmt(eps_pld, 4)} is below the optimistic PLD {_fmt(pld_floor, 4)}")
        if self.last_history is not None and _shrank(history, self.last_history, delta):
            notes.append("the worst unit's history lost steps since the site's previous record")
        self.last_history = history
        return RoundAudit(
            None, None, str(rec["run_id"]), int(rec["round"]), "site", steps, sigma, q,
            float(rec["max_grad_norm"]), eps_round, eps, eps_pld, s.budget, floor, recomputed, True,
            refused=refused, released_without_dp=released,
            note=str(rec.get("refused_reason")) if refused else None,
        ), notes

    def _dp_off(self, rec: dict) -> tuple[RoundAudit, list[str]]:
        notes: list[str] = []
        self._common(rec, notes)
        eps = _eps(rec.get("epsilon_cumulative"), "epsilon_cumulative")
        if eps != math.inf:
            notes.append(f"a dp-off record must state epsilon inf, not {_fmt(eps)}")
        return RoundAudit(
            None, None, str(rec["run_id"]), int(rec["round"]), "dp-off", 0, None, None, None,
            math.inf, math.inf, math.inf, self.site.budget, math.inf, math.inf, True, dp_off=True,
            note=rec.get("reason"),
        ), notes


def _int(x: Any) -> int:
    try:
        return int(x)
    except (TypeError, ValueError):
        return -1


def _shrank(new: tuple, old: tuple, delta: float) -> bool:
    """Whether the worst unit's history lost steps: some (sigma, q) has fewer steps than before,
    and it is not that the worst unit changed to one that cost more."""
    counts_new, counts_old = Counter(), Counter()
    for sigma, q, n in new:
        counts_new[(sigma, q)] += n
    for sigma, q, n in old:
        counts_old[(sigma, q)] += n
    if all(counts_new[k] >= n for k, n in counts_old.items()):
        return False
    return epsilon_floor(new, delta) < epsilon_floor(old, delta)


# --------------------------------------------------------------------------------------------
# Central records
# --------------------------------------------------------------------------------------------


class _CentralChecker:
    def __init__(self, f: _Findings) -> None:
        self.f = f
        self.audit = CentralAudit()
        self.history: dict[str, list] = {}
        self.off: dict[str, bool] = {}
        self.delta: dict[str, float] = {}

    def add(self, rec: dict) -> None:
        seq, run_id = _int(rec.get("seq")), str(rec.get("run_id"))
        if rec.get("kind") == "dp-off":
            self.off[run_id] = True
            self.audit.rounds.append(CentralRoundAudit(
                seq, run_id, _int(rec.get("round")), None, None, None, None, math.inf, math.inf,
                True, dp_off=True))
            return
        notes = []
        try:
            sigma, delta = float(rec["server_noise_multiplier"]), float(rec["delta"])
            expected, contributed = int(rec["sites_expected"]), int(rec["sites_contributed"])
            recorded = _eps(rec["epsilon_cumulative"], "epsilon_cumulative")
            clip = float(rec["update_clip_norm"])
            rnd = int(rec["round"])
        except (KeyError, TypeError, ValueError) as exc:
            self.f.error(EXIT_RECOMPUTE, f"central record (seq {seq}): malformed ({exc!r})")
            self.audit.rounds.append(CentralRoundAudit(
                seq, run_id, _int(rec.get("round")), None, None, None, None, math.inf, math.inf, False))
            return
        if rec.get("sampling") != "none" or rec.get("adjacency") != "add-or-remove-one-site":
            notes.append(f"sampling={rec.get('sampling')!r}, adjacency={rec.get('adjacency')!r}: "
                         "audited as no amplification, add-or-remove-one-site")
        if not 0 <= contributed <= expected or expected < 1:
            notes.append(f"{contributed} sites contributed but the noise is calibrated to {expected}")
        if self.delta.setdefault(run_id, delta) != delta:
            notes.append(f"delta changed from {self.delta[run_id]} to {delta}")
        history = self.history.setdefault(run_id, [])
        history.append((sigma, 1.0, 1))
        floor = (math.inf if self.off.get(run_id) or recorded is None or sigma <= 0
                 else pld_epsilon_optimistic(history, delta))
        if recorded is None or recorded < floor:
            notes.append(f"epsilon {_fmt(recorded, 4)} is below the optimistic PLD {_fmt(floor, 4)} "
                         f"of {len(history)} rounds at noise {sigma:g}")
        if notes:
            self.f.error(EXIT_RECOMPUTE, f"central round {rnd} (seq {seq}): " + "; ".join(notes))
        self.audit.delta = delta
        self.audit.rounds.append(CentralRoundAudit(
            seq, run_id, rnd, expected, contributed, sigma, clip,
            math.inf if recorded is None else recorded, floor, not notes))


# --------------------------------------------------------------------------------------------
# The audits
# --------------------------------------------------------------------------------------------


def audit_run(
    run_dir: Path,
    site_keys: dict[str, str] | None = None,
    site_dirs: list[Path] | None = None,
    independent: str = "pld",
    empirical: bool = False,
) -> AuditReport:
    """Audit ``run_dir/ledger.jsonl`` (see the module docstring).

    ``site_keys``: {site_id: public key text} pinned out of band (`load_site_keys`).
    ``site_dirs``: sites' privacy dirs to cross-check (ledger, key, budget file). With
    neither, the simulated sites' dirs ``run_dir/sites/*`` are used, and the report says so.
    """
    if independent not in INDEPENDENT:
        raise ValueError(f"independent must be one of {INDEPENDENT}, got {independent!r}")
    run_dir = Path(run_dir)
    path = run_dir / LEDGER_NAME
    f = _Findings()
    chain = verify_chain(path)
    if not chain.ok:
        where = f" at line {chain.bad_line}" if chain.bad_line else ""
        f.error(EXIT_CHAIN, f"run ledger chain broken{where}: {chain.reason}")
    records = _read_records(path)

    dir_source = "site-dir"
    if site_keys is None and site_dirs is None:
        sites_root = run_dir / "sites"
        site_dirs = sorted(p for p in sites_root.iterdir() if p.is_dir()) if sites_root.is_dir() else []
        dir_source = "run-dir"
    dirs = [_load_site_dir(d, f) for d in (site_dirs or [])]
    keys, source = _resolve_keys(site_keys, dirs, dir_source, f)

    entries: dict[str, list[_Entry]] = {}
    central = _CentralChecker(f)
    unverified: set[str] = set()
    for rec in records:
        kind, sid, seq = rec.get("kind"), rec.get("site_id"), rec.get("seq")
        if kind == "central" or (kind == "dp-off" and sid is None):
            if sid is not None:
                f.error(EXIT_CHAIN, f"run ledger seq {seq}: a {kind!r} record claims to be from site {sid}: "
                                    "a site only sends 'site' and 'dp-off' records")
            else:
                central.add(rec)
        elif kind in SITE_KINDS:
            signature = _check_signature(rec, keys, source, f, unverified)
            entries.setdefault(str(sid), []).append(_Entry(_without_run_chain(rec), seq, signature))
        else:
            f.error(EXIT_CHAIN, f"run ledger seq {seq}: unknown record kind {kind!r}")

    run_ids = {str(r.get("run_id")) for r in records if r.get("run_id") is not None}
    for sd in dirs:
        _cross_check(sd, entries.setdefault(sd.site_id, []), run_ids, keys.get(sd.site_id), f)
        if not entries[sd.site_id]:
            del entries[sd.site_id]

    sites = {}
    for sid, site_entries in sorted(entries.items()):
        site = SiteAudit(sid, keys=source if sid in keys else "none")
        checker = _SiteChecker(site, f, independent)
        for entry in _in_site_order(sid, site_entries, f, has_dir=any(d.site_id == sid for d in dirs)):
            checker.add(entry)
        sites[sid] = site
    for sd in dirs:
        if sd.site_id in sites:
            sites[sd.site_id].budget_file = _audit_budget_file(sd, sites[sd.site_id], f)

    _finish(sites, f)
    if not sites:
        f.error(EXIT_CHAIN, "the run ledger holds no site record: nothing was audited")
    for sid in sorted(set(site_keys or ()) - set(sites)):
        f.warn(f"site {sid} has a pinned key but no record in this run ledger")
    if central.audit.rounds and math.isinf(central.audit.epsilon):
        f.warn("central DP was off for at least one round (central epsilon = inf)")
    if source == "none":
        f.warn("signatures not verified: arithmetic only (pin the sites' keys with --site-keys FILE)")
    elif source == "run-dir":
        f.warn("site keys and ledgers came from RUN_DIR/sites, which the coordinator writes too: "
               "valid against an edited run ledger, not against a hostile coordinator")
    measured = _empirical(dirs, run_ids, f) if empirical else None
    return AuditReport(
        run_dir=str(run_dir), ledger=str(path), independent=independent, chain=chain, sites=sites,
        central=central.audit if central.audit.rounds else None, errors=f.errors, warnings=f.warnings,
        code=f.code, keys=source, unverified_sites=sorted(unverified),
        empirical=measured,
    )


def audit_sites(
    site_dirs: list[Path], site_keys: dict[str, str] | None = None, independent: str = "pld",
    empirical: bool = False,
) -> AuditReport:
    """Audit sites' own state (``fedvid audit --site-dir DIR`` without a run): each site's
    chain, its signatures (with its own ``ledger-key.pub``, or ``site_keys`` when given), its
    records' epsilons and its budget file. The site's epsilon is its budget file's (the
    maximum over its units) unless a record states more."""
    if independent not in INDEPENDENT:
        raise ValueError(f"independent must be one of {INDEPENDENT}, got {independent!r}")
    if not site_dirs:
        raise ValueError("name at least one --site-dir (or a RUN_DIR)")
    f = _Findings()
    dirs = [_load_site_dir(d, f) for d in site_dirs]
    keys, source = _resolve_keys(site_keys, dirs, "site-dir", f)
    sites: dict[str, SiteAudit] = {}
    unverified: set[str] = set()
    for sd in dirs:
        if sd.site_id in sites:
            f.error(EXIT_CHAIN, f"site dir {sd.path}: site {sd.site_id} was given twice")
            continue
        site = sites[sd.site_id] = SiteAudit(sd.site_id, keys=source if sd.site_id in keys else "none")
        checker = _SiteChecker(site, f, independent)
        for rec in _sent_by_seq(sd).values():
            checker.add(_Entry(rec, None, _check_signature(rec, keys, source, f, unverified)))
        site.budget_file = _audit_budget_file(sd, site, f)
        if not sd.lines and site.budget_file is None:
            f.error(EXIT_CHAIN, f"site dir {sd.path}: no ledger record and no budget: nothing to audit")
    _finish(sites, f)
    if source == "none":
        f.warn("signatures not verified: arithmetic only (no ledger-key.pub and no --site-keys)")
    measured = _empirical(dirs, None, f) if empirical else None
    return AuditReport(
        run_dir=None, ledger=None, independent=independent, chain=None, sites=sites, central=None,
        errors=f.errors, warnings=f.warnings, code=f.code, keys=source, unverified_sites=sorted(unverified),
        empirical=measured,
    )


def _empirical(dirs: list[_SiteDir], run_ids: set[str] | None, f: _Findings) -> dict[str, list[CanaryAudit]]:
    """The empirical audit of every site dir's canaries (of ``run_ids`` when given)."""
    from privacy.empirical_audit import audit_site_canaries, verdict

    out: dict[str, list[CanaryAudit]] = {}
    for sd in dirs:
        try:
            audits = audit_site_canaries(sd.site_id, sd.path, run_ids)
        except (ValueError, OSError) as err:
            f.error(EXIT_EMPIRICAL, f"site dir {sd.path}: empirical audit impossible: {err}")
            continue
        if audits:
            out[sd.site_id] = audits
        for a in audits:
            if a.violated:
                f.error(EXIT_EMPIRICAL, verdict(a))
    if not out:
        f.error(EXIT_EMPIRICAL, "--empirical: no site dir holds canary scores of the audited runs "
                                "(run with audit-canaries = N)")
    return out


def _resolve_keys(site_keys, dirs: list[_SiteDir], dir_source: str, f: _Findings) -> tuple[dict[str, str], str]:
    """{site_id: key text} and where they came from ("pinned", "site-dir", "run-dir", "none")."""
    if site_keys is not None:
        for sid, text in site_keys.items():
            try:
                public_key_from_text(text)
            except ValueError as exc:
                raise ValueError(f"the pinned key of site {sid}: {exc}") from None
        for sd in dirs:
            pinned = site_keys.get(sd.site_id)
            if pinned is not None and sd.public_key is not None and sd.public_key != pinned:
                f.error(EXIT_CHAIN, f"site dir {sd.path}: its {PUBLIC_KEY_NAME} is not the key pinned for "
                                    f"site {sd.site_id}")
        return dict(site_keys), "pinned"
    keys = {}
    for sd in dirs:
        try:
            if sd.public_key is None:
                raise ValueError(f"no {PUBLIC_KEY_NAME}")
            public_key_from_text(sd.public_key)
            keys[sd.site_id] = sd.public_key
        except ValueError as exc:
            f.error(EXIT_CHAIN, f"site dir {sd.path}: {exc}: its signatures cannot be checked")
    return keys, (dir_source if keys else "none")


def _check_signature(rec: dict, keys: dict[str, str], source: str, f: _Findings, unverified: set) -> str:
    sid = str(rec.get("site_id"))
    where = f"seq {rec['seq']}" if "seq" in rec else f"site seq {_site_seq(rec)}"
    if source == "none":
        return "unverified"
    if sid not in keys:
        unverified.add(sid)
        if source in ("pinned", "run-dir"):
            f.error(EXIT_CHAIN, f"{where}: a record of site {sid}, which has no key: cannot be verified")
        else:
            f.warn(f"{where}: site {sid} has no key (no --site-dir for it): its records are not verified")
        return "unverified"
    if verify_site_record(rec, keys[sid]):
        return "valid"
    f.error(EXIT_CHAIN, f"{where}: the record of site {sid} (run {rec.get('run_id')} round "
                        f"{rec.get('round')}) is not signed by that site's key: forged or edited")
    return "invalid"


def _cross_check(sd: _SiteDir, entries: list[_Entry], run_ids: set[str], key: str | None, f: _Findings) -> None:
    """Run-ledger records of ``sd``'s site against the site's own ledger, both ways; the site's
    records missing from the run ledger are added to ``entries`` (flagged) so they count."""
    sid = sd.site_id
    mine = _sent_by_seq(sd)
    if key is not None:
        for seq, rec in mine.items():
            if not verify_site_record(rec, key):
                f.error(EXIT_CHAIN, f"site dir {sd.path}: ledger line {seq} is not signed by site {sid}'s key")
    seen = set()
    for entry in entries:
        seq = _site_seq(entry.rec)
        seen.add(seq)
        if seq not in mine:
            f.error(EXIT_CHAIN, f"run ledger seq {entry.seq}: site {sid}'s record (site seq {seq}) is not in "
                                f"the site's own ledger {sd.path / LEDGER_NAME}")
        elif not _same(entry.rec, mine[seq]):
            f.error(EXIT_CHAIN, f"run ledger seq {entry.seq}: site {sid}'s record differs from line {seq} of "
                                "the site's own ledger")
    unfinished = _unfinished_rounds(sd.path)
    for seq, rec in sorted(mine.items()):
        if str(rec.get("run_id")) in run_ids and seq not in seen:
            what = (f"site {sid}'s ledger line {seq} (run {rec.get('run_id')} round {rec.get('round')}) is "
                    "missing from the run ledger")
            if _round_key(rec) in unfinished:  # written ahead, then the site died before its reply
                f.warn(f"{what}: the site never finished that round (its budget has the charge "
                       "unconfirmed); accounted here all the same")
            else:
                f.error(EXIT_CHAIN, f"{what}: deleted, or the site's reply was dropped; accounted here all "
                                    "the same")
            signature = "unverified" if key is None else ("valid" if verify_site_record(rec, key) else "invalid")
            entries.append(_Entry(rec, None, signature, missing=True))


def _round_key(rec: dict) -> tuple:
    return (str(rec.get("run_id")), _int(rec.get("round")), rec.get("noise_multiplier"), rec.get("sample_rate"),
            rec.get("local_steps", rec.get("steps")))


def _unfinished_rounds(privacy_dir: Path) -> set[tuple]:
    """The site's charged rounds that it never confirmed (`SiteBudget.confirm` runs after the
    last step): rounds it died in, whose write-ahead record it never sent. Read from the
    site's own budget file; empty when there is none (`_audit_budget_file` reports that)."""
    from privacy.site_budget import SiteBudget

    try:
        charges = SiteBudget.open_existing(privacy_dir).charges()
    except (OSError, ValueError, KeyError, TypeError):
        return set()
    return {_round_key(c) for c in charges if c.get("steps_taken") is None}


def _in_site_order(sid: str, entries: list[_Entry], f: _Findings, has_dir: bool) -> list[_Entry]:
    """The entries in the order the site wrote them (its site_chain seq); a replayed or
    reordered record in the run ledger is an error, and a duplicate is counted once."""
    seqs = [_site_seq(e.rec) for e in entries]
    if any(s is None for s in seqs):
        return entries  # unchained records (no keys to check them with): the run ledger's order
    in_run = [e for e in entries if not e.missing]
    for before, after in zip(in_run, in_run[1:]):
        if _site_seq(after.rec) <= _site_seq(before.rec):
            f.error(EXIT_CHAIN, f"run ledger seq {after.seq}: site {sid}'s record (site seq "
                                f"{_site_seq(after.rec)}) comes after site seq {_site_seq(before.rec)}: "
                                "replayed or reordered")
    unique: dict[int, _Entry] = {}
    for e in entries:
        unique.setdefault(_site_seq(e.rec), e)
    ordered = [unique[s] for s in sorted(unique)]
    if not has_dir:
        gaps = [s for s in range(min(unique), max(unique)) if s not in unique]
        if gaps:
            f.warn(f"site {sid}: its records in this run skip its ledger lines {_ranges(gaps)} (another run, "
                   "or deleted): pass --site-dir for this site to check")
    return ordered


def _ranges(values: list[int]) -> str:
    return ", ".join(map(str, values[:8])) + (" ..." if len(values) > 8 else "")


def _audit_budget_file(sd: _SiteDir, site: SiteAudit, f: _Findings) -> BudgetFileAudit | None:
    """Cross-check the site's budget file with its ledger (see the module docstring)."""
    from privacy.site_budget import SiteBudget

    sid = site.site_id
    charged_lines = [line for line in sd.lines if line.get("kind") == "site" and not line.get("refused")
                     and _int(line.get("local_steps")) > 0]
    try:
        budget = SiteBudget.open_existing(sd.path)
        eps, eps_pld = budget.epsilon(), budget.epsilon_pld()
        worst, charges = budget.worst_history(), budget.charges()
        released = budget.released_count()
    except FileNotFoundError:
        if charged_lines:
            f.error(EXIT_CHAIN, f"site {sid}: no budget file in {sd.path}, but its ledger has "
                                f"{len(charged_lines)} charged rounds")
        else:
            f.warn(f"site {sid}: no budget file in {sd.path}")
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        f.error(EXIT_CHAIN, f"site {sid}: cannot read its budget file in {sd.path} ({exc})")
        return None

    if site.unit is not None and budget.unit != site.unit:
        f.error(EXIT_RECOMPUTE, f"site {sid}: its budget's privacy unit is {budget.unit!r}, its records say {site.unit!r}")
    if site.unit is None:
        site.unit = budget.unit
    if site.delta is not None and budget.delta != site.delta:
        f.error(EXIT_RECOMPUTE, f"site {sid}: its budget's delta is {budget.delta}, its records say {site.delta}")
    site.budget = budget.epsilon_budget  # the site's budget as it stands now
    floor = math.inf if released else epsilon_floor(worst, budget.delta)
    if eps < floor:
        f.error(EXIT_RECOMPUTE, f"site {sid}: its budget file's epsilon {_fmt(eps, 4)} is below the "
                                f"{_fmt(floor, 4)} its worst unit's history costs")

    try:
        unrecorded = _budget_vs_ledger(sid, eps, released, charges, charged_lines, sd.lines, f)
    except (KeyError, TypeError, ValueError) as exc:
        f.error(EXIT_CHAIN, f"site {sid}: a malformed line in its ledger or budget ({exc!r})")
        unrecorded = []
    if eps > budget.epsilon_budget:
        f.error(EXIT_OVER_BUDGET, f"site {sid}: its budget file's epsilon {_fmt(eps)} is over its budget "
                                  f"{_fmt(budget.epsilon_budget)}")
    return BudgetFileAudit(
        path=str(budget.path), unit=budget.unit, delta=budget.delta, epsilon_budget=budget.epsilon_budget,
        epsilon=eps, epsilon_pld=eps_pld, units=budget.unit_count(), released=released,
        charges=len(charges), unrecorded_charges=len(unrecorded),
    )


def _budget_vs_ledger(sid, eps, released, charges, charged_lines, lines, f: _Findings) -> list:
    """The budget's charges against the ledger's charged rounds, both ways, and the budget's
    epsilon against the ledger's last record; returns the charges no record matches."""

    def key(run_id, rnd, sigma, q, steps):
        return (str(run_id), int(rnd), float(sigma), float(q), int(steps))

    recorded = Counter(key(x["run_id"], x["round"], x["noise_multiplier"], x["sample_rate"], x["local_steps"])
                       for x in charged_lines)
    charged = Counter(key(c["run_id"], c["round"], c["noise_multiplier"], c["sample_rate"], c["steps"])
                      for c in charges)
    for run_id, rnd, sigma, q, steps in sorted((recorded - charged).elements()):
        f.error(EXIT_CHAIN, f"site {sid}: run {run_id} round {rnd} ({steps} steps at noise {sigma:g}) is in "
                            "its ledger but not charged in its budget file")
    unrecorded = sorted((charged - recorded).elements())
    for run_id, rnd, _, _, steps in unrecorded:
        f.warn(f"site {sid}: run {run_id} round {rnd} ({steps} steps) is charged in its budget but not "
               "in its ledger (a crash between the two?): counted, the safe direction")
    heads = [line for line in lines if line.get("kind") in SITE_KINDS]
    if heads:
        head_eps = _eps(heads[-1].get("epsilon_cumulative"), "epsilon_cumulative") or 0.0
        if eps < head_eps * (1 - REL_TOL) or (math.isinf(head_eps) and not math.isinf(eps)):
            f.error(EXIT_RECOMPUTE, f"site {sid}: its budget file's epsilon {_fmt(eps, 4)} is below its last "
                                    f"ledger record's {_fmt(head_eps, 4)}: the budget was rolled back or reset")
        elif eps > head_eps * (1 + REL_TOL) and not unrecorded:
            if released and math.isinf(eps):
                f.warn(f"site {sid}: {released} units were released without DP after its last ledger record")
            else:
                f.error(EXIT_RECOMPUTE, f"site {sid}: its last ledger record's epsilon {_fmt(head_eps, 4)} is "
                                        f"below its budget file's {_fmt(eps, 4)}, with no charge unrecorded")
    return unrecorded


def _finish(sites: dict[str, SiteAudit], f: _Findings) -> None:
    """Budget verdicts and per-site warnings."""
    for sid, s in sorted(sites.items()):
        if s.status == "over":
            f.error(EXIT_OVER_BUDGET, f"site {sid} is over budget: epsilon {_fmt(s.epsilon)} > budget "
                                      f"{_fmt(s.budget)}" + (f" (over in rounds {s.overspent_rounds})"
                                                             if s.overspent_rounds else ""))
        elif s.status == "near":
            f.warn(f"site {sid} is near its budget: epsilon {_fmt(s.epsilon)} >= {NEAR_BUDGET:.0%} of {_fmt(s.budget)}")
        elif s.status == "dp-off":
            f.warn(f"site {sid} trained without DP (epsilon = inf, no budget set)")
        if "seeded" in s.randomness:
            f.warn(f"site {sid} drew its noise from a seed (node config): whoever knows the seed can replay it")
        for r in s.rounds:
            if r.refused:
                f.warn(f"site {sid} refused run {r.run_id} round {r.round}: {r.note}")


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
    """A rich renderable: what was verified against; sites x rounds (cumulative epsilon),
    unit, epsilon, PLD, budget, left, status, keys; the central epsilon; the verdict; errors
    and warnings."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    rounds = sorted({r.round for s in report.sites.values() for r in s.rounds})
    title = report.run_dir or ", ".join(report.sites)
    table = Table(title=f"Privacy audit: {title}", show_lines=False)
    table.add_column("site", style="bold")
    table.add_column("unit")
    for rnd in rounds:
        table.add_column(f"r{rnd}", justify="right")
    for col in ("epsilon", "pld", "budget", "left", "status", "keys"):
        table.add_column(col, justify="right")
    style = {"ok": "green", "near": "yellow", "over": "bold red", "dp-off": "red", "no budget": "cyan"}
    for sid, s in sorted(report.sites.items()):
        by_round: dict[int, RoundAudit] = {}
        for r in s.rounds:
            by_round[r.round] = r  # the last record of a round wins (a re-run round)
        cells = []
        for rnd in rounds:
            r = by_round.get(rnd)
            if r is None:
                cells.append("")
                continue
            mark = "" if r.ok and r.signature != "invalid" else " ✗"
            mark += " (refused)" if r.refused else ""
            mark += " (missing)" if r.missing_from_run_ledger else ""
            cells.append(_fmt(r.epsilon_effective) + mark)
        table.add_row(sid, s.unit or "-", *cells, _fmt(s.epsilon), _fmt(s.epsilon_pld), _fmt(s.budget),
                      _fmt(s.budget_left), Text(s.status, style=style.get(s.status, "")), s.keys)
    code = exit_code(report)
    parts: list[Any] = [
        Text(f"verified against: {report.verified_against}",
             style="green" if report.keys in ("pinned", "site-dir") else "yellow"),
        table,
    ]
    if report.central is not None:
        c = report.central
        parts.append(Text(f"central: epsilon {_fmt(c.epsilon)} at delta {c.delta} (PLD, no sampling "
                          f"amplification, {len(c.rounds)} rounds; the coordinator's own records: arithmetic only)"))
    chain = "" if report.chain is None else f"run chain: {report.chain.records} records   "
    parts.append(Text(
        f"{chain}chain and signatures: {'ok' if report.chain_ok else 'FAILED'}   "
        f"epsilons: {'ok' if report.recomputed_ok else 'UNDER-STATED OR INCONSISTENT'}   exit code {code}",
        style="green" if code == 0 else "bold red",
    ))
    if report.empirical:
        parts.append(_empirical_table(report.empirical))
    for e in report.errors:
        parts.append(Text(f"ERROR: {e}", style="bold red"))
    for w in report.warnings:
        parts.append(Text(f"warning: {w}", style="yellow"))
    return Group(*parts)


def _empirical_table(empirical: dict[str, list[CanaryAudit]]):
    from rich.table import Table
    from rich.text import Text

    table = Table(title=f"Empirical audit: one-run lower bound on epsilon (95% confidence)")
    for col in ("site", "run", "canaries", "in", "rounds", "accounted (pld)", "accounted (rdp)",
                "lower bound", "provable at most", "verdict"):
        table.add_column(col, justify="left" if col in ("site", "run", "canaries") else "right")
    for sid, audits in sorted(empirical.items()):
        for a in audits:
            table.add_row(sid, a.run_id, f"{a.canaries} {a.kind}", str(a.included), str(a.rounds),
                          _fmt(a.epsilon_accounted), _fmt(a.epsilon_accounted_rdp), _fmt(a.empirical_epsilon_lower),
                          _fmt(a.empirical_epsilon_max),
                          Text("LEAKS" if a.violated else "ok", style="bold red" if a.violated else "green"))
    return table


def plot_epsilon(report: AuditReport, png_path: Path) -> Path:
    """PNG of cumulative epsilon per round per site (solid), budgets (dashed), central
    (black dotted). Infinite epsilons are drawn as an 'x' at the top, labelled DP off."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4.5))
    finite = [r.epsilon_effective for s in report.sites.values() for r in s.rounds]
    finite += [s.budget for s in report.sites.values() if s.budget]
    finite = [v for v in finite if v is not None and math.isfinite(v)] or [1.0]
    top = max(finite) * 1.1
    for i, (sid, s) in enumerate(sorted(report.sites.items())):
        color = f"C{i % 10}"
        xs = [r.round for r in s.rounds]
        ys = [r.epsilon_effective for r in s.rounds]
        ax.plot(xs, [y if math.isfinite(y) else float("nan") for y in ys], marker="o", color=color,
                label=f"site {sid} ({s.unit or '-'})")
        inf_x = [x for x, y in zip(xs, ys) if math.isinf(y)]
        if inf_x:
            ax.plot(inf_x, [top] * len(inf_x), "x", color=color, markersize=10, label=f"site {sid}: DP off (∞)")
        if s.budget is not None and math.isfinite(s.budget):
            ax.axhline(s.budget, color=color, linestyle="--", linewidth=1)
    if report.central is not None and report.central.rounds:
        c = report.central
        ys = [r.epsilon_effective for r in c.rounds]
        ax.plot([r.round for r in c.rounds], [y if math.isfinite(y) else float("nan") for y in ys],
                "k:", marker=".", label="central")
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
    run_dir: Path | None,
    as_json: bool = False,
    plot: Path | None = None,
    independent: str = "pld",
    site_keys: Path | None = None,
    site_dirs: list[Path] | None = None,
    empirical: bool = False,
) -> int:
    """The body of ``fedvid audit [RUN_DIR] [--site-keys FILE] [--site-dir DIR ...] [--json]
    [--plot PNG] [--empirical]``: prints the report, returns the exit code."""
    from rich.console import Console

    keys = load_site_keys(site_keys) if site_keys is not None else None
    if run_dir is not None:
        report = audit_run(Path(run_dir), site_keys=keys, site_dirs=site_dirs, independent=independent,
                           empirical=empirical)
    else:
        report = audit_sites(list(site_dirs or []), site_keys=keys, independent=independent, empirical=empirical)
    if as_json:
        print(report.to_json())
    else:
        Console(width=max(Console().width, 140)).print(render_table(report))
    if plot is not None:
        plot_epsilon(report, Path(plot))
    return exit_code(report)
