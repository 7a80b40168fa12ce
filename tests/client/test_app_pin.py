"""`client.app_pin`: a site runs only FABs whose SHA-256 its node config allows.

The end-to-end check with real processes is tests/server/test_site_pinning.py."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

import client.app_pin as app_pin
from client.app_pin import ALLOWED_KEY, AppRefused, approved_fab_hash, check_app, read_refusals

PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "pinunit"
version = "2.0.0"
description = "unit-test app"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "fedvidtest"

[tool.flwr.app.components]
serverapp = "pinunit_server:app"
clientapp = "pinunit_client:app"

[tool.flwr.app.config]
variant = "{variant}"
"""


def write_app(folder: Path, variant: str = "a") -> Path:
    folder.mkdir(parents=True)
    (folder / "pyproject.toml").write_text(PYPROJECT.format(variant=variant))
    (folder / "pinunit_server.py").write_text("from flwr.serverapp import ServerApp\napp = ServerApp()\n")
    (folder / "pinunit_client.py").write_text("from flwr.clientapp import ClientApp\napp = ClientApp()\n")
    return folder


@pytest.fixture
def fab(tmp_path) -> bytes:
    from flwr.cli.build import build_fab_from_disk

    return build_fab_from_disk(write_app(tmp_path / "pinunit"))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_an_app_folder_hashes_to_the_fab_that_flwr_build_writes(tmp_path):
    app = write_app(tmp_path / "pinunit")
    built = subprocess.run(["flwr", "build", "--app", str(app)], cwd=tmp_path, capture_output=True, text=True)
    assert built.returncode == 0, built.stdout + built.stderr
    (fab_file,) = tmp_path.glob("*.fab")
    assert approved_fab_hash(app) == approved_fab_hash(fab_file) == sha(fab_file.read_bytes())
    assert fab_file.name.endswith(f".{sha(fab_file.read_bytes())[:8]}.fab")
    assert approved_fab_hash(write_app(tmp_path / "other" / "pinunit", variant="b")) != approved_fab_hash(app)


def test_an_allowed_fab_passes_and_everything_else_is_refused_with_its_reason(fab):
    digest, other = sha(fab), "0" * 64
    ok = {ALLOWED_KEY: f"{other}, {digest.upper()}"}
    assert check_app(fab, digest, digest, "fedvidtest/pinunit", "2.0.0", ok) == digest
    refusals = {
        "not in this site's": (fab, digest, digest, "fedvidtest/pinunit", "2.0.0", {ALLOWED_KEY: other}),
        "sets no allowed-fab-hashes": (fab, digest, digest, "fedvidtest/pinunit", "2.0.0", {}),
        "not SHA-256": (fab, digest, digest, "fedvidtest/pinunit", "2.0.0", {ALLOWED_KEY: f"{digest},abc"}),
        # The SuperLink names another hash than the bytes': Flower would load another folder.
        "the SuperLink names FAB": (fab, other, digest, "fedvidtest/pinunit", "2.0.0", ok),
        "(run: ": (fab, digest, other, "fedvidtest/pinunit", "2.0.0", ok),
        "the run names app": (fab, digest, digest, "fedvidtest/other", "2.0.0", ok),
        "the FAB is fedvidtest/pinunit 2.0.0": (fab, digest, digest, "fedvidtest/pinunit", "9.9.9", ok),
    }
    for reason, args in refusals.items():
        with pytest.raises(AppRefused, match=reason.replace("(", r"\(")):
            check_app(*args)


def fake_runtime(fab: bytes, node_config: dict, claimed: str | None = None):
    """What `run_clientapp` sees: `pull_task_input` then `install_from_fab(fab.content)`."""
    run = SimpleNamespace(run_id=7, fab_id="fedvidtest/pinunit", fab_version="2.0.0", fab_hash=claimed or sha(fab))
    pulled = (SimpleNamespace(), SimpleNamespace(node_config=node_config, node_id=42), run,
              SimpleNamespace(hash_str=claimed or sha(fab), content=fab))
    installed = []
    return SimpleNamespace(pull_task_input=lambda client: pulled,
                           install_from_fab=lambda content, **kw: installed.append(content) or Path("/x")), installed


