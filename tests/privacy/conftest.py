"""Shared fixtures for the anonymization tests: the face models (provisioned once, in the
default model directory, which CI fills with `fedvid setup`), real face images."""

from __future__ import annotations

import pytest

from privacy.anonymize import AnonymizerSettings, FaceAnonymizer
from privacy.face_models import provision_face_models
from simulations.bench_anonymize import FaceSource, face_sources


@pytest.fixture(scope="session")
def face_models():
    """{"short_range": path, "full_range": path}, provisioned once per machine."""
    return provision_face_models()


@pytest.fixture(scope="session")
def anon_settings(face_models):
    """Default settings pointing at the provisioned models."""
    return AnonymizerSettings(model_dir=face_models["short_range"].parent)


@pytest.fixture(scope="session")
def face_anonymizer(anon_settings):
    """One FaceAnonymizer with default settings, shared by the session."""
    with FaceAnonymizer(anon_settings) as shared:
        yield shared


@pytest.fixture(scope="session")
def real_faces() -> list[FaceSource]:
    """Real faces shipped in installed packages (astronaut, Grace Hopper, cameraman, LFW)."""
    return face_sources()
