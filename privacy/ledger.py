"""Privacy ledgers: the coordinator's run ledger and each site's own signed ledger.

Two append-only, hash-chained JSONL files, one record per line:

* ``RUN_DIR/ledger.jsonl``, written by the coordinator (`PrivacyLedger`): every record the
  server has, the sites' records as they sent them and its own central records;
* ``PRIVACY_DIR/ledger.jsonl``, written by a site (`SiteLedger`) on its own disk: every record
  the site produced, in order, each signed with the site's ledger key (`LedgerKey`).

The coordinator may be hostile: it can edit, drop or invent lines of the run ledger and
re-hash the chain. What it cannot do is sign as a site. So a site's record carries
``site_chain`` (its position in the site's own chain) and ``signature`` (Ed25519 by the site's
ledger key over the record without its signature), and the audit checks them against keys
pinned out of band and against the site's own ledger (`privacy.audit`).

Chain: each line carries ``seq`` (1-based line number), ``prev_hash`` (the previous line's
``hash``; the first line uses `GENESIS_HASH`) and ``hash`` = SHA-256 over the canonical JSON
(sorted keys, no spaces, UTF-8) of the line WITHOUT its ``hash`` field. Editing, deleting or
reordering a line breaks the chain at that line; `verify_chain` finds the first bad line.
Deleting the LAST line(s) leaves a valid shorter chain: keep the head (`PrivacyLedger.head`)
elsewhere and pass it as ``verify_chain(path, expected_head=...)``, or cross-check the sites'
own ledgers (the audit's ``--site-dir``).

A site's line and the record it sends: the site's line is the record plus ``seq``,
``prev_hash``, ``signature`` and ``hash``; the record sent is the record plus
``site_chain = {"seq": seq, "hash": H}`` plus ``signature``, where ``H`` is the SHA-256 of the
site's line before it was signed (the record with ``seq`` and ``prev_hash``), so the signature
binds the record to its place in the site's chain, and the line's own ``hash`` covers the
signature. `sent_record` rebuilds the sent record from a site's line, byte for byte.

Epsilon in JSON: JSON has no infinity; an infinite epsilon is the STRING ``"inf"``
(`encode_epsilon` / `decode_epsilon`, from `privacy.accounting`). ``None``: not applicable.

Record kinds (build them with the constructors below, the one place their field names live):
  * ``"site"``    — one site's DP-SGD round, refused or not (`site_record`);
  * ``"dp-off"``  — a round without DP: by a site (its node config allows it) or, with
    ``site_id`` None, the server's central mechanism without noise (`dp_off_record`);
  * ``"central"`` — the server's central Gaussian mechanism after a round (`central_record`).
A site may only send `SITE_KINDS`; "central" records and site-less "dp-off" records are the
coordinator's own.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from privacy.accounting import UNITS, decode_epsilon, encode_epsilon, merge_history
from privacy.durable import atomic_write_bytes

__all__ = [
    "GENESIS_HASH", "LEDGER_NAME", "KEY_NAME", "PUBLIC_KEY_NAME", "KINDS", "SITE_KINDS",
    "LedgerError", "ChainCheck", "PrivacyLedger", "SiteLedger", "LedgerKey",
    "canonical_json", "record_hash", "verify_chain", "encode_epsilon", "decode_epsilon",
    "site_record", "dp_off_record", "central_record", "central_history",
    "verify_site_record", "public_key_from_text", "sent_record", "signed_message",
]

GENESIS_HASH = "0" * 64
LEDGER_NAME = "ledger.jsonl"
KEY_NAME = "ledger-key"
PUBLIC_KEY_NAME = "ledger-key.pub"
KINDS = ("site", "central", "dp-off")
SITE_KINDS = ("site", "dp-off")
RANDOMNESS = ("os-entropy", "seeded")
CHAIN_FIELDS = ("seq", "prev_hash", "hash")
SIGNED_FIELDS = ("site_chain", "signature")  # what a site adds to the records it sends
SIGNATURE_DOMAIN = b"fedvid-site-ledger-record-v1\x00"
KEY_PREFIX = "ed25519:"


class LedgerError(RuntimeError):
    """A ledger or a ledger key cannot be used (a torn last line, a mismatched key file)."""


def canonical_json(obj: Any) -> bytes:
    """The byte string that is hashed and signed: sorted keys, compact, UTF-8, no NaN/inf."""
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
    unit: str,
    clips_per_unit: int,
    local_steps: int,
    sample_rate: float,
    noise_multiplier: float,
    max_grad_norm: float,
    delta: float,
    epsilon_round: float,
    epsilon_cumulative: float,
    epsilon_pld: float | None,
    epsilon_budget: float | None,
    history: Sequence[Sequence[float]],
    randomness: str,
    refused: bool = False,
    refused_reason: str | None = None,
    released_without_dp: int = 0,
) -> dict:
    """A site's DP-SGD round (or its refusal), accounted per privacy ``unit``.

    ``epsilon_cumulative`` is the site's enforced epsilon after the round: the maximum over
    its units, `privacy.accounting.filter_epsilon` of ``history``, the most-charged unit's
    ``[(sigma, q, steps)]`` over the site's whole life; ``epsilon_pld`` the PLD figure of the
    same history, reported beside; ``epsilon_round`` the filter epsilon of this round's steps
    alone. A refused round has ``refused=True``, ``local_steps=0`` and the unchanged history.
    ``released_without_dp`` counts the units whose exact results left the site without DP
    (node-config opt-in); when it is > 0 the site has no DP guarantee and both cumulative
    epsilons are written as "inf" whatever was passed.
    """
    if unit not in UNITS:
        raise ValueError(f"unit must be one of {UNITS}, got {unit!r}")
    if randomness not in RANDOMNESS:
        raise ValueError(f"randomness must be one of {RANDOMNESS}, got {randomness!r}")
    released = int(released_without_dp)
    if released < 0:
        raise ValueError(f"released_without_dp must be >= 0, got {released_without_dp!r}")
    if released:
        epsilon_cumulative = epsilon_pld = math.inf
    return {
        "kind": "site",
        "accountant": "rdp",
        "site_id": str(site_id),
        "run_id": str(run_id),
        "round": int(round),
        "unit": unit,
        "clips_per_unit": int(clips_per_unit),
        "local_steps": int(local_steps),
        "sample_rate": float(sample_rate),
        "noise_multiplier": float(noise_multiplier),
        "max_grad_norm": float(max_grad_norm),
        "delta": float(delta),
        "epsilon_round": encode_epsilon(epsilon_round),
        "epsilon_cumulative": encode_epsilon(epsilon_cumulative),
        "epsilon_pld": encode_epsilon(epsilon_pld),
        "epsilon_budget": encode_epsilon(epsilon_budget),
        "history": [[s, q, n] for s, q, n in merge_history(history)],
        "randomness": randomness,
        "refused": bool(refused),
        "refused_reason": refused_reason,
        "released_without_dp": released,
    }


def dp_off_record(
    *,
    run_id: str,
    round: int,
    site_id: str | None = None,
    reason: str = "dp disabled",
    epsilon_budget: float | None = None,
    unit: str | None = None,
) -> dict:
    """A round without DP: a site trained without it (its node config allows it), or, with
    ``site_id`` None, the server had no central noise. Epsilon is the string "inf"."""
    if unit is not None and unit not in UNITS:
        raise ValueError(f"unit must be one of {UNITS} or None, got {unit!r}")
    return {
        "kind": "dp-off",
        "run_id": str(run_id),
        "round": int(round),
        "site_id": None if site_id is None else str(site_id),
        "unit": unit,
        "reason": reason,
        "epsilon_cumulative": "inf",
        "epsilon_budget": encode_epsilon(epsilon_budget),
    }


def central_record(
    *,
    run_id: str,
    round: int,
    sites_expected: int,
    sites_contributed: int,
    server_noise_multiplier: float,
    update_clip_norm: float,
    delta: float,
    epsilon_cumulative: float,
) -> dict:
    """The server's central (site-level) Gaussian mechanism after ``round``.

    The server divides the SUM of the clipped site updates by the fixed ``sites_expected``
    (refused, failed and rejected sites count as zero updates) and adds Gaussian noise of std
    ``server_noise_multiplier * update_clip_norm / sites_expected``: add-or-remove-one-site
    adjacency, no amplification by site sampling claimed. ``epsilon_cumulative`` is
    `privacy.accounting.pld_epsilon` of ``[(sigma, 1.0, rounds so far)]`` over the run.
    """
    if int(sites_expected) < 1:
        raise ValueError(f"sites_expected must be >= 1, got {sites_expected!r}")
    if not 0 <= int(sites_contributed) <= int(sites_expected):
        raise ValueError(
            f"sites_contributed = {sites_contributed} must be in [0, sites_expected = {sites_expected}]"
        )
    return {
        "kind": "central",
        "accountant": "pld",
        "sampling": "none",
        "adjacency": "add-or-remove-one-site",
        "run_id": str(run_id),
        "round": int(round),
        "sites_expected": int(sites_expected),
        "sites_contributed": int(sites_contributed),
        "server_noise_multiplier": float(server_noise_multiplier),
        "update_clip_norm": float(update_clip_norm),
        "delta": float(delta),
        "epsilon_cumulative": encode_epsilon(epsilon_cumulative),
    }


def central_history(records: Sequence[dict], run_id: str) -> list[tuple[float, float, int]]:
    """The central mechanism's ``[(sigma, 1.0, 1)]``, one per central record of ``run_id``
    (for a ServerApp resuming a run, and for the audit)."""
    return [
        (float(r["server_noise_multiplier"]), 1.0, 1)
        for r in records
        if r.get("kind") == "central" and r.get("run_id") == str(run_id)
    ]


# --------------------------------------------------------------------------------------------
# The chained file
# --------------------------------------------------------------------------------------------


class PrivacyLedger:
    """Append-only hash-chained JSONL ledger (the run's; a site's is a `SiteLedger`).

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
        """Append ``record`` (a dict with a ``kind``, e.g. a site's signed record as it
        arrived); returns it with the chain's ``seq``, ``prev_hash`` and ``hash`` added."""
        _check_kind(record, KINDS)
        _refuse_fields(record, CHAIN_FIELDS)

        def line(seq: int, prev: str) -> dict:
            full = dict(record, seq=seq, prev_hash=prev)
            full["hash"] = record_hash(full)
            return full

        return self._append(line)

    def _append(self, build: Callable[[int, str], dict]) -> dict:
        """Append the line ``build(seq, prev_hash)`` under the lock; return that line."""
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            seq, prev = _head_of_file(self.path)
            full = build(seq + 1, prev)
            data = canonical_json(full) + b"\n"  # raises on NaN/inf before anything is written
            if os.write(fd, data) != len(data):
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


