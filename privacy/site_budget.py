"""A site's persistent differential-privacy budget (sample-level DP-SGD).

One `SiteBudget` per site dataset. Its state file, ``state_dir/<fingerprint>.json``, is keyed
by the dataset fingerprint ALONE: changing the noise multiplier, the clipping norm, the model
or the run does not reset the budget; the history simply gains entries taken under the new
settings and they all compose.

Single source of truth
----------------------
The persisted history of ``(noise_multiplier, sample_rate, steps)`` in this file is the only
privacy record of the site. It is written AHEAD of training: the ClientApp calls
``charge(sigma, q, steps, ...)`` before its first DP step of the round, the charge is fsynced
and atomically renamed into place, and only then does training start. Consequences:

* a process killed mid-round never loses a step it took: the round was charged in full before
  the first step. It may over-count a round that crashed part-way (the whole round stays
  charged); that is the safe direction, and epsilon on record never goes back;
* the Opacus `PrivacyEngine` used for training must NOT be the thing that is persisted: its
  accountant also records each step it takes, so persisting it (or stepping the accountant
  returned by :meth:`SiteBudget.accountant` and saving that) would count every step twice.
  `privacy.dp_training.make_private` therefore builds a FRESH engine each round whose
  accountant only sees that round's steps and is thrown away; its step hook doubles as a
  guard that refuses any step beyond the charged count, so no step can happen uncharged;
* :meth:`SiteBudget.accountant` returns a snapshot (an Opacus accountant restored from the
  charged history) for reporting or for tools that want an accountant object; stepping it
  changes only that in-memory copy.

Epsilon is computed by Opacus's accountants (PRV by default, RDP optionally), never by hand.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import functools
import hashlib
import json
import math
import re
import warnings
from pathlib import Path
from typing import Iterable, Sequence

from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.accountant import IAccountant

from privacy.durable import atomic_write_json
from privacy.ledger import encode_epsilon

STATE_VERSION = 1
ACCOUNTANTS = ("prv", "rdp")
_FINGERPRINT_RE = re.compile(r"^[A-Za-z0-9_.-]{8,128}$")

History = tuple[tuple[float, float, int], ...]


class BudgetExceeded(RuntimeError):
    """A charge was refused because it would take the site past its epsilon budget."""


# --------------------------------------------------------------------------------------------
# Helpers shared with the ledger and the audit
# --------------------------------------------------------------------------------------------


def dataset_fingerprint(items: Iterable[tuple[str, str]]) -> str:
    """SHA-256 hex digest over sorted ``(relative path, content hash)`` pairs.

    Order-independent; a renamed, added, removed or changed video changes the fingerprint
    (and therefore starts a new budget: it is a different dataset).
    """
    h = hashlib.sha256(b"fedvid-dataset-v1\n")
    for rel, content in sorted((str(r), str(c)) for r, c in items):
        if "\0" in rel or "\n" in rel or "\0" in content or "\n" in content:
            raise ValueError(f"dataset item contains a NUL or newline: {rel!r}")
        h.update(rel.encode() + b"\0" + content.encode() + b"\n")
    return h.hexdigest()


def merge_history(
    history: Iterable[Sequence[float]],
) -> list[tuple[float, float, int]]:
    """Merge consecutive entries with the same (sigma, q), as Opacus's accountants do."""
    out: list[tuple[float, float, int]] = []
    for sigma, q, steps in history:
        sigma, q, steps = float(sigma), float(q), int(steps)
        if steps <= 0:
            continue
        if out and out[-1][0] == sigma and out[-1][1] == q:
            out[-1] = (sigma, q, out[-1][2] + steps)
        else:
            out.append((sigma, q, steps))
    return out


def make_accountant(mechanism: str, history: Iterable[Sequence[float]] = ()) -> IAccountant:
    """An Opacus accountant of ``mechanism`` ("prv" or "rdp") holding ``history``."""
    if mechanism not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {mechanism!r}")
    acc = PRVAccountant() if mechanism == "prv" else RDPAccountant()
    hist = merge_history(history)
    if hist:
        acc.load_state_dict({"history": hist, "mechanism": mechanism})
    return acc


def composed_epsilon(
    history: Iterable[Sequence[float]], delta: float, accountant: str = "prv"
) -> float:
    """Epsilon of the composition of ``[(sigma, q, steps), ...]`` at ``delta`` (Opacus).

    Returns 0.0 for an empty history and ``inf`` when any entry has sigma == 0 (no noise).
    For PRV the absolute error bound is tightened for small epsilons so the upper bound stays
    within ~0.3% of the true value (Opacus's default is an absolute 0.01).
    """
    return _composed_epsilon(tuple(merge_history(history)), float(delta), accountant)


