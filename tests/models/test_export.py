"""Distillation, ONNX export and int8 quantization of a run's global model (models.export)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F

from client.dataset import load_clips
from client.run_config import RunConfig
from client.site import cache_dir, clip_spec, federation_split, site_anonymizer
from models.distill import distillation_loss, student_spec
from models.export import accuracy, adaptive_pool_matrix, clip_metadata, cpu_session, export_onnx, export_run, onnx_logits
from models.predict import META_CLASSES, META_CLIP_FRAMES, META_FRAME_SIZE
from models.registry import ModelSpec, build_model


@pytest.fixture(scope="module")
def exported(tiny_run, transfer_folder, tmp_path_factory):
    """(report, out_dir) of one export of the tiny run (short distillation, few latency runs)."""
    out = tmp_path_factory.mktemp("export")
    report = export_run(tiny_run, out, transfer=transfer_folder, epochs=2, progress=False, latency_repeats=5)
    return report, out


@pytest.fixture(scope="module")
def test_clips(tiny_run):
    """The run's central test clips, loaded the way any site loads clips."""
    config = RunConfig.from_mapping(json.loads((tiny_run / "config.json").read_text())["run-config"])
    _, _, test_items = federation_split(config)
    return load_clips(test_items, clip_spec(config), site_anonymizer(), cache_dir())


@pytest.mark.parametrize("name", ["cnn-transformer", "cnn3d"])
def test_onnx_export_gives_the_torch_models_outputs(name, tmp_path):
    spec = ModelSpec("classify", name, "tiny", 5, 8, 32)
    torch.manual_seed(0)
    model = build_model(spec).eval()
    path = export_onnx(model, spec, tmp_path / "m.onnx", clip_metadata(spec, list("abcde"), 2))
    clips = torch.rand(3, 3, 8, 32, 32)  # batch 3: the batch axis is dynamic
    with torch.no_grad():
        expected = model(clips).numpy()
    got = cpu_session(path).run(None, {"clips": clips.numpy()})[0]
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(meta[META_CLASSES]) == list("abcde")
    assert (meta[META_CLIP_FRAMES], meta[META_FRAME_SIZE]) == ("8", "32")


@pytest.mark.parametrize("n_in,n_out", [(6, 4), (6, 2), (5, 3), (4, 4), (7, 1)])
def test_adaptive_pool_matrix_matches_torch(n_in, n_out):
    x = torch.rand(2, 3, n_in)
    expected = F.adaptive_avg_pool1d(x, n_out)
    got = x @ torch.from_numpy(adaptive_pool_matrix(n_in, n_out)).T
    torch.testing.assert_close(got, expected)


def test_distillation_loss_matches_the_formula():
    torch.manual_seed(0)
    student, teacher = torch.randn(6, 4), torch.randn(6, 4)
    labels = torch.tensor([0, 1, -1, 3, -1, 2])
    T, alpha = 3.0, 0.6
    p = torch.softmax(teacher / T, 1)
    q = torch.softmax(student / T, 1)
    kl = (p * (p.log() - q.log())).sum(1).mean()
    keep = labels >= 0
    ce = -torch.log_softmax(student[keep], 1)[torch.arange(int(keep.sum())), labels[keep]].mean()
    expected = alpha * T**2 * kl + (1 - alpha) * ce
    torch.testing.assert_close(distillation_loss(student, teacher, labels, T, alpha), expected)
    # no label in the batch: the soft term alone
    none = torch.full((6,), -1)
    torch.testing.assert_close(distillation_loss(student, teacher, none, T, alpha), T**2 * kl)


def test_student_defaults_to_the_early_fusion_cnn_and_refuses_unknown_models():
    teacher = ModelSpec("classify", "cnn-transformer", "small", 6, 8, 48)
    assert (student_spec(teacher).name, student_spec(teacher).size) == ("cnn2d", "small")
    assert student_spec(teacher.__class__(**{**teacher.__dict__, "size": "tiny"})).size == "tiny"
    assert (student_spec(teacher, "cnn3d-tiny").name, student_spec(teacher, "cnn3d:tiny").size) == ("cnn3d", "tiny")
    assert (student_spec(teacher, "cnn3d").name, student_spec(teacher, "cnn3d").size) == ("cnn3d", "small")
    assert student_spec(teacher, "base").name == "cnn-transformer"
    with pytest.raises(ValueError, match="student"):
        student_spec(teacher, "resnet-huge")


