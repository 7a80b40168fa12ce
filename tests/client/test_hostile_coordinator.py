"""The coordinator plays against a site: it picks the run config and the weights and reads every
reply. Each test is one attack from the privacy review, run through the real ClientApp handler
on a real (small) site with videos on disk; each failed on the code before the fix."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict

import client.client_app as client_app
from client.client_app import evaluate_global, train
from client.run_config import RunConfig
from client.synth import write_synthetic_dataset
from models.registry import build_model
from privacy.face_models import provision_face_models
from privacy.site_budget import SiteBudget

CLASSES = "move-right,move-left,move-down,move-up,grow,shrink"


@pytest.fixture(scope="module")
def site_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    data = write_synthetic_dataset(root / "videos", seed=5, videos_per_class=3)  # 18 videos, 2 clips each
    models = provision_face_models()
    mp = pytest.MonkeyPatch()
    mp.setenv("FEDVID_HOME", str(root / "home"))
    mp.setenv("FEDVID_FACE_MODELS", str(models["short_range"].parent))
    mp.delenv("FEDVID_SIMULATED_SITE_CONFIG", raising=False)
    yield data
    mp.undo()


def run_config(**overrides) -> dict:
    values = dict(model_size="tiny", frame_size=24, local_epochs=1, batch_size=6, delta=0.01, classes=CLASSES,
                  central_eval=False, num_server_rounds=2, target_epsilon=4.0)
    return RunConfig(**{**values, **overrides}).to_mapping()


def node_config(data, privacy_dir, **extra) -> dict:
    return {"data-dir": str(data), "site-id": "hospital-a", "privacy-dir": str(privacy_dir),
            "cache-dir": str(data.parent / "cache"), "epsilon-budget": 50.0, "delta": 0.01,
            "device": "cpu", **extra}


def ask(kind: str, arrays: ArrayRecord, server_round: int = 1, run_id: int = 1) -> Message:
    metadata = Metadata(run_id=run_id, message_id=f"m-{kind}-{server_round}", src_node_id=0, dst_node_id=7,
                        reply_to_message_id="", group_id=str(server_round), created_at=time.time(), ttl=600,
                        message_type=kind)
    return Message(RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": server_round})}),
                   metadata=metadata)


def train_once(data, privacy_dir, config: dict, server_round: int = 1, run_id: int = 1, **node):
    torch.manual_seed(0)
    model = build_model(RunConfig.from_mapping(config).model_spec(6))
    sent = model.state_dict()
    context = Context(run_id=run_id, node_id=7, node_config=node_config(data, privacy_dir, **node), state=RecordDict(),
                      run_config=config)
    reply = train(ask("train", ArrayRecord(sent), server_round, run_id), context)
    returned = reply.content["arrays"].to_torch_state_dict()
    update = torch.cat([(returned[k] - sent[k]).flatten().double() for k in sent])
    return update, json.loads(reply.content["site"]["ledger-record"]), reply


def test_the_coordinator_cannot_replay_the_noise_with_the_run_seed(site_data, tmp_path):
    """The same round, same weights, same run config and seed: the updates must differ.
    (Before: torch's global RNG seeded with seed * 1000 + round made them identical.)"""
    first, record, _ = train_once(site_data, tmp_path / "a", run_config())
    second, _, _ = train_once(site_data, tmp_path / "b", run_config())
    assert not torch.allclose(first, second)
    assert record["randomness"] == "os-entropy"


def test_a_site_that_asks_for_seeded_noise_gets_it_and_says_so(site_data, tmp_path):
    first, record, _ = train_once(site_data, tmp_path / "a", run_config(), **{"dp-seed": 11})
    second, _, _ = train_once(site_data, tmp_path / "b", run_config(), **{"dp-seed": 11})
    assert record["randomness"] == "seeded"
    assert torch.allclose(first, second)


def test_the_coordinator_cannot_switch_dp_off(site_data, tmp_path):
    update, record, _ = train_once(site_data, tmp_path, run_config(dp=False))
    assert float(update.abs().max()) == 0.0  # the global weights came back untouched
    assert record["refused"] and "allow" in record["refused_reason"]
    ledger = (tmp_path / "ledger.jsonl").read_text().splitlines()
    assert json.loads(ledger[-1])["refused"]  # the refusal is on the site's own record


def test_a_site_that_allows_non_private_rounds_records_them_as_infinite(site_data, tmp_path):
    update, record, _ = train_once(site_data, tmp_path, run_config(dp=False), **{"allow-non-private": True})
    assert float(update.abs().max()) > 0
    assert record["kind"] == "dp-off" and record["epsilon_cumulative"] == "inf"
    assert SiteBudget.open_existing(tmp_path).epsilon() == float("inf")


def test_a_new_seed_or_validation_fraction_does_not_reset_the_budget(site_data, tmp_path):
    """Before: the budget was keyed by a fingerprint of the split, so seed=1 started afresh."""
    _, first, _ = train_once(site_data, tmp_path, run_config(seed=0), run_id=1)
    _, second, _ = train_once(site_data, tmp_path, run_config(seed=1, val_fraction=0.5), run_id=2)
    assert second["epsilon_cumulative"] > first["epsilon_cumulative"] * 1.2
    assert SiteBudget.open_existing(tmp_path).epsilon() == pytest.approx(second["epsilon_cumulative"])


def test_an_added_video_starts_at_zero_and_old_videos_keep_their_history(site_data, tmp_path):
    _, first, _ = train_once(site_data, tmp_path, run_config(), run_id=1)
    extra = sorted(site_data.rglob("*.mp4"))[0]
    copy = extra.parent / "added-later.mp4"
    frames = np.fromfile(extra, dtype=np.uint8)
    copy.write_bytes(frames.tobytes() + b"\0")  # same pictures, other bytes: a new unit
    client_app._site_data.cache_clear()  # a ClientApp process remembers its site's data
    try:
        _, second, _ = train_once(site_data, tmp_path, run_config(), run_id=2)
    finally:
        copy.unlink()
        client_app._site_data.cache_clear()
    budget = SiteBudget.open_existing(tmp_path)
    assert budget.unit_count() == 19
    assert second["epsilon_cumulative"] > first["epsilon_cumulative"]


def test_the_privacy_unit_is_the_video_and_the_sample_rate_counts_videos(site_data, tmp_path):
    """18 videos give 36 clips; batches of 6 units: q = 1/3 over videos (1/6 over clips before)."""
    _, record, _ = train_once(site_data, tmp_path, run_config())
    assert record["sample_rate"] == pytest.approx(1 / 3)
    assert record["unit"] == "video"
    assert SiteBudget.open_existing(tmp_path).unit_count() == 18


def test_clip_level_units_only_by_the_sites_own_opt_in(site_data, tmp_path):
    _, record, _ = train_once(site_data, tmp_path, run_config(), **{"privacy-unit": "clip"})
    assert record["unit"] == "clip" and record["sample_rate"] == pytest.approx(1 / 6)


def test_a_person_who_appears_in_several_videos_is_one_unit(site_data, tmp_path):
    videos = sorted(p.relative_to(site_data) for p in site_data.rglob("*.mp4"))
    manifest = tmp_path / "subjects.csv"
    # Videos 0-5 show Ann, 5-11 Bob (video 5 both: Ann and Bob become one unit), the rest one each.
    rows = [f"{v},ann" for v in videos[:6]] + [f"{v},bob" for v in videos[5:12]]
    rows += [f"{v},p{i}" for i, v in enumerate(videos[12:])]
    manifest.write_text("video,subject\n" + "\n".join(rows) + "\n")
    _, record, _ = train_once(site_data, tmp_path / "p", run_config(),
                              **{"privacy-unit": "person", "subjects": str(manifest)})
    assert record["unit"] == "person"
    assert SiteBudget.open_existing(tmp_path / "p").unit_count() == 1 + 6


def test_a_budget_spent_is_refused_whatever_the_coordinator_asks(site_data, tmp_path):
    records = [train_once(site_data, tmp_path, run_config(), server_round=r, **{"epsilon-budget": 4.5})[1]
               for r in (1, 2, 3)]
    assert [r["refused"] for r in records] == [False, False, True]
    # A new run with another seed is refused too: the budget is the units', not the run's.
    _, again, _ = train_once(site_data, tmp_path, run_config(seed=9), run_id=2,
                             **{"epsilon-budget": 4.5})
    assert again["refused"]


def test_the_site_delta_is_its_own_not_the_runs(site_data, tmp_path):
    """A node config without `delta` gets the site's default, never the run's (before: the run's)."""
    config = run_config(delta=0.04)
    model = build_model(RunConfig.from_mapping(config).model_spec(6))
    node = {k: v for k, v in node_config(site_data, tmp_path).items() if k != "delta"}
    context = Context(run_id=1, node_id=7, node_config=node, state=RecordDict(), run_config=config)
    reply = train(ask("train", ArrayRecord(model.state_dict())), context)
    assert json.loads(reply.content["site"]["ledger-record"])["delta"] == 1e-5


def test_what_leaves_a_site_is_the_documented_list(site_data, tmp_path):
    """Every key of a real train and evaluate reply is in the README's list; nothing else."""
    _, record, reply = train_once(site_data, tmp_path, run_config())
    content = reply.content
    assert set(content["metrics"]) == {"site-weight"}
    assert set(content.keys()) == {"arrays", "metrics", "site"}
    assert set(content["site"]) == {"site-id", "refused", "ledger-record"}
    documented = {"kind", "site_id", "run_id", "round", "unit", "clips_per_unit", "local_steps", "sample_rate",
                  "noise_multiplier", "max_grad_norm", "delta", "epsilon_round", "epsilon_cumulative", "epsilon_pld",
                  "epsilon_budget", "accountant", "history", "randomness", "refused", "refused_reason",
                  "released_without_dp", "site_chain", "signature"}
    assert set(record) <= documented, set(record) - documented
    text = json.dumps(record) + json.dumps(dict(content["metrics"]))
    for path in site_data.rglob("*"):
        assert path.stem not in text and path.name not in text

    config = run_config()
    model = build_model(RunConfig.from_mapping(config).model_spec(6))
    context = Context(run_id=1, node_id=7, node_config=node_config(site_data, tmp_path), state=RecordDict(),
                      run_config=config)
    evaluated = evaluate_global(ask("evaluate", ArrayRecord(model.state_dict())), context).content
    assert set(evaluated.keys()) == {"metrics"} and len(evaluated["metrics"]) == 0


def test_exact_evaluation_only_by_opt_in_and_recorded_as_released(site_data, tmp_path):
    config = run_config()
    model = build_model(RunConfig.from_mapping(config).model_spec(6))
    context = Context(run_id=1, node_id=7, state=RecordDict(), run_config=config,
                      node_config=node_config(site_data, tmp_path, **{"release-exact-eval": True, "val-fraction": 0.3}))
    train(ask("train", ArrayRecord(model.state_dict())), context)
    evaluated = evaluate_global(ask("evaluate", ArrayRecord(model.state_dict())), context).content
    assert "val-accuracy" in evaluated["metrics"]
    budget = SiteBudget.open_existing(tmp_path)
    assert 0 < budget.released_count() < 18 and budget.epsilon() == float("inf")


def test_the_coordinator_cannot_reshape_or_read_the_audit_canaries_mid_run(site_data, tmp_path):
    """Canaries asked for at round 1 are the site's for the whole run: a later round that asks for
    none, another kind or more keeps the same set (so the coordinator cannot resample membership
    or drop the canaries' accounting), and nothing of the set is in a reply."""
    from privacy.canaries import RunCanaries

    _, _, first = train_once(site_data, tmp_path, run_config(audit_canaries=20), server_round=1)
    made = RunCanaries.load(RunCanaries.path_for(tmp_path, "1"))
    for changed in (dict(audit_canaries=0), dict(audit_canaries=40, audit_canary_kind="input")):
        _, record, reply = train_once(site_data, tmp_path, run_config(**changed), server_round=2)
        kept = RunCanaries.load(RunCanaries.path_for(tmp_path, "1"))
        assert (kept.kind, kept.count) == ("gradient", 20) and np.array_equal(kept.included, made.included)
        assert record["sample_rate"] == json.loads(first.content["site"]["ledger-record"])["sample_rate"]
        sent = json.dumps({k: dict(reply.content[k]) for k in ("metrics", "site")}, default=str)
        assert made.secret not in sent and "canary" not in sent
    charges = SiteBudget.open_existing(tmp_path).charges()
    assert len(charges) == 3 and all(c["units"] == 18 + int(made.included.sum()) for c in charges)


def test_an_absurd_canary_count_is_refused_before_anything_is_written(site_data, tmp_path):
    with pytest.raises(ValueError, match="audit-canaries"):
        train_once(site_data, tmp_path, {**run_config(), "audit-canaries": 10**9})
    assert not (tmp_path / "budget.json").exists() and not (tmp_path / "canaries").exists()
