"""`python -m server.credentials`: complete credentials or none, wherever it is run from."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

import server.credentials as credentials
from server.credentials import main, make_credentials


def test_a_relative_output_folder_gets_complete_credentials(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["creds", "--sites", "a", "b.c"]) == 0  # a dot in a site id keeps its `.pub`
    out = tmp_path / "creds"
    assert sorted(p.name for p in out.iterdir()) == ["ca.crt", "ca.key", "keys", "server.key", "server.pem"]
    assert sorted(p.name for p in (out / "keys").iterdir()) == ["a", "a.pub", "b.c", "b.c.pub"]
    verified = subprocess.run(["openssl", "verify", "-CAfile", "ca.crt", "server.pem"], cwd=out,
                              capture_output=True, text=True)
    assert verified.returncode == 0, verified.stderr
    for site in ("a", "b.c"):
        fingerprint = subprocess.run(["ssh-keygen", "-l", "-f", str(out / "keys" / f"{site}.pub")],
                                     capture_output=True, text=True)
        assert fingerprint.returncode == 0 and "ECDSA" in fingerprint.stdout, fingerprint.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["creds"]  # no temporary folder left


def test_a_failure_midway_leaves_no_folder_behind(tmp_path, monkeypatch):
    real_run = credentials._run

    def run_until_the_second_key(*command, cwd):
        if command[0] == "ssh-keygen" and any(p.name.endswith(".pub") for p in (Path(cwd) / "keys").iterdir()):
            raise RuntimeError("ssh-keygen failed: disk full")
        real_run(*command, cwd=cwd)

    monkeypatch.setattr(credentials, "_run", run_until_the_second_key)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RuntimeError, match="disk full"):
        make_credentials(Path("deep/creds"), ["a", "b"])
    assert list((tmp_path / "deep").iterdir()) == []


def test_existing_credentials_are_never_overwritten(tmp_path):
    out = tmp_path / "creds"
    first = make_credentials(out, ["a"])
    ca = first.ca_cert.read_bytes()
    with pytest.raises(FileExistsError):
        make_credentials(out, ["a"])
    assert first.ca_cert.read_bytes() == ca
    assert main([str(out), "--sites", "a"]) == 1
    assert main([str(tmp_path / "other"), "--sites", "a", "--ip", "not-an-ip"]) == 1
    assert not (tmp_path / "other").exists()