def _check_kind(record: dict, kinds: tuple[str, ...]) -> None:
    if record.get("kind") not in kinds:
        raise ValueError(f"record kind must be one of {kinds}, got {record.get('kind')!r}")


def _refuse_fields(record: dict, fields: tuple[str, ...]) -> None:
    reserved = set(fields) & record.keys()
    if reserved:
        raise ValueError(f"record must not set {sorted(reserved)}")


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
    """Check every line of the ledger at ``path`` (a run's or a site's).

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
            good_hash = rec.get("hash") == record_hash(rec)
        except ValueError:  # not JSON, or NaN/inf inside (canonical JSON has none)
            return ChainCheck(False, n, i, "bad JSON", (n, prev))
        if not good_hash:
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


# --------------------------------------------------------------------------------------------
# Site signatures
# --------------------------------------------------------------------------------------------


def signed_message(record: dict) -> bytes:
    """The bytes a site signs: the domain tag, then the canonical JSON of ``record`` without
    its ``signature`` (and without a run chain's ``seq``/``prev_hash``/``hash``, which the
    coordinator adds around a record after it was signed)."""
    body = {k: v for k, v in record.items() if k != "signature" and k not in CHAIN_FIELDS}
    return SIGNATURE_DOMAIN + canonical_json(body)


def public_key_from_text(text: str):
    """An Ed25519 public key from its text form ``"ed25519:<base64 of the raw 32 bytes>"``
    (raises ValueError on anything else)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    text = str(text).strip()
    if not text.startswith(KEY_PREFIX):
        raise ValueError(f"a site public key must look like '{KEY_PREFIX}<base64>', got {text[:40]!r}")
    try:
        raw = base64.b64decode(text[len(KEY_PREFIX):], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"site public key {text[:40]!r}...: not base64") from None
    if len(raw) != 32:
        raise ValueError(f"site public key {text[:40]!r}...: {len(raw)} bytes, expected 32")
    return Ed25519PublicKey.from_public_bytes(raw)


