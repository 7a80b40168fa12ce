"""The hash-chained ledger: appends chain, tampering is found, infinity round-trips."""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing as mp

import pytest

from privacy.ledger import (
    GENESIS_HASH,
    LedgerError,
    PrivacyLedger,
    canonical_json,
    central_history,
    central_record,
    decode_epsilon,
    dp_off_record,
    site_record,
    verify_chain,
)


def a_site_record(round_=1, eps=1.5):
    return site_record(
        site_id="site-0", run_id="run", round=round_, local_steps=20, sample_rate=0.05,
        noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5, epsilon_round=eps,
        epsilon_cumulative=eps, epsilon_budget=8.0, accountant="prv",
        history=[(1.0, 0.05, 20 * round_)],
    )


def write_ledger(path, n=5):
    ledger = PrivacyLedger(path)
    for i in range(1, n + 1):
        ledger.append(a_site_record(i, eps=float(i)))
    return ledger


def test_records_chain_from_genesis_with_sha256_over_canonical_json(tmp_path):
    ledger = write_ledger(tmp_path / "ledger.jsonl", 3)
    recs = ledger.records()
    assert [r["seq"] for r in recs] == [1, 2, 3]
    assert recs[0]["prev_hash"] == GENESIS_HASH
    for prev, rec in zip([None] + recs, recs):
        body = {k: v for k, v in rec.items() if k != "hash"}
        assert rec["hash"] == hashlib.sha256(canonical_json(body)).hexdigest()
        if prev is not None:
            assert rec["prev_hash"] == prev["hash"]
    assert ledger.head() == (3, recs[-1]["hash"])
    assert verify_chain(ledger.path).ok


def test_a_resumed_run_continues_the_chain(tmp_path):
    path = tmp_path / "ledger.jsonl"
    write_ledger(path, 2)
    resumed = PrivacyLedger(path)
    assert resumed.head()[0] == 2
    rec = resumed.append(a_site_record(3))
    assert rec["seq"] == 3 and rec["prev_hash"] == resumed.records()[1]["hash"]
    assert verify_chain(path).ok


def _lines(path):
    return path.read_bytes().splitlines(keepends=True)


def test_edited_line_is_found(tmp_path):
    path = tmp_path / "ledger.jsonl"
    write_ledger(path)
    lines = _lines(path)
    lines[2] = lines[2].replace(b'"epsilon_cumulative":3.0', b'"epsilon_cumulative":0.3')
    path.write_bytes(b"".join(lines))
    check = verify_chain(path)
    assert (check.ok, check.bad_line, check.reason) == (False, 3, "edited line")


def test_edited_line_with_recomputed_hash_breaks_the_next_link(tmp_path):
    path = tmp_path / "ledger.jsonl"
    write_ledger(path)
    recs = [json.loads(line) for line in _lines(path)]
    recs[1]["epsilon_cumulative"] = 0.1
    body = {k: v for k, v in recs[1].items() if k != "hash"}
    recs[1]["hash"] = hashlib.sha256(canonical_json(body)).hexdigest()
    path.write_bytes(b"".join(canonical_json(r) + b"\n" for r in recs))
    check = verify_chain(path)
    assert (check.ok, check.bad_line, check.reason) == (False, 3, "deleted or reordered line")


def test_deleted_and_reordered_lines_are_found(tmp_path):
    path = tmp_path / "ledger.jsonl"
    write_ledger(path)
    lines = _lines(path)
    path.write_bytes(b"".join(lines[:2] + lines[3:]))
    assert verify_chain(path).reason == "deleted or reordered line"
    assert verify_chain(path).bad_line == 3
    path.write_bytes(b"".join([lines[1], lines[0]] + lines[2:]))
    check = verify_chain(path)
    assert (check.ok, check.bad_line, check.reason) == (False, 1, "deleted or reordered line")


def test_truncated_last_line_and_bad_json_are_found(tmp_path):
    path = tmp_path / "ledger.jsonl"
    ledger = write_ledger(path)
    data = path.read_bytes()
    path.write_bytes(data[:-25])
    check = verify_chain(path)
    assert (check.ok, check.bad_line, check.reason) == (False, 5, "truncated last line")
    with pytest.raises(LedgerError, match="truncated"):
        ledger.append(a_site_record(6))  # never build on a torn record
    lines = _lines(tmp_path / "ledger.jsonl")
    path.write_bytes(b"".join(lines[:-1]) + b"{not json\n")
    assert verify_chain(path).reason == "bad JSON"


def test_deleted_tail_is_found_only_with_an_anchored_head(tmp_path):
    path = tmp_path / "ledger.jsonl"
    ledger = write_ledger(path)
    head = ledger.head()
    path.write_bytes(b"".join(_lines(path)[:-1]))
    assert verify_chain(path).ok  # a shorter chain is still a chain...
    check = verify_chain(path, expected_head=head)
    assert (check.ok, check.reason) == (False, "tail deleted")
    assert verify_chain(tmp_path / "missing.jsonl").reason == "missing ledger"


def test_infinite_epsilon_is_the_string_inf(tmp_path):
    ledger = PrivacyLedger(tmp_path / "ledger.jsonl")
    rec = ledger.append(dp_off_record(run_id="run", round=1, site_id="site-0"))
    raw = ledger.path.read_text()
    assert '"epsilon_cumulative":"inf"' in raw and "Infinity" not in raw
    assert decode_epsilon(rec["epsilon_cumulative"]) == math.inf
    # A raw float inf never reaches the file: strict JSON refuses it, nothing is written.
    with pytest.raises(ValueError):
        ledger.append(dict(a_site_record(), epsilon_round=math.inf))
    assert ledger.path.read_text() == raw and verify_chain(ledger.path).ok


def test_site_record_encodes_inf_epsilon():
    rec = site_record(
        site_id="s", run_id="r", round=1, local_steps=1, sample_rate=0.1, noise_multiplier=0.0,
        max_grad_norm=1.0, delta=1e-5, epsilon_round=math.inf, epsilon_cumulative=math.inf,
        epsilon_budget=None, accountant="prv", history=[(0.0, 0.1, 1)],
    )
    assert rec["epsilon_round"] == "inf" and rec["epsilon_budget"] is None
    canonical_json(rec)  # valid strict JSON


def test_central_history_is_rebuilt_from_records(tmp_path):
    ledger = PrivacyLedger(tmp_path / "ledger.jsonl")
    for rnd, sampling in [(1, "poisson"), (2, "none")]:
        ledger.append(central_record(
            run_id="run", round=rnd, sampled_clients=2, total_clients=8,
            server_noise_multiplier=0.9, update_clip_norm=1.0, delta=1e-5,
            epsilon_cumulative=1.0, accountant="prv", sampling=sampling))
    assert central_history(ledger.records(), "run") == [(0.9, 0.25, 1), (0.9, 1.0, 1)]


def _append_many(path, k):
    ledger = PrivacyLedger(path)
    for i in range(k):
        ledger.append(a_site_record(i + 1))


def test_concurrent_appends_from_processes_keep_one_chain(tmp_path):
    path = tmp_path / "ledger.jsonl"
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_append_many, args=(path, 10)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    check = verify_chain(path)
    assert check.ok and check.records == 40
