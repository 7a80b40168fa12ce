"""The ledgers: appends chain, tampering is found, sites sign, infinity round-trips."""

from __future__ import annotations

import base64
import hashlib
import json
import math
import multiprocessing as mp
import os
import stat

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import privacy.accounting as accounting
from privacy.ledger import (
    GENESIS_HASH,
    KINDS,
    SITE_KINDS,
    LedgerError,
    LedgerKey,
    PrivacyLedger,
    SiteLedger,
    canonical_json,
    central_history,
    central_record,
    decode_epsilon,
    dp_off_record,
    encode_epsilon,
    public_key_from_text,
    sent_record,
    signed_message,
    site_record,
    verify_chain,
    verify_site_record,
)

from honest_sites import DELTA, Site


def a_site_record(round_=1, eps=1.5, site_id="site-0", **over):
    fields = dict(
        site_id=site_id, run_id="run", round=round_, unit="video", clips_per_unit=2, local_steps=20,
        sample_rate=0.05, noise_multiplier=1.0, max_grad_norm=1.0, delta=DELTA, epsilon_round=eps,
        epsilon_cumulative=eps, epsilon_pld=eps, epsilon_budget=8.0, history=[(1.0, 0.05, 20 * round_)],
        randomness="os-entropy",
    )
    fields.update(over)
    return site_record(**fields)


def write_ledger(path, n=5):
    ledger = PrivacyLedger(path)
    for i in range(1, n + 1):
        ledger.append(a_site_record(i, eps=float(i)))
    return ledger


def _lines(path):
    return path.read_bytes().splitlines(keepends=True)


# -- the chain ---------------------------------------------------------------------------------


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
    path.write_bytes(b"".join(lines[:-1]) + b'{"epsilon_cumulative": NaN}\n')
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


def test_append_refuses_chain_fields_and_unknown_kinds(tmp_path):
    ledger = PrivacyLedger(tmp_path / "ledger.jsonl")
    for field in ("seq", "prev_hash", "hash"):
        with pytest.raises(ValueError, match="must not set"):
            ledger.append(dict(a_site_record(), **{field: 1}))
    with pytest.raises(ValueError, match="kind"):
        ledger.append({"kind": "bogus"})
    assert ledger.records() == []


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


# -- records -----------------------------------------------------------------------------------


def test_epsilon_codec_is_the_accounting_one_and_inf_is_the_string_inf(tmp_path):
    assert decode_epsilon is accounting.decode_epsilon and encode_epsilon is accounting.encode_epsilon
    ledger = PrivacyLedger(tmp_path / "ledger.jsonl")
    rec = ledger.append(dp_off_record(run_id="run", round=1, site_id="site-0", unit="video"))
    raw = ledger.path.read_text()
    assert '"epsilon_cumulative":"inf"' in raw and "Infinity" not in raw
    assert decode_epsilon(rec["epsilon_cumulative"]) == math.inf
    # A raw float inf never reaches the file: strict JSON refuses it, nothing is written.
    with pytest.raises(ValueError):
        ledger.append(dict(a_site_record(), epsilon_round=math.inf))
    assert ledger.path.read_text() == raw and verify_chain(ledger.path).ok


def test_site_record_fields_are_the_units_accounting_and_nothing_about_the_dataset():
    rec = a_site_record(history=[(1.0, 0.05, 10), (1.0, 0.05, 10), (2.0, 0.1, 0)])
    assert rec["kind"] == "site" and rec["accountant"] == "rdp" and rec["unit"] == "video"
    assert rec["history"] == [[1.0, 0.05, 20]]  # merged, empty entries dropped
    assert rec["released_without_dp"] == 0 and rec["randomness"] == "os-entropy"
    assert not {k for k in rec if "fingerprint" in k}
    canonical_json(rec)  # valid strict JSON
    with pytest.raises(ValueError, match="unit"):
        a_site_record(unit="frame")
    with pytest.raises(ValueError, match="randomness"):
        a_site_record(randomness="/dev/random")