def _key_text(public_key) -> str:
    from cryptography.hazmat.primitives import serialization

    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return KEY_PREFIX + base64.b64encode(raw).decode("ascii")


def verify_site_record(record: dict, public_key_text: str) -> bool:
    """Whether ``record`` (as sent, or as found in a run ledger) is a site record signed by
    the key ``public_key_text``: kind in `SITE_KINDS`, a ``site_id``, a ``site_chain`` and a
    valid signature over the rest. Raises ValueError only for a malformed key."""
    from cryptography.exceptions import InvalidSignature

    key = public_key_from_text(public_key_text)
    chain = record.get("site_chain")
    if (
        record.get("kind") not in SITE_KINDS
        or not isinstance(record.get("site_id"), str)
        or not isinstance(chain, dict)
        or not isinstance(chain.get("seq"), int)
        or not isinstance(chain.get("hash"), str)
        or not isinstance(record.get("signature"), str)
    ):
        return False
    try:
        signature = base64.b64decode(record["signature"], validate=True)
        key.verify(signature, signed_message(record))
    except (binascii.Error, ValueError, InvalidSignature):
        return False
    return True


class LedgerKey:
    """A site's Ed25519 ledger key, kept in its privacy dir as ``ledger-key`` (PKCS#8 PEM,
    mode 0600) and ``ledger-key.pub`` (the one-line text form to pin out of band).

    It signs the site's ledger records and nothing else; it is not the SuperNode's
    authentication key.
    """

    def __init__(self, private_key) -> None:
        self._key = private_key

    @classmethod
    def load_or_create(cls, privacy_dir: Path) -> "LedgerKey":
        """The key in ``privacy_dir``, created on first use. Two processes creating it at
        once end up with the same key (the file is created exclusively; the loser reads the
        winner's). A ``ledger-key.pub`` that does not match the private key is an error."""
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        folder = Path(privacy_dir).expanduser()
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / KEY_NAME
        if not path.exists():
            pem = Ed25519PrivateKey.generate().private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            _create_exclusive(path, pem)
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise LedgerError(f"{path}: not an Ed25519 private key")
        self = cls(key)
        text = self.public_key_text()
        pub = folder / PUBLIC_KEY_NAME
        if pub.exists():
            if pub.read_text().strip() != text:
                raise LedgerError(
                    f"{pub} does not match {path}: someone replaced one of them; the key "
                    f"pinned by the auditors is the one to keep"
                )
        else:
            atomic_write_bytes(pub, (text + "\n").encode("ascii"))
            os.chmod(pub, 0o644)
        return self

    def public_key_text(self) -> str:
        """``"ed25519:<base64 of the raw 32-byte public key>"``, one line, for pinning."""
        return _key_text(self._key.public_key())

    def sign(self, record: dict) -> str:
        """Base64 Ed25519 signature over `signed_message` of ``record``."""
        return base64.b64encode(self._key.sign(signed_message(record))).decode("ascii")