def test_the_clientapp_process_installs_an_allowed_fab_after_forgetting_the_sites_own_modules(fab, tmp_path, monkeypatch):
    forgotten = []
    monkeypatch.setattr(app_pin, "_forget_own_packages", lambda: forgotten.append(True))
    config = {ALLOWED_KEY: sha(fab), "privacy-dir": str(tmp_path)}
    runtime, installed = fake_runtime(fab, config)
    app_pin.guard_clientapp_runtime(runtime)
    _, _, _, pulled = runtime.pull_task_input(None)
    runtime.install_from_fab(pulled.content, skip_prompt=True)
    assert installed == [fab] and forgotten == [True]
    assert read_refusals(config) == []


def test_a_refused_fab_is_never_installed_and_is_recorded_at_the_site(fab, tmp_path, monkeypatch):
    monkeypatch.setattr(app_pin, "_forget_own_packages", lambda: pytest.fail("must not prepare to import"))
    config = {ALLOWED_KEY: "1" * 64, "privacy-dir": str(tmp_path / "privacy"), "site-id": "hospital-a"}
    for claimed in (None, "2" * 64):
        runtime, installed = fake_runtime(fab, config, claimed)
        app_pin.guard_clientapp_runtime(runtime)
        _, _, _, pulled = runtime.pull_task_input(None)
        with pytest.raises(AppRefused, match="site refused the app"):
            runtime.install_from_fab(pulled.content, skip_prompt=True)
        assert installed == []
    records = read_refusals(config)
    assert (tmp_path / "privacy" / "refused-apps.jsonl").exists()
    assert [(r["run_id"], r["fab_hash"], r["claimed_fab_hash"], r["fab_id"], r["fab_version"], r["site_id"])
            for r in records] == [(7, sha(fab), sha(fab), "fedvidtest/pinunit", "2.0.0", "hospital-a"),
                                  (7, sha(fab), "2" * 64, "fedvidtest/pinunit", "2.0.0", "hospital-a")]
    assert all(r["time"] and "allowed-fab-hashes" in r["reason"] for r in records)


def test_without_a_privacy_dir_refusals_go_where_the_site_keeps_its_budget(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDVID_HOME", str(tmp_path))
    assert app_pin.refusals_file({"site-id": "hospital-a"}) == tmp_path / "privacy" / "hospital-a" / "refused-apps.jsonl"
    assert app_pin.refusals_file({}, node_id=42) == tmp_path / "privacy" / "node-42" / "refused-apps.jsonl"
    assert app_pin.refusals_file({"privacy-dir": "/srv/p"}) == Path("/srv/p/refused-apps.jsonl")


def test_a_malformed_fab_is_refused_not_crashed_on(tmp_path, monkeypatch):
    monkeypatch.setattr(app_pin, "_forget_own_packages", lambda: pytest.fail("must not prepare to import"))
    junk = b"not a zip"
    config = {ALLOWED_KEY: sha(junk), "privacy-dir": str(tmp_path)}
    runtime, installed = fake_runtime(junk, config)
    app_pin.guard_clientapp_runtime(runtime)
    with pytest.raises(AppRefused, match="unreadable FAB"):
        runtime.install_from_fab(runtime.pull_task_input(None)[3].content)
    assert installed == [] and len(read_refusals(config)) == 1


def test_the_site_superexec_refuses_other_executors():
    for argv in (["--executor", "kubernetes"], ["--executor-config=x.yaml"]):
        with pytest.raises(SystemExit, match="subprocess executor"):
            app_pin.superexec_main(["--runtime-api-address", "127.0.0.1:9094", "--insecure", *argv])


def test_hash_command_prints_what_to_put_in_the_node_config(fab, tmp_path, capsys):
    (tmp_path / "app.fab").write_bytes(fab)
    assert app_pin.main(["hash", str(tmp_path / "app.fab")]) == 0
    assert capsys.readouterr().out.split()[0] == sha(fab)
