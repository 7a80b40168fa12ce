"""Only model updates leave a site: what the ClientApp's handlers return, inspected field by field.

A reply may hold the model's parameters (exactly the global model's tensors), scalar metrics,
and the site's ledger record (privacy accounting only). No frames, no clip tensors, no file or
folder names, no per-example values.
"""

from __future__ import annotations

import json
import time

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict

from client.client_app import evaluate_global, train
from client.run_config import RunConfig
from client.synth import write_synthetic_dataset
from models.registry import build_model
from privacy.face_models import provision_face_models
from privacy.ledger import site_record

CLASSES = "move-right,move-left,move-down,move-up,grow,shrink"
LEDGER_FIELDS = set(site_record(site_id="s", run_id="1", round=1, local_steps=1, sample_rate=0.1, noise_multiplier=1.0,
                                max_grad_norm=1.0, delta=1e-3, epsilon_round=1.0, epsilon_cumulative=1.0,
                                epsilon_budget=8.0, accountant="prv", history=[(1.0, 0.1, 1)]))


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("site")
    data = write_synthetic_dataset(root / "hospital-videos", seed=3, videos_per_class=2)
    models = provision_face_models()
    mp = pytest.MonkeyPatch()
    mp.setenv("FEDVID_HOME", str(root / "home"))
    mp.setenv("FEDVID_FACE_MODELS", str(models["short_range"].parent))
    yield root, data
    mp.undo()


def server_message(arrays: ArrayRecord, kind: str) -> Message:
    metadata = Metadata(run_id=1, message_id=f"m-{kind}", src_node_id=0, dst_node_id=7, reply_to_message_id="",
                        group_id="1", created_at=time.time(), ttl=600, message_type=kind)
    return Message(RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})}), metadata=metadata)


def context(root, data, run_config: dict) -> Context:
    node_config = {"data-dir": str(data), "site-id": "hospital-a", "privacy-dir": str(root / "privacy"),
                   "cache-dir": str(root / "cache"), "epsilon-budget": 50.0, "delta": 0.01, "device": "cpu"}
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config=run_config)


def secrets_of(data) -> list[str]:
    """Strings that must never leave the site: its folder, file names and video stems."""
    files = [p for p in data.rglob("*") if p.is_file()]
    assert files
    return [str(data), data.name] + [p.name for p in files] + [p.stem for p in files]


def assert_no_site_strings(text: str, data) -> None:
    for secret in secrets_of(data):
        assert secret not in text, f"{secret!r} left the site"


@pytest.mark.parametrize("dp", [True, False])
def test_train_reply_holds_parameters_scalar_metrics_and_the_ledger_record_only(site, dp):
    root, data = site
    run_config = RunConfig(model_size="tiny", frame_size=24, local_epochs=1, batch_size=4, delta=0.01,
                           classes=CLASSES, central_eval=False, dp=dp, num_server_rounds=1).to_mapping()
    config = RunConfig.from_mapping(run_config)
    model = build_model(config.model_spec(6))
    sent = model.state_dict()
    msg = server_message(ArrayRecord(sent), "train")
    reply = train(msg, context(root, data, run_config))
    content = reply.content

    assert set(content.keys()) == {"arrays", "metrics", "site"}
    arrays = content["arrays"].to_torch_state_dict()
    assert list(arrays) == list(sent)
    assert all(arrays[k].shape == sent[k].shape and arrays[k].dtype == sent[k].dtype for k in sent)
    assert all(not isinstance(v, list) for v in content["metrics"].values()), "per-example values in metrics"
    assert set(content["metrics"]) <= {"train-loss", "train-accuracy", "train-seconds", "faces-blurred",
                                       "videos-skipped", "num-examples", "site-weight"}
    assert set(content["site"]) == {"site-id", "refused", "ledger-record"}
    record = json.loads(content["site"]["ledger-record"])
    assert set(record) <= LEDGER_FIELDS | {"epsilon", "reason", "kind", "site_id", "run_id", "round", "epsilon_budget"}
    assert_no_site_strings(json.dumps(dict(content["site"])) + json.dumps(dict(content["metrics"])), data)


def test_evaluate_reply_holds_scalar_metrics_only(site):
    root, data = site
    run_config = RunConfig(model_size="tiny", frame_size=24, classes=CLASSES, central_eval=False).to_mapping()
    model = build_model(RunConfig.from_mapping(run_config).model_spec(6))
    msg = server_message(ArrayRecord(model.state_dict()), "evaluate")
    content = evaluate_global(msg, context(root, data, run_config)).content
    assert set(content.keys()) == {"metrics"}
    assert set(content["metrics"]) == {"val-loss", "val-accuracy", "num-examples"}
    assert all(isinstance(v, (int, float)) for v in content["metrics"].values())
    assert_no_site_strings(json.dumps(dict(content["metrics"])), data)
