"""The append-only, hash-chained privacy ledger of a run (``RUN_DIR/ledger.jsonl``).

One JSON object per line. Each record carries ``seq`` (1-based line number), ``prev_hash``
(the previous record's ``hash``; the first record uses `GENESIS_HASH`) and ``hash`` =
SHA-256 over the canonical JSON (sorted keys, no spaces, UTF-8) of the record WITHOUT its
``hash`` field but WITH ``prev_hash`` and ``seq``. Editing, deleting or reordering a line
breaks the chain at that line; `verify_chain` finds the first bad line.

Deleting the LAST line(s) leaves a valid shorter chain; to catch that, keep the head
(`PrivacyLedger.head`) somewhere else (the server checkpoint) and pass it as
``verify_chain(path, expected_head=...)``.

Epsilon in JSON: JSON has no infinity. An infinite epsilon (DP off, or noise 0) is written as
the STRING ``"inf"``; `encode_epsilon` / `decode_epsilon` convert, and every reader in
fedvid goes through `decode_epsilon`. ``None`` means "not applicable" (e.g. no budget).

Record kinds (build them with the helpers below, which own the field names):
  * ``"site"``    — one site's DP-SGD round (`site_record`);
  * ``"central"`` — the server's central Gaussian mechanism after a round (`central_record`);
  * ``"dp-off"``  — a round trained WITHOUT DP (`dp_off_record`): epsilon is ``"inf"``.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

GENESIS_HASH = "0" * 64
LEDGER_NAME = "ledger.jsonl"
KINDS = ("site", "central", "dp-off")
SAMPLING = ("poisson", "none")


class LedgerError(RuntimeError):
    """The ledger file cannot be appended to (e.g. its last line is truncated)."""


# --------------------------------------------------------------------------------------------
# Epsilon encoding
# --------------------------------------------------------------------------------------------


def encode_epsilon(x: float | None) -> float | str | None:
    """float -> JSON value: ``inf`` becomes the string "inf"; None stays None."""
    if x is None:
        return None
    x = float(x)
    if math.isnan(x):
        raise ValueError("epsilon is NaN")
    if x == math.inf:
        return "inf"
    return x


def decode_epsilon(v: Any) -> float | None:
    """JSON value -> float: "inf" (or "Infinity") becomes ``math.inf``; None stays None."""
    if v is None:
        return None
    if isinstance(v, str):
        if v.lower() in ("inf", "infinity", "+inf"):
            return math.inf
        raise ValueError(f"bad epsilon value {v!r}")
    return float(v)


def canonical_json(obj: Any) -> bytes:
    """The byte string that is hashed: sorted keys, compact, UTF-8, no NaN/inf."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def record_hash(record: dict) -> str:
    """SHA-256 hex over the canonical JSON of ``record`` minus its ``hash`` field."""
    body = {k: v for k, v in record.items() if k != "hash"}
    return hashlib.sha256(canonical_json(body)).hexdigest()


# --------------------------------------------------------------------------------------------
# Record constructors: the one place the field names live
# --------------------------------------------------------------------------------------------


def site_record(
    *,
    site_id: str,
    run_id: str,
    round: int,
    local_steps: int,
    sample_rate: float,
    noise_multiplier: float,
    max_grad_norm: float,
    delta: float,
    epsilon_round: float,
    epsilon_cumulative: float,
    epsilon_budget: float | None,
    accountant: str,
    history: Sequence[Sequence[float]],
    dataset_fingerprint: str | None = None,
    refused: bool = False,
    refused_reason: str | None = None,
) -> dict:
    """A site's round.

    ``epsilon_round`` is the epsilon of this round's steps ALONE; ``epsilon_cumulative`` is
    the site's total after the round (its whole budget history, all runs). ``history`` is the
    site budget's full ``[(sigma, q, steps)]`` after the round (what the audit recomposes).
    A refused round has ``refused=True``, ``local_steps=0`` and the unchanged history.
    """
    return {
        "kind": "site",
        "site_id": str(site_id),
        "run_id": str(run_id),
        "round": int(round),
        "local_steps": int(local_steps),
        "sample_rate": float(sample_rate),
        "noise_multiplier": float(noise_multiplier),
        "max_grad_norm": float(max_grad_norm),
        "delta": float(delta),
        "epsilon_round": encode_epsilon(epsilon_round),
        "epsilon_cumulative": encode_epsilon(epsilon_cumulative),
        "epsilon_budget": encode_epsilon(epsilon_budget),
        "accountant": str(accountant),
        "history": [[float(s), float(q), int(n)] for s, q, n in history],
        "dataset_fingerprint": dataset_fingerprint,
        "refused": bool(refused),
        "refused_reason": refused_reason,
    }


