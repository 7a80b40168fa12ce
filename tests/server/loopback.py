"""A real Flower deployment on 127.0.0.1 for tests: SuperLink, SuperNodes, `flwr run`.

TLS and SuperNode authentication are on, as at real sites. Every process is started in its
own process group and `LoopbackFederation.close` stops them all (tests call it from a
finalizer, so a failing test leaves nothing behind).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from server.credentials import FederationCredentials, make_credentials

APP_DIR = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, log: Path, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode}: {log.read_text()[-3000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"nothing listens on {port} after {seconds} s: {log.read_text()[-3000:]}")


def node_config(values: dict) -> str:
    """Flower's `--node-config` syntax: strings quoted, numbers bare."""
    return " ".join(f'{k}="{v}"' if isinstance(v, (str, Path)) else f"{k}={v}" for k, v in values.items())


@dataclass
class LoopbackFederation:
    """A SuperLink with TLS + `--enable-supernode-auth`, and SuperNodes started on demand."""

    root: Path
    sites: list[str]
    env: dict = field(default_factory=dict)
    creds: FederationCredentials | None = None
    port: int = 0
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self.flwr_home = self.root / "flwr-home"
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        self.logs = self.root / "logs"
        self.logs.mkdir(exist_ok=True)
        self.env = dict(
            os.environ, **self.env, FLWR_HOME=str(self.flwr_home),
            FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1", FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1",
        )

    # -- coordinator ---------------------------------------------------------------------

    def start_superlink(self) -> None:
        self.creds = make_credentials(self.root / "credentials", self.sites + ["intruder"])
        self.port = free_port()
        (self.flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "fedvid"\n\n[superlink.fedvid]\naddress = "127.0.0.1:{self.port}"\n'
            f'root-certificates = "{self.creds.ca_cert}"\n'
        )
        self._start("superlink", [
            "flower-superlink", "--host", "127.0.0.1", "--port", str(self.port),
            "--database", str(self.root / "superlink.db"),
            "--ssl-ca-certfile", str(self.creds.ca_cert), "--ssl-certfile", str(self.creds.server_cert),
            "--ssl-keyfile", str(self.creds.server_key),
            "--enable-supernode-auth", "--disable-runtime-dependency-installation",
        ])
        wait_for_port(self.port, self.processes["superlink"], self.logs / "superlink.log")

    def register(self, site: str) -> None:
        """`flwr supernode register KEY.pub fedvid --name SITE` (the coordinator's step)."""
        key = self.creds.site_keys[site]
        result = self.flwr("supernode", "register", f"{key}.pub", "fedvid", "--name", site)
        if result.returncode != 0:
            raise RuntimeError(f"register {site}: {result.stdout[-2000:]} {result.stderr[-2000:]}")

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(["flwr", *args], env=self.env, capture_output=True, text=True, timeout=timeout,
                              cwd=APP_DIR)

    # -- sites ---------------------------------------------------------------------------

    def start_supernode(self, site: str, config: dict, name: str | None = None) -> subprocess.Popen:
        """One site's SuperNode with its private key, its own runtime port and node config."""
        name = name or site
        return self._start(name, [
            "flower-supernode", "--superlink", f"127.0.0.1:{self.port}",
            "--root-certificates", str(self.creds.ca_cert),
            "--auth-supernode-private-key", str(self.creds.site_keys[site]),
            "--port", str(free_port()), "--node-config", node_config(config),
        ])

    def kill(self, name: str) -> None:
        """SIGKILL a process group: what a power cut at a site looks like to the others."""
        process = self.processes[name]
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    # -- runs ----------------------------------------------------------------------------

    def run(self, run_config: str, run_dir: Path, timeout: float = 600) -> dict:
        """`flwr run . fedvid --stream`; returns the run directory's status.json (or {})."""
        result = self.flwr("run", str(APP_DIR), "fedvid", "--stream", "--run-config",
                           f'{run_config} run-dir="{run_dir}"', timeout=timeout)
        (self.logs / f"flwr-run-{run_dir.name}.log").write_text(result.stdout + result.stderr)
        try:
            return json.loads((run_dir / "status.json").read_text())
        except (OSError, ValueError):
            return {}

    def start_run(self, run_config: str, run_dir: Path) -> subprocess.Popen:
        """`flwr run` in the background (its output in logs/flwr-run-NAME.log)."""
        return self._start(f"flwr-run-{run_dir.name}", [
            "flwr", "run", str(APP_DIR), "fedvid", "--stream", "--run-config", f'{run_config} run-dir="{run_dir}"',
        ])

    def wait_for_log(self, name: str, text: str, seconds: float) -> None:
        """Wait until `text` appears in the log of process `name`."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if text in self.log_text(name):
                return
            time.sleep(0.5)
        raise TimeoutError(f"{text!r} not in {name}'s log after {seconds} s: {self.log_text(name)[-3000:]}")

    def log_text(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def _start(self, name: str, command: list[str]) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "a")
        process = subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True, cwd=APP_DIR if command[0] == "flwr" else self.root)
        log.close()
        self.processes[name] = process
        return process

    def close(self) -> None:
        """Stop every process this federation started (SIGTERM, then SIGKILL)."""
        for process in self.processes.values():
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for process in self.processes.values():
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                process.wait()