@functools.lru_cache(maxsize=512)
def _composed_epsilon(history: History, delta: float, accountant: str) -> float:
    if not history:
        return 0.0
    if any(sigma <= 0 for sigma, _, _ in history):
        return math.inf
    acc = make_accountant(accountant, history)
    with warnings.catch_warnings():
        # PRV with q == 1 logs divide-by-zero warnings; RDP warns about its alpha range.
        warnings.simplefilter("ignore")
        if accountant == "rdp":
            return float(acc.get_epsilon(delta))
        eps = float(acc.get_epsilon(delta, eps_error=0.01))
        if eps < 3.0:  # 0.01 absolute would be >0.3% relative
            eps = float(acc.get_epsilon(delta, eps_error=max(0.003 * eps, 1e-4)))
        return eps


# --------------------------------------------------------------------------------------------
# SiteBudget
# --------------------------------------------------------------------------------------------


class SiteBudget:
    """A site's persistent (epsilon, delta) budget for sample-level DP-SGD.

    Args:
        state_dir: directory holding ``<dataset_fingerprint>.json`` (created if missing).
        dataset_fingerprint: see :func:`dataset_fingerprint`; the ONLY key of the state.
        epsilon_budget: the site's total epsilon; ``math.inf`` means "no budget" (still
            accounted). May be changed between runs (the new value is stored).
        delta: the site's delta. Fixed for the life of the state: reopening with a different
            delta raises ``ValueError`` (epsilons at different deltas do not compare).
        accountant: "prv" (default, tight) or "rdp" (looser, safe). Fixed for the life of the
            state, like delta, so the figures on record stay comparable.

    Every method re-reads the state file, so several `SiteBudget` objects (or processes,
    serialised by a lock file) on the same directory always agree.
    """

    def __init__(
        self,
        state_dir: Path,
        dataset_fingerprint: str,
        epsilon_budget: float,
        delta: float,
        accountant: str = "prv",
    ) -> None:
        if not _FINGERPRINT_RE.match(dataset_fingerprint):
            raise ValueError(
                f"dataset_fingerprint must be 8-128 chars of [A-Za-z0-9_.-], "
                f"got {dataset_fingerprint!r}"
            )
        if accountant not in ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
        if not (0.0 < delta < 1.0):
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        if math.isnan(epsilon_budget) or epsilon_budget <= 0:
            raise ValueError(f"epsilon_budget must be > 0, got {epsilon_budget}")
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.fingerprint = dataset_fingerprint
        self.epsilon_budget = float(epsilon_budget)
        self.delta = float(delta)
        self.mechanism = accountant
        self.path = self.state_dir / f"{dataset_fingerprint}.json"
        self._lock_path = self.state_dir / f".{dataset_fingerprint}.lock"
        with self._locked():
            state = self._read()
            if state is None:
                atomic_write_json(self.path, self._new_state())
            else:
                self._check_compatible(state)
                if state["epsilon_budget"] != encode_epsilon(self.epsilon_budget):
                    state["budget_changes"].append(
                        {"at": _now(), "from": state["epsilon_budget"],
                         "to": encode_epsilon(self.epsilon_budget)}
                    )
                    state["epsilon_budget"] = encode_epsilon(self.epsilon_budget)
                    atomic_write_json(self.path, state)

    # -- reading ---------------------------------------------------------------------------

    def history(self) -> list[tuple[float, float, int]]:
        """The charged ``[(noise_multiplier, sample_rate, steps)]`` history (merged)."""
        return [tuple(e) for e in self._load()["history"]]  # type: ignore[misc]

    def rounds(self) -> list[dict]:
        """Per-round audit entries: round, run_id, steps, noise_multiplier, sample_rate,
        max_grad_norm, epsilon_after, charged_at, steps_taken (None until confirmed)."""
        return list(self._load()["rounds"])

    def total_steps(self) -> int:
        """Total DP-SGD steps charged so far."""
        return sum(s for _, _, s in self.history())

    def spent(self) -> float:
        """Epsilon spent so far at the site's delta (0.0 with no history)."""
        return composed_epsilon(self.history(), self.delta, self.mechanism)

    def remaining(self) -> float:
        """Budget left (``epsilon_budget - spent()``, may be negative only if over-charged
        by an earlier, larger budget)."""
        return self.epsilon_budget - self.spent()

    def project(self, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """Epsilon the site would have after adding ``steps`` at (sigma, q)."""
        _check_step_args(noise_multiplier, sample_rate, steps)
        hist = self.history() + [(float(noise_multiplier), float(sample_rate), int(steps))]
        return composed_epsilon(hist, self.delta, self.mechanism)

    def fits(self, noise_multiplier: float, sample_rate: float, steps: int) -> bool:
        """Whether charging these steps keeps the site within its budget."""
        return self.project(noise_multiplier, sample_rate, steps) <= self.epsilon_budget

    def accountant(self) -> IAccountant:
        """An Opacus accountant restored from the charged history (a snapshot).

        Use it to read or report epsilon (``acc.get_epsilon(budget.delta)``). Do NOT persist
        it after stepping it (e.g. after handing it to a PrivacyEngine and training): the
        steps of a round are already in the history (charged write-ahead), so they would be
        counted twice. Train with `privacy.dp_training.make_private`, which uses a fresh,
        throw-away accountant per round.
        """
        return make_accountant(self.mechanism, self.history())

    # -- writing ---------------------------------------------------------------------------

    def charge(
        self,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
        *,
        round_id: int | str | None = None,
        run_id: str | None = None,
        max_grad_norm: float | None = None,
    ) -> dict:
        """WRITE-AHEAD charge of a coming round: record and fsync BEFORE training starts.

        Raises `BudgetExceeded` (and leaves the state file untouched) if the charge would
        take the site past its budget. On success returns the round's audit entry
        (``epsilon_after`` etc.). If the process dies during the round, the full round stays
        charged: epsilon on record may over-count a crashed round, never under-count.
        """
        _check_step_args(noise_multiplier, sample_rate, steps)
        with self._locked():
            state = self._load_unlocked()
            hist = [tuple(e) for e in state["history"]]
            before = composed_epsilon(hist, self.delta, self.mechanism)
            new_hist = merge_history(
                hist + [(float(noise_multiplier), float(sample_rate), int(steps))]
            )
            after = composed_epsilon(new_hist, self.delta, self.mechanism)
            if after > self.epsilon_budget:
                raise BudgetExceeded(
                    f"site {self.fingerprint[:12]}: charging {steps} steps at "
                    f"noise-multiplier={noise_multiplier}, sample-rate={sample_rate} would "
                    f"take epsilon from {before:.4f} (spent) to {after:.4f} (projected), over "
                    f"the site budget {self.epsilon_budget:g} (delta={self.delta:g}, "
                    f"{self.mechanism})"
                )
            entry = {
                "round": round_id,
                "run_id": run_id,
                "steps": int(steps),
                "noise_multiplier": float(noise_multiplier),
                "sample_rate": float(sample_rate),
                "max_grad_norm": None if max_grad_norm is None else float(max_grad_norm),
                "epsilon_before": encode_epsilon(before),
                "epsilon_after": encode_epsilon(after),
                "charged_at": _now(),
                "steps_taken": None,
            }
            state["history"] = [list(e) for e in new_hist]
            state["rounds"].append(entry)
            atomic_write_json(self.path, state)
        return dict(entry)

    def confirm(self, round_id: int | str | None, run_id: str | None, steps_taken: int) -> None:
        """Record the steps a charged round actually took (audit only; never refunds).

        Raises ``RuntimeError`` if more steps were taken than charged: those steps would be
        unaccounted (`make_private(max_steps=...)` prevents this).
        """
        with self._locked():
            state = self._load_unlocked()
            for entry in reversed(state["rounds"]):
                if entry["round"] == round_id and entry["run_id"] == run_id:
                    if steps_taken > entry["steps"]:
                        raise RuntimeError(
                            f"round {round_id} took {steps_taken} steps but only "
                            f"{entry['steps']} were charged: privacy accounting violated"
                        )
                    entry["steps_taken"] = int(steps_taken)
                    atomic_write_json(self.path, state)
                    return
        raise KeyError(f"no charged round {round_id!r} of run {run_id!r}")

    # -- internals -------------------------------------------------------------------------

    def _new_state(self) -> dict:
        return {
            "version": STATE_VERSION,
            "dataset_fingerprint": self.fingerprint,
            "delta": self.delta,
            "accountant": self.mechanism,
            "epsilon_budget": encode_epsilon(self.epsilon_budget),
            "created_at": _now(),
            "history": [],
            "rounds": [],
            "budget_changes": [],
        }

    def _check_compatible(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"{self.path}: unsupported state version {state.get('version')}")
        if state["dataset_fingerprint"] != self.fingerprint:
            raise ValueError(f"{self.path}: fingerprint mismatch")
        if state["delta"] != self.delta:
            raise ValueError(
                f"{self.path}: the site's delta is {state['delta']} but {self.delta} was "
                f"given; delta is fixed for the life of a site budget"
            )
        if state["accountant"] != self.mechanism:
            raise ValueError(
                f"{self.path}: the site's accountant is {state['accountant']!r} but "
                f"{self.mechanism!r} was given; it is fixed for the life of a site budget"
            )

    def _read(self) -> dict | None:
        try:
            with open(self.path, "rb") as f:
                return json.load(f)
        except FileNotFoundError:
            return None

    def _load_unlocked(self) -> dict:
        state = self._read()
        if state is None:
            raise FileNotFoundError(f"site budget state vanished: {self.path}")
        self._check_compatible(state)
        return state

    def _load(self) -> dict:
        # Readers need no lock: the file is only ever replaced atomically.
        return self._load_unlocked()

    @contextlib.contextmanager
    def _locked(self):
        with open(self._lock_path, "a+b") as lf:
            fcntl.flock(lf.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lf.fileno(), fcntl.LOCK_UN)


def _check_step_args(noise_multiplier: float, sample_rate: float, steps: int) -> None:
    if not (noise_multiplier >= 0 and math.isfinite(noise_multiplier)):
        raise ValueError(f"noise-multiplier must be finite and >= 0, got {noise_multiplier}")
    if not (0.0 < sample_rate <= 1.0):
        raise ValueError(f"sample rate must be in (0, 1], got {sample_rate}")
    if int(steps) != steps or steps <= 0:
        raise ValueError(f"steps must be a positive integer, got {steps}")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