def site_record_from_charge(
    budget: Any,
    charge: dict,
    *,
    site_id: str,
    run_id: str,
    round: int,
    max_grad_norm: float,
) -> dict:
    """`site_record` for a successful `SiteBudget.charge` (``charge`` is its return value)."""
    from privacy.site_budget import composed_epsilon  # local: ledger has no deps otherwise

    sigma, q, steps = charge["noise_multiplier"], charge["sample_rate"], charge["steps"]
    return site_record(
        site_id=site_id,
        run_id=run_id,
        round=round,
        local_steps=steps,
        sample_rate=q,
        noise_multiplier=sigma,
        max_grad_norm=max_grad_norm,
        delta=budget.delta,
        epsilon_round=composed_epsilon([(sigma, q, steps)], budget.delta, budget.mechanism),
        epsilon_cumulative=decode_epsilon(charge["epsilon_after"]),
        epsilon_budget=budget.epsilon_budget,
        accountant=budget.mechanism,
        history=budget.history(),
        dataset_fingerprint=budget.fingerprint,
    )


def site_refusal_record(
    budget: Any,
    reason: str,
    *,
    site_id: str,
    run_id: str,
    round: int,
    noise_multiplier: float,
    sample_rate: float,
    requested_steps: int,
    max_grad_norm: float,
) -> dict:
    """`site_record` for a round the site budget refused (``reason`` = the BudgetExceeded
    message). Nothing was trained: ``local_steps`` is 0 and the history is unchanged."""
    rec = site_record(
        site_id=site_id,
        run_id=run_id,
        round=round,
        local_steps=0,
        sample_rate=sample_rate,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        delta=budget.delta,
        epsilon_round=0.0,
        epsilon_cumulative=budget.spent(),
        epsilon_budget=budget.epsilon_budget,
        accountant=budget.mechanism,
        history=budget.history(),
        dataset_fingerprint=budget.fingerprint,
        refused=True,
        refused_reason=reason,
    )
    rec["requested_steps"] = int(requested_steps)
    return rec


def central_history(records: Sequence[dict], run_id: str) -> list[tuple[float, float, int]]:
    """The central mechanism's ``[(sigma, q, 1)]`` per round of ``run_id``, rebuilt from the
    ledger records (for a ServerApp resuming a run, and for the audit)."""
    return [
        (float(r["server_noise_multiplier"]), central_sample_rate(r), 1)
        for r in records
        if r.get("kind") == "central" and r.get("run_id") == str(run_id)
    ]


def central_record(
    *,
    run_id: str,
    round: int,
    sampled_clients: int,
    total_clients: int,
    server_noise_multiplier: float,
    update_clip_norm: float,
    delta: float,
    epsilon_cumulative: float,
    accountant: str,
    sampling: str = "poisson",
) -> dict:
    """The server's central (client-level) Gaussian mechanism after ``round``.

    ``sampling="poisson"``: clients were Poisson-sampled with rate sampled/total, which the
    accountant amplifies over. ``"none"``: no amplification claimed (q = 1), the safe choice
    when clients are sampled as a fixed-size subset.
    """
    if sampling not in SAMPLING:
        raise ValueError(f"sampling must be one of {SAMPLING}, got {sampling!r}")
    return {
        "kind": "central",
        "run_id": str(run_id),
        "round": int(round),
        "sampled_clients": int(sampled_clients),
        "total_clients": int(total_clients),
        "server_noise_multiplier": float(server_noise_multiplier),
        "update_clip_norm": float(update_clip_norm),
        "delta": float(delta),
        "epsilon_cumulative": encode_epsilon(epsilon_cumulative),
        "accountant": str(accountant),
        "sampling": sampling,
    }


def central_sample_rate(record: dict) -> float:
    """The client sampling rate the central accountant uses for a central record."""
    if record["sampling"] == "none":
        return 1.0
    return record["sampled_clients"] / record["total_clients"]


def dp_off_record(
    *,
    run_id: str,
    round: int,
    site_id: str | None = None,
    reason: str = "dp disabled",
    epsilon_budget: float | None = None,
) -> dict:
    """A round trained without DP (by a site, or by the server when ``site_id`` is None).

    Epsilon is infinite and is written as the string "inf".
    """
    return {
        "kind": "dp-off",
        "run_id": str(run_id),
        "round": int(round),
        "site_id": None if site_id is None else str(site_id),
        "reason": reason,
        "epsilon_cumulative": "inf",
        "epsilon_budget": encode_epsilon(epsilon_budget),
    }


# --------------------------------------------------------------------------------------------
# The ledger
# --------------------------------------------------------------------------------------------


