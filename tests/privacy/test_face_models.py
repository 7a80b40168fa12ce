"""Face model provisioning: pinned hashes, idempotence, atomic verified installs, and clear
errors for missing or corrupt files."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

import privacy.face_models as models_module
from privacy.face_models import (FULL_RANGE, MODEL_SHA256, SHORT_RANGE, FaceModelError,
                                 default_model_dir, provision_face_models, sha256_file,
                                 verified_face_models)


def fake_wheel(tmp_path: Path, models: dict[str, Path], corrupt: str | None = None) -> Path:
    """A zip laid out like the mediapipe wheel, holding the given models."""
    wheel = tmp_path / "wheel" / "mediapipe-0.10.21-cp311-cp311-manylinux_2_28_x86_64.whl"
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as archive:
        for path in models.values():
            data = path.read_bytes()
            if path.name == corrupt:
                data = data[:-10]
            archive.writestr(models_module.WHEEL_MEMBER_DIR + path.name, data)
    return wheel


def no_download(*args, **kwargs):
    raise AssertionError("provisioning downloaded although the models were present")


def test_provisioned_models_match_the_pinned_hashes(face_models):
    assert set(face_models) == {"short_range", "full_range"}
    for path in face_models.values():
        assert sha256_file(path) == MODEL_SHA256[path.name]


def test_provisioning_again_downloads_nothing(face_models, monkeypatch):
    monkeypatch.setattr(models_module, "_download_wheel", no_download)
    monkeypatch.setattr(models_module.subprocess, "run", no_download)
    again = provision_face_models(face_models["short_range"].parent)
    assert again == face_models


def test_provisioning_installs_verified_models_from_the_wheel(tmp_path, face_models, monkeypatch):
    wheel = fake_wheel(tmp_path, face_models)
    monkeypatch.setattr(models_module, "_download_wheel", lambda dest: wheel)
    target = tmp_path / "models"
    paths = provision_face_models(target)
    assert verified_face_models(target) == paths
    assert sorted(p.name for p in target.iterdir()) == sorted([SHORT_RANGE, FULL_RANGE])


def test_provisioning_rejects_a_wheel_with_a_corrupt_model(tmp_path, face_models, monkeypatch):
    wheel = fake_wheel(tmp_path, face_models, corrupt=SHORT_RANGE)
    monkeypatch.setattr(models_module, "_download_wheel", lambda dest: wheel)
    target = tmp_path / "models"
    with pytest.raises(FaceModelError, match="SHA-256"):
        provision_face_models(target)
    assert not (target / SHORT_RANGE).exists()
    assert not [p for p in target.iterdir() if p.suffix == ".part"]


def test_missing_model_error_names_the_file_and_setup(tmp_path):
    with pytest.raises(FaceModelError) as error:
        verified_face_models(tmp_path)
    assert SHORT_RANGE in str(error.value) and "fedvid setup" in str(error.value)


def test_truncated_model_is_reported_corrupt(tmp_path, face_models):
    for path in face_models.values():
        (tmp_path / path.name).write_bytes(path.read_bytes())
    full = tmp_path / FULL_RANGE
    full.write_bytes(full.read_bytes()[:1000])
    with pytest.raises(FaceModelError, match=f"{FULL_RANGE}.*corrupt.*fedvid setup"):
        verified_face_models(tmp_path)


def test_own_model_files_skip_the_hash_check_but_must_exist(tmp_path, face_models):
    own = tmp_path / "my_face_model.tflite"
    own.write_bytes(b"not checked here")
    paths = verified_face_models(face_models["short_range"].parent, short_range=own)
    assert paths["short_range"] == own
    with pytest.raises(FaceModelError, match="nowhere.tflite"):
        verified_face_models(tmp_path, full_range=tmp_path / "nowhere.tflite", short_range=own)


def test_default_model_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("FEDVID_FACE_MODELS", raising=False)
    monkeypatch.setenv("FEDVID_HOME", str(tmp_path / "home"))
    assert default_model_dir() == tmp_path / "home" / "face-models"
    monkeypatch.setenv("FEDVID_FACE_MODELS", str(tmp_path / "models"))
    assert default_model_dir() == tmp_path / "models"
    monkeypatch.delenv("FEDVID_FACE_MODELS")
    monkeypatch.delenv("FEDVID_HOME")
    assert default_model_dir() == Path.home() / ".fedvid" / "face-models"