def test_a_site_that_released_units_without_dp_records_inf():
    rec = a_site_record(released_without_dp=3)
    assert rec["epsilon_cumulative"] == "inf" and rec["epsilon_pld"] == "inf"
    assert rec["epsilon_round"] == 1.5 and rec["released_without_dp"] == 3


def test_central_record_claims_no_sampling_and_its_history_is_rebuilt(tmp_path):
    ledger = PrivacyLedger(tmp_path / "ledger.jsonl")
    for rnd in (1, 2):
        ledger.append(central_record(
            run_id="run", round=rnd, sites_expected=4, sites_contributed=3, server_noise_multiplier=0.9,
            update_clip_norm=1.0, delta=DELTA, epsilon_cumulative=1.0))
    ledger.append(central_record(
        run_id="other", round=1, sites_expected=4, sites_contributed=4, server_noise_multiplier=2.0,
        update_clip_norm=1.0, delta=DELTA, epsilon_cumulative=1.0))
    rec = ledger.records()[0]
    assert (rec["accountant"], rec["sampling"], rec["adjacency"]) == ("pld", "none", "add-or-remove-one-site")
    assert central_history(ledger.records(), "run") == [(0.9, 1.0, 1), (0.9, 1.0, 1)]
    with pytest.raises(ValueError, match="sites_contributed"):
        central_record(run_id="run", round=1, sites_expected=2, sites_contributed=3, server_noise_multiplier=1.0,
                       update_clip_norm=1.0, delta=DELTA, epsilon_cumulative=1.0)


# -- site keys and signatures ------------------------------------------------------------------


def test_ledger_key_is_kept_private_and_its_public_text_is_one_pinnable_line(tmp_path):
    key = LedgerKey.load_or_create(tmp_path / "privacy")
    private = tmp_path / "privacy" / "ledger-key"
    assert stat.S_IMODE(os.stat(private).st_mode) == 0o600
    assert private.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    text = key.public_key_text()
    assert text.startswith("ed25519:") and len(base64.b64decode(text[8:])) == 32 and "\n" not in text
    assert (tmp_path / "privacy" / "ledger-key.pub").read_text().strip() == text
    assert LedgerKey.load_or_create(tmp_path / "privacy").public_key_text() == text  # loaded, not replaced
    public_key_from_text(text)
    for bad in ("ssh-ed25519 AAAA", "ed25519:not base64!", "ed25519:" + base64.b64encode(b"short").decode()):
        with pytest.raises(ValueError):
            public_key_from_text(bad)


def test_a_replaced_public_key_file_is_refused(tmp_path):
    LedgerKey.load_or_create(tmp_path)
    other = LedgerKey(Ed25519PrivateKey.generate()).public_key_text()
    (tmp_path / "ledger-key.pub").write_text(other + "\n")
    with pytest.raises(LedgerError, match="does not match"):
        LedgerKey.load_or_create(tmp_path)


def _key_text(folder, out):
    out.put(LedgerKey.load_or_create(folder).public_key_text())


def test_sites_starting_at_once_share_one_key(tmp_path):
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_key_text, args=(tmp_path / "privacy", out)) for _ in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert len({out.get() for _ in procs}) == 1
    assert sorted(p.name for p in (tmp_path / "privacy").iterdir()) == ["ledger-key", "ledger-key.pub"]


def test_site_ledger_writes_first_and_sends_a_signed_record_bound_to_its_chain(tmp_path):
    site = SiteLedger(tmp_path / "privacy")
    sent = [site.append(a_site_record(i, eps=float(i))) for i in (1, 2)]
    lines = site.records()
    assert verify_chain(site.path).ok and site.head() == (2, lines[-1]["hash"])
    for i, (rec, line) in enumerate(zip(sent, lines), start=1):
        assert rec["site_chain"]["seq"] == i and "seq" not in rec and "hash" not in rec
        assert line["signature"] == rec["signature"]
        assert sent_record(line) == rec  # the site's line holds exactly what it sent
        assert verify_site_record(rec, site.public_key_text())
    # The chain hash the record names is the line's before signing, and its signature is
    # domain-separated Ed25519 over the record without its signature.
    unsigned = {k: v for k, v in lines[1].items() if k not in ("signature", "hash")}
    assert sent[1]["site_chain"]["hash"] == hashlib.sha256(canonical_json(unsigned)).hexdigest()
    body = {k: v for k, v in sent[1].items() if k != "signature"}
    assert signed_message(sent[1]) == b"fedvid-site-ledger-record-v1\x00" + canonical_json(body)
    key = public_key_from_text(site.public_key_text())
    key.verify(base64.b64decode(sent[1]["signature"]), signed_message(sent[1]))


