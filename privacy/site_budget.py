"""A site's persistent privacy budget, accounted per privacy unit (a video, a person or a clip).

One file per site, ``PRIVACY_DIR/budget.json``, whatever the run, the split or the dataset
version. It holds every round the site charged (its mechanism: noise multiplier, sample rate,
steps) and, for every unit, the rounds in which that unit could have been sampled. A unit's
epsilon is the composition of its own rounds; the site's epsilon is the maximum over its units.
So a new seed, another validation fraction, an added or re-encoded video never resets
anything: old units keep their history and a new unit starts at zero.

The budget is enforced with the RDP filter (`privacy.accounting.filter_epsilon`), because the
coordinator chooses every round's mechanism; the PLD figure is reported beside it.

Write-ahead: `charge` is fsynced and renamed into place BEFORE the first step of a round, and
never refunded, so a process killed mid-round keeps the round charged.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import math
from pathlib import Path
from typing import Iterable, Sequence

from privacy.accounting import (
    UNITS,
    History,
    check_step_args,
    decode_epsilon,
    encode_epsilon,
    filter_epsilon,
    merge_history,
    pld_epsilon,
)
from privacy.durable import atomic_write_json

STATE_VERSION = 2
BUDGET_FILE = "budget.json"


class BudgetExceeded(RuntimeError):
    """A charge was refused because it would take a unit past the site's epsilon budget."""