def _create_exclusive(path: Path, data: bytes) -> None:
    """Create ``path`` (mode 0600) holding ``data`` unless it exists: written to a temporary
    file, fsynced, then hard-linked into place, which fails if another process won."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
    finally:
        os.unlink(tmp)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def sent_record(line: dict) -> dict:
    """The record a site sent for ``line`` of its own ledger: the line's record plus
    ``site_chain`` and ``signature``, without the site chain's own fields."""
    body = {k: v for k, v in line.items() if k not in CHAIN_FIELDS and k != "signature"}
    unsigned = dict(body, seq=line["seq"], prev_hash=line["prev_hash"])
    return dict(body, site_chain={"seq": line["seq"], "hash": record_hash(unsigned)},
                signature=line.get("signature"))


class SiteLedger:
    """A site's own signed, hash-chained ledger: ``PRIVACY_DIR/ledger.jsonl`` and its key.

    `append` writes the record to the site's disk FIRST, then returns the signed record to
    send to the coordinator; what the coordinator later shows in its run ledger can be
    checked line by line against this file.
    """

    def __init__(self, privacy_dir: Path) -> None:
        self.privacy_dir = Path(privacy_dir).expanduser()
        self.key = LedgerKey.load_or_create(self.privacy_dir)
        self._ledger = PrivacyLedger(self.privacy_dir / LEDGER_NAME)
        self.path = self._ledger.path

    def append(self, record: dict) -> dict:
        """Append ``record`` (a `site_record` or a site's `dp_off_record`) to the site's chain
        and return the record to SEND: ``record`` plus ``site_chain = {"seq", "hash"}`` and
        ``signature``."""
        _check_kind(record, SITE_KINDS)
        if not isinstance(record.get("site_id"), str):
            raise ValueError("a site's record must name its site_id")
        _refuse_fields(record, CHAIN_FIELDS + SIGNED_FIELDS)
        sent: dict = {}

        def line(seq: int, prev: str) -> dict:
            full = dict(record, seq=seq, prev_hash=prev)
            to_send = dict(record, site_chain={"seq": seq, "hash": record_hash(full)})
            to_send["signature"] = full["signature"] = self.key.sign(to_send)
            full["hash"] = record_hash(full)
            sent.update(to_send)
            return full

        self._ledger._append(line)
        return sent

    def records(self) -> list[dict]:
        """The site's lines, in order (each a record with seq, prev_hash, signature, hash)."""
        return self._ledger.records()

    def head(self) -> tuple[int, str]:
        """``(seq, hash)`` of the site's last line; ``(0, GENESIS_HASH)`` when empty."""
        return self._ledger.head()

    def public_key_text(self) -> str:
        """The site's ledger public key, to hand to the auditors (`fedvid ledger-key`)."""
        return self.key.public_key_text()