class PrivacyLedger:
    """Append-only hash-chained JSONL ledger.

    Appends are serialised with an exclusive ``flock`` on the file, written with ONE
    ``write`` on an ``O_APPEND`` descriptor and fsynced, so a line is either wholly there or
    (after a crash mid-write) a truncated last line, which `verify_chain` reports and
    `append` refuses to build on. A resumed run just opens the same path: `append` continues
    the chain from the last line.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, record: dict) -> dict:
        """Append ``record`` (a dict with a ``kind``); returns it with seq/prev_hash/hash."""
        if record.get("kind") not in KINDS:
            raise ValueError(f"record kind must be one of {KINDS}, got {record.get('kind')!r}")
        reserved = {"seq", "prev_hash", "hash"} & record.keys()
        if reserved:
            raise ValueError(f"record must not set {sorted(reserved)}")
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            seq, prev = _head_of_file(self.path)
            full = dict(record, seq=seq + 1, prev_hash=prev)
            full["hash"] = record_hash(full)
            line = canonical_json(full) + b"\n"
            written = os.write(fd, line)
            if written != len(line):
                raise LedgerError(f"short write to {self.path}")
            os.fsync(fd)
        finally:
            os.close(fd)  # releases the lock
        return full

    def records(self) -> list[dict]:
        """All records, in order (raises `LedgerError` on a line that is not JSON)."""
        if not self.path.exists():
            return []
        out = []
        for i, raw in enumerate(self.path.read_bytes().splitlines(), start=1):
            try:
                out.append(json.loads(raw))
            except json.JSONDecodeError as e:
                raise LedgerError(f"{self.path}:{i}: not JSON ({e})") from None
        return out

    def head(self) -> tuple[int, str]:
        """``(seq, hash)`` of the last record; ``(0, GENESIS_HASH)`` when empty."""
        return _head_of_file(self.path)


def _head_of_file(path: Path) -> tuple[int, str]:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            if size == 0:
                return 0, GENESIS_HASH
            # Read back from the end until we hold the whole last line.
            chunk = 4096
            while True:
                start = max(0, size - chunk)
                f.seek(start)
                data = f.read(size - start)
                if not data.endswith(b"\n"):
                    raise LedgerError(
                        f"{path}: the last line is truncated (crash mid-append?); "
                        f"run verify_chain and repair by hand before appending"
                    )
                body = data[:-1]
                nl = body.rfind(b"\n")
                if nl >= 0 or start == 0:
                    last = body[nl + 1:]
                    break
                chunk *= 2
    except FileNotFoundError:
        return 0, GENESIS_HASH
    try:
        rec = json.loads(last)
        return int(rec["seq"]), str(rec["hash"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise LedgerError(f"{path}: the last line is not a ledger record ({e})") from None


@dataclass(frozen=True)
class ChainCheck:
    """Result of `verify_chain`. ``bad_line`` is 1-based (None when ok)."""

    ok: bool
    records: int
    bad_line: int | None = None
    reason: str | None = None
    head: tuple[int, str] = (0, GENESIS_HASH)


def verify_chain(path: Path, expected_head: tuple[int, str] | None = None) -> ChainCheck:
    """Check every line of the ledger at ``path``.

    Reasons reported (first bad line wins): "missing ledger", "truncated last line",
    "bad JSON", "edited line" (a record's hash does not match its content),
    "deleted or reordered line" (seq / prev_hash do not follow the previous record),
    "tail deleted" (shorter than ``expected_head``) or "head mismatch".
    """
    path = Path(path)
    if not path.exists():
        return ChainCheck(False, 0, None, "missing ledger")
    data = path.read_bytes()
    lines = data.split(b"\n")
    truncated = not data.endswith(b"\n") and data != b""
    if not truncated:
        lines = lines[:-1]  # the empty string after the final newline
    prev, n = GENESIS_HASH, 0
    hashes: list[str] = []
    for i, raw in enumerate(lines, start=1):
        last = i == len(lines)
        if last and truncated:
            return ChainCheck(False, n, i, "truncated last line", (n, prev))
        try:
            rec = json.loads(raw)
            if not isinstance(rec, dict):
                raise ValueError("not an object")
        except ValueError:
            return ChainCheck(False, n, i, "bad JSON", (n, prev))
        if rec.get("hash") != record_hash(rec):
            return ChainCheck(False, n, i, "edited line", (n, prev))
        if rec.get("seq") != i or rec.get("prev_hash") != prev:
            return ChainCheck(False, n, i, "deleted or reordered line", (n, prev))
        prev, n = rec["hash"], i
        hashes.append(prev)
    head = (n, prev)
    if expected_head is not None:
        exp_seq, exp_hash = expected_head
        if n < exp_seq:
            return ChainCheck(False, n, n + 1, "tail deleted", head)
        if exp_seq > 0 and hashes[exp_seq - 1] != exp_hash:
            return ChainCheck(False, n, exp_seq, "head mismatch", head)
    return ChainCheck(True, n, None, None, head)