def test_a_signed_record_stays_valid_inside_the_run_ledger(tmp_path):
    site = SiteLedger(tmp_path / "privacy")
    run = PrivacyLedger(tmp_path / "run" / "ledger.jsonl")
    run.append(a_site_record(1, site_id="other"))  # the run's chain is not the site's
    stored = run.append(site.append(a_site_record(1)))
    assert stored["seq"] == 2 and stored["site_chain"]["seq"] == 1
    assert verify_site_record(run.records()[1], site.public_key_text())
    assert verify_chain(run.path).ok


@pytest.mark.parametrize("edit", [
    lambda r: r.update(noise_multiplier=3.0),
    lambda r: r.update(site_id="site-1"),
    lambda r: r.update(epsilon_cumulative=0.1),
    lambda r: r["history"].append([3.0, 0.05, 1]),
    lambda r: r.update(site_chain={"seq": 9, "hash": r["site_chain"]["hash"]}),
    lambda r: r.update(kind="central"),
    lambda r: r.pop("site_chain"),
    lambda r: r.update(signature="AAAA"),
    lambda r: r.update(extra="field"),
], ids=["sigma", "site_id", "epsilon", "history", "site-seq", "kind", "no-site-chain", "bad-signature", "added"])
def test_any_edit_of_a_signed_record_fails_verification(tmp_path, edit):
    site = SiteLedger(tmp_path)
    rec = json.loads(json.dumps(site.append(a_site_record())))
    edit(rec)
    assert not verify_site_record(rec, site.public_key_text())


def test_a_record_verifies_only_under_its_own_sites_key(tmp_path):
    a, b = SiteLedger(tmp_path / "a"), SiteLedger(tmp_path / "b")
    rec = a.append(a_site_record(site_id="site-b"))  # site a signing under site b's name
    assert verify_site_record(rec, a.public_key_text())
    assert not verify_site_record(rec, b.public_key_text())
    # A signature by a's key over the record without the domain tag is not a ledger signature.
    raw = {k: v for k, v in rec.items() if k != "signature"}
    rec2 = dict(raw, signature=base64.b64encode(a.key._key.sign(canonical_json(raw))).decode())
    assert not verify_site_record(rec2, a.public_key_text())


def test_a_site_ledger_takes_only_site_kinds_without_chain_or_signature_fields(tmp_path):
    assert set(SITE_KINDS) < set(KINDS) and "central" not in SITE_KINDS
    site = SiteLedger(tmp_path)
    with pytest.raises(ValueError, match="kind"):
        site.append(central_record(run_id="r", round=1, sites_expected=1, sites_contributed=1,
                                   server_noise_multiplier=1.0, update_clip_norm=1.0, delta=DELTA,
                                   epsilon_cumulative=1.0))
    with pytest.raises(ValueError, match="site_id"):
        site.append(dp_off_record(run_id="r", round=1))
    for field in ("seq", "hash", "signature", "site_chain"):
        with pytest.raises(ValueError, match="must not set"):
            site.append(dict(a_site_record(), **{field: 1}))
    assert site.records() == []
    sent = site.append(dp_off_record(run_id="r", round=1, site_id="site-0", unit="person"))
    assert sent["kind"] == "dp-off" and verify_site_record(sent, site.public_key_text())


def test_honest_site_helper_signs_what_it_sends(tmp_path):
    site = Site(tmp_path, "site-0")
    sent = site.train("run", 1, 1.0, 0.05, 20)
    assert verify_site_record(sent, site.key)
    assert sent["epsilon_cumulative"] == accounting.filter_epsilon([(1.0, 0.05, 20)], DELTA)