def test_export_refuses_a_run_without_a_final_model(tiny_run, tmp_path):
    unfinished = tmp_path / "unfinished"
    shutil.copytree(tiny_run, unfinished)
    (unfinished / "model.pt").unlink()
    with pytest.raises(FileNotFoundError, match=str(unfinished / "model.pt")):
        export_run(unfinished, tmp_path / "out", progress=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_run(tmp_path / "nowhere", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_every_artefact_loads_runs_and_carries_the_run_classes(exported, tiny_run):
    report, out = exported
    classes = json.loads((tiny_run / "config.json").read_text())["classes"]
    assert [r["model"] for r in report["models"]] == ["teacher fp32", "teacher int8", "student fp32", "student int8"]
    for row in report["models"]:
        path = out / row["file"]
        assert row["size_bytes"] == path.stat().st_size
        meta = cpu_session(path).get_modelmeta().custom_metadata_map
        assert json.loads(meta[META_CLASSES]) == classes
        assert row["runs_in_onnxruntime"] and row["latency_ms"] > 0
    for row in report["models"]:
        if row["model"].endswith("fp32"):
            assert row["max_abs_diff_vs_torch"] < 1e-4
        else:
            assert row["quantization"].startswith(("static QDQ", "dynamic"))
    assert (out / "report.md").read_text().count("| teacher fp32 |") == 1
    assert json.loads((out / "report.json").read_text())["models"] == json.loads(json.dumps(report["models"]))


def test_reported_accuracy_is_recomputed_on_the_central_test_clips(exported, test_clips):
    report, out = exported
    assert report["test_clips"] == len(test_clips)
    logits = {}
    for row in report["models"]:
        logits[row["model"]] = onnx_logits(cpu_session(out / row["file"]), test_clips.clips)
        assert row["accuracy"] == pytest.approx(accuracy(logits[row["model"]], test_clips.labels))
    for role in ("teacher", "student"):
        fp32, int8 = logits[f"{role} fp32"], logits[f"{role} int8"]
        agree = (fp32.argmax(1) == int8.argmax(1)).mean()
        assert agree >= 0.75, f"{role}: int8 agrees with fp32 on {agree:.0%} of the test clips"
        # int8 noise is small next to the logits' own spread
        assert np.abs(int8 - fp32).mean() < 0.5 * fp32.std() + 1e-3


def test_report_states_no_dp_accounting_without_a_ledger(exported):
    report, out = exported
    assert report["privacy"]["dp_accounting"] is False
    assert all(row["epsilon"].startswith("no DP accounting") for row in report["models"])
    assert "no extra privacy" in report["privacy_note"] and "carries over to the student" in report["privacy_note"]
    assert "no DP accounting" in (out / "report.md").read_text()


def test_report_carries_the_audited_epsilon_of_a_dp_run(tiny_run, tmp_path):
    from models.export import privacy_statement
    from privacy.accounting import filter_epsilon, pld_epsilon
    from privacy.audit import audit_run
    from privacy.ledger import PrivacyLedger, SiteLedger, site_record

    run = tmp_path / "dp-run"
    shutil.copytree(tiny_run, run)
    ledger = PrivacyLedger(run / "ledger.jsonl")
    for sid, steps in (("site-a", 40), ("site-b", 80)):
        history = [(1.1, 0.05, steps)]
        eps = filter_epsilon(history, 1e-5)
        ledger.append(SiteLedger(run / "sites" / sid).append(site_record(
            site_id=sid, run_id="r", round=1, unit="video", clips_per_unit=2, local_steps=steps, sample_rate=0.05,
            noise_multiplier=1.1, max_grad_norm=1.0, delta=1e-5, epsilon_round=eps, epsilon_cumulative=eps,
            epsilon_pld=pld_epsilon(history, 1e-5), epsilon_budget=8.0, history=history, randomness="os-entropy",
        )))
    statement = privacy_statement(run)
    audit = audit_run(run)
    assert statement["dp_accounting"] is True
    assert statement["site_epsilon_max"] == pytest.approx(max(s.epsilon for s in audit.sites.values()))
    assert statement["sites"]["site-a"]["epsilon"] < statement["sites"]["site-b"]["epsilon"]
    assert f"{statement['site_epsilon_max']:.3g}" in statement["summary"]