class SiteBudget:
    """The (epsilon, delta) budget of one site's privacy units, kept in ``privacy_dir``.

    ``unit`` and ``delta`` are fixed for the life of the budget: reopening with others raises
    ValueError, since epsilons of different units or deltas do not compose. The budget
    (``epsilon_budget``) may change between runs; every change is recorded.
    """

    def __init__(self, privacy_dir: Path, epsilon_budget: float, delta: float, unit: str = "video") -> None:
        if unit not in UNITS:
            raise ValueError(f"privacy-unit = {unit!r} must be one of {', '.join(UNITS)}")
        if not 0.0 < delta < 1.0:
            raise ValueError(f"delta = {delta} must be in (0, 1)")
        if math.isnan(epsilon_budget) or epsilon_budget <= 0:
            raise ValueError(f"epsilon-budget = {epsilon_budget} must be > 0")
        self._attach(privacy_dir, epsilon_budget, delta, unit)
        self.privacy_dir.mkdir(parents=True, exist_ok=True)
        with self._locked():
            state = self._read()
            if state is None:
                state = {"version": STATE_VERSION, "unit": unit, "delta": self.delta, "accountant": "rdp",
                         "epsilon_budget": encode_epsilon(self.epsilon_budget), "created_at": _now(),
                         "budget_changes": [], "charges": [], "units": {}, "released": {}}
                atomic_write_json(self.path, state)
            self._check_compatible(state)
            if decode_epsilon(state["epsilon_budget"]) != self.epsilon_budget:
                state["budget_changes"].append({"at": _now(), "from": state["epsilon_budget"],
                                                "to": encode_epsilon(self.epsilon_budget)})
                state["epsilon_budget"] = encode_epsilon(self.epsilon_budget)
                atomic_write_json(self.path, state)

    @classmethod
    def open_existing(cls, privacy_dir: Path) -> "SiteBudget":
        """The budget already kept in ``privacy_dir``, opened read-only (nothing is written
        until a charge); FileNotFoundError when there is none."""
        path = Path(privacy_dir) / BUDGET_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no site budget here")
        state = json.loads(path.read_text())
        budget = cls.__new__(cls)
        budget._attach(privacy_dir, decode_epsilon(state["epsilon_budget"]), state["delta"], state["unit"])
        budget._check_compatible(state)
        return budget

    def _attach(self, privacy_dir: Path, epsilon_budget: float, delta: float, unit: str) -> None:
        self.privacy_dir = Path(privacy_dir)
        self.path = self.privacy_dir / BUDGET_FILE
        self._lock_path = self.privacy_dir / f".{BUDGET_FILE}.lock"
        self.epsilon_budget, self.delta, self.unit = float(epsilon_budget), float(delta), unit

    # -- reading ---------------------------------------------------------------------------

    def charges(self) -> list[dict]:
        """Every charged round: run_id, round, noise_multiplier, sample_rate, steps,
        max_grad_norm, units, charged_at, steps_taken (None until confirmed)."""
        return list(self._read_checked()["charges"])

    def unit_count(self) -> int:
        """Units the site ever charged a round to."""
        return len(self._read_checked()["units"])

    def released_count(self) -> int:
        """Units whose exact evaluation left the site without DP (node-config opt-in)."""
        return len(self._read_checked()["released"])

    def unit_history(self, unit_id: str) -> History:
        """The merged [(sigma, q, steps)] of the rounds `unit_id` could have been sampled in."""
        state = self._read_checked()
        return _history(state["charges"], state["units"].get(unit_id, ()))

    def worst_history(self) -> History:
        """The history of the unit with the largest epsilon (empty when nothing was charged)."""
        return _worst(self._read_checked(), None, None, self.delta)[1]

    def epsilon(self) -> float:
        """The site's epsilon: the maximum over its units (inf once a unit was released without DP)."""
        state = self._read_checked()
        return math.inf if state["released"] else _worst(state, None, None, self.delta)[0]

    def epsilon_pld(self) -> float:
        """PLD epsilon of the worst unit's history (reported beside the enforced figure)."""
        state = self._read_checked()
        return math.inf if state["released"] else pld_epsilon(self.worst_history(), self.delta)

    def project(self, units: Iterable[str], noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """The site's epsilon if a round of ``steps`` steps at (sigma, q) were charged to ``units``."""
        check_step_args(noise_multiplier, sample_rate, steps)
        entry = (float(noise_multiplier), float(sample_rate), int(steps))
        return _worst(self._read_checked(), set(units), entry, self.delta)[0]

    # -- writing ---------------------------------------------------------------------------

    def charge(
        self, units: Sequence[str], noise_multiplier: float, sample_rate: float, steps: int, *,
        run_id: str, round: int, max_grad_norm: float,
    ) -> dict:
        """WRITE-AHEAD charge of a coming round to every unit that may be sampled in it.

        Raises `BudgetExceeded`, leaving the file untouched, when a unit would go past the
        budget (or a unit was already released without DP). Returns the charge entry with
        ``epsilon_after`` (the site's epsilon once charged) and ``history`` (the worst unit's).
        """
        check_step_args(noise_multiplier, sample_rate, steps)
        if not units:
            raise ValueError("a round must be charged to at least one unit")
        units = sorted(set(units))
        entry = (float(noise_multiplier), float(sample_rate), int(steps))
        with self._locked():
            state = self._read_checked()
            before, _ = _worst(state, None, None, self.delta)
            after, history = _worst(state, set(units), entry, self.delta)
            if state["released"]:
                after = math.inf
            if after > self.epsilon_budget:
                raise BudgetExceeded(
                    f"charging {steps} steps at noise-multiplier={noise_multiplier:.4g}, "
                    f"sample-rate={sample_rate:.4g} to {len(units)} {self.unit} units would take the site's "
                    f"epsilon from {before:.4f} to {after:.4f}, over its budget {self.epsilon_budget:g} "
                    f"(delta={self.delta:g}, RDP filter)"
                )
            charge = {"run_id": str(run_id), "round": int(round), "noise_multiplier": entry[0],
                      "sample_rate": entry[1], "steps": entry[2], "max_grad_norm": float(max_grad_norm),
                      "units": len(units), "charged_at": _now(), "steps_taken": None,
                      "epsilon_after": encode_epsilon(after)}
            index = len(state["charges"])
            state["charges"].append(charge)
            for unit_id in units:
                state["units"].setdefault(unit_id, []).append(index)
            atomic_write_json(self.path, state)
        return dict(charge, history=[list(e) for e in history])

    def confirm(self, run_id: str, round: int, steps_taken: int) -> None:
        """Record the steps a charged round took (never refunds); more than charged is an error."""
        with self._locked():
            state = self._read_checked()
            for charge in reversed(state["charges"]):
                if charge["run_id"] == str(run_id) and charge["round"] == int(round):
                    if steps_taken > charge["steps"]:
                        raise RuntimeError(f"round {round} took {steps_taken} steps but only {charge['steps']} "
                                           "were charged: privacy accounting violated")
                    charge["steps_taken"] = int(steps_taken)
                    atomic_write_json(self.path, state)
                    return
        raise KeyError(f"no charged round {round!r} of run {run_id!r}")

    def release_without_dp(self, units: Sequence[str], *, run_id: str, round: int, what: str) -> None:
        """Record that exact results on ``units`` left the site: they have no DP guarantee now."""
        with self._locked():
            state = self._read_checked()
            for unit_id in units:
                state["released"].setdefault(unit_id, []).append({"run_id": str(run_id), "round": int(round),
                                                                  "what": what, "at": _now()})
            atomic_write_json(self.path, state)

    # -- internals -------------------------------------------------------------------------

    def _check_compatible(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"{self.path}: unsupported budget version {state.get('version')}")
        for key, mine in (("unit", self.unit), ("delta", self.delta)):
            if state[key] != mine:
                raise ValueError(f"{self.path}: the site's {key} is {state[key]!r} but {mine!r} was given; "
                                 f"it is fixed for the life of a site budget")

    def _read(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None

    def _read_checked(self) -> dict:
        # Readers need no lock: the file is only ever replaced atomically.
        state = self._read()
        if state is None:
            raise FileNotFoundError(f"site budget vanished: {self.path}")
        self._check_compatible(state)
        return state

    @contextlib.contextmanager
    def _locked(self):
        with open(self._lock_path, "a+b") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            yield


def _history(charges: list[dict], indices: Iterable[int]) -> History:
    return merge_history((charges[i]["noise_multiplier"], charges[i]["sample_rate"], charges[i]["steps"])
                         for i in indices)


def _worst(state: dict, charged: set[str] | None, entry: tuple | None, delta: float) -> tuple[float, History]:
    """(epsilon, history) of the worst unit, with ``entry`` added to the units in ``charged``.

    Units that took part in the same rounds share a history, so each distinct one is
    composed once. A unit never charged before, now charged, starts from an empty history."""
    histories: set[History] = set()
    for unit_id, indices in state["units"].items():
        history = _history(state["charges"], indices)
        if charged is not None and unit_id in charged:
            history = merge_history(list(history) + [entry])
        histories.add(history)
    if charged is not None and entry is not None and charged - state["units"].keys():
        histories.add(merge_history([entry]))
    if not histories:
        return 0.0, ()
    return max((filter_epsilon(h, delta), h) for h in histories)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
