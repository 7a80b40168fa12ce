"""A real Flower deployment on loopback for tests: SuperLink, SuperNodes, `flwr run`.

Started as at real sites: TLS and SuperNode authentication on, and the SuperLink started with
`python -m server.superlink`, so its Control and Runtime APIs listen on 127.0.0.1 only while
SuperNodes reach the Fleet API on another address, 127.0.0.2 (Linux routes all of 127/8 to
the loopback interface), where nothing else is served. A site can run its ClientApps
through `client.app_pin` (`isolation="process"`). Every process is started in its own
process group and `LoopbackFederation.close` stops them all (tests call it from a finalizer,
so a failing test leaves nothing behind).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from server.credentials import FederationCredentials, make_credentials

APP_DIR = Path(__file__).resolve().parents[2]
CONTROL_HOST = "127.0.0.1"  # the coordinator's own `flwr` commands and ServerApp processes
FLEET_HOST = "127.0.0.2"    # what the sites (and anyone else on the network) can reach


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, log: Path, seconds: float = 60,
                  host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode}: {log.read_text()[-3000:]}")
        with socket.socket() as s:
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"nothing listens on {host}:{port} after {seconds} s: {log.read_text()[-3000:]}")


def node_config(values: dict) -> str:
    """Flower's `--node-config` syntax: strings quoted, numbers bare."""
    return " ".join(f'{k}="{v}"' if isinstance(v, (str, Path)) else f"{k}={v}" for k, v in values.items())


@dataclass
class LoopbackFederation:
    """A SuperLink with TLS + `--enable-supernode-auth`, and SuperNodes started on demand.

    `port` is the Control API's (on 127.0.0.1, connection "fedvid" in config.toml),
    `fleet_port` the Fleet API's (on 127.0.0.2; connection "outside" points `flwr` there, as
    a stranger on the network would)."""

    root: Path
    sites: list[str]
    env: dict = field(default_factory=dict)
    creds: FederationCredentials | None = None
    port: int = 0
    fleet_port: int = 0
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

    def start_superlink(self, gated: bool = True) -> None:
        """`python -m server.superlink`: every API on 127.0.0.1:port, the Fleet API alone on
        127.0.0.2:fleet_port. `gated=False`: plain `flower-superlink` as the README once said
        (`--host 0.0.0.0`, here 127.0.0.2 so nothing leaves the machine): every API wherever
        the sites connect, to show what the gate changes."""
        self.creds = make_credentials(self.root / "credentials", self.sites + ["intruder"], ips=(FLEET_HOST,))
        self.port, self.fleet_port = free_port(), free_port()
        control_host = CONTROL_HOST if gated else FLEET_HOST
        if not gated:
            self.port = self.fleet_port
        (self.flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "fedvid"\n\n'
            f'[superlink.fedvid]\naddress = "{control_host}:{self.port}"\nroot-certificates = "{self.creds.ca_cert}"\n\n'
            f'[superlink.outside]\naddress = "{FLEET_HOST}:{self.fleet_port}"\nroot-certificates = "{self.creds.ca_cert}"\n'
        )
        common = [
            "--database", str(self.root / "superlink.db"),
            "--ssl-ca-certfile", str(self.creds.ca_cert), "--ssl-certfile", str(self.creds.server_cert),
            "--ssl-keyfile", str(self.creds.server_key),
            "--enable-supernode-auth", "--disable-runtime-dependency-installation",
        ]
        if gated:
            command = [sys.executable, "-m", "server.superlink", "--fleet-address", f"{FLEET_HOST}:{self.fleet_port}",
                       "--host", CONTROL_HOST, "--port", str(self.port), *common]
        else:
            command = ["flower-superlink", "--host", FLEET_HOST, "--port", str(self.port), *common]
        self._start("superlink", command)
        log = self.logs / "superlink.log"
        wait_for_port(self.port, self.processes["superlink"], log, host=control_host)
        wait_for_port(self.fleet_port, self.processes["superlink"], log, host=FLEET_HOST)

    def register(self, site: str, connection: str = "fedvid") -> None:
        """`flwr supernode register KEY.pub fedvid --name SITE` (the coordinator's step)."""
        result = self.try_register(site, connection)
        if result.returncode != 0:
            raise RuntimeError(f"register {site}: {result.stdout[-2000:]} {result.stderr[-2000:]}")

    def try_register(self, site: str, connection: str) -> subprocess.CompletedProcess:
        """`flwr supernode register` of `site`'s public key through `connection`."""
        key = self.creds.site_keys[site]
        return self.flwr("supernode", "register", f"{key}.pub", connection, "--name", site)

    def nodes(self) -> dict[str, str]:
        """Node id -> status of every SuperNode the SuperLink knows (`flwr supernode list`)."""
        listed = self.flwr("supernode", "list", "fedvid", "--format", "json")
        if listed.returncode != 0:
            raise RuntimeError(f"supernode list: {listed.stdout[-2000:]} {listed.stderr[-2000:]}")
        return {n["node-id"]: n["status"] for n in json.loads(listed.stdout).get("nodes", [])}

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(["flwr", *args], env=self.env, capture_output=True, text=True, timeout=timeout,
                              cwd=APP_DIR)

    # -- sites ---------------------------------------------------------------------------

    def start_supernode(self, site: str, config: dict, name: str | None = None,
                        isolation: str = "subprocess") -> subprocess.Popen:
        """One site's SuperNode with its private key, its own runtime port and node config.

        `isolation="process"`: the site also starts `python -m client.app_pin superexec`
        (process `NAME-superexec`), which runs only the FABs its node config allows."""
        name = name or site
        runtime_port = free_port()
        node = self._start(name, [
            "flower-supernode", "--superlink", f"{FLEET_HOST}:{self.fleet_port}",
            "--root-certificates", str(self.creds.ca_cert),
            "--auth-supernode-private-key", str(self.creds.site_keys[site]),
            "--port", str(runtime_port), "--node-config", node_config(config), "--isolation", isolation,
        ])
        if isolation == "process":
            wait_for_port(runtime_port, node, self.logs / f"{name}.log")
            self._start(f"{name}-superexec", [
                sys.executable, "-m", "client.app_pin", "superexec",
                "--runtime-api-address", f"127.0.0.1:{runtime_port}", "--insecure",
            ])
        return node

    def kill(self, name: str) -> None:
        """SIGKILL a process group: what a power cut at a site looks like to the others."""
        for key in (name, f"{name}-superexec"):
            process = self.processes.get(key)
            if process is not None and process.poll() is None:
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


# -- a probe app -------------------------------------------------------------------------

PROBE_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "pinprobe"
version = "1.0.0"
description = "fedvid test app: which ClientApp code runs at a site"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "fedvidtest"

[tool.flwr.app.components]
serverapp = "probe_server:app"
clientapp = "client.probe_app:app"

[tool.flwr.app.config]
out = ""
nodes = 1
timeout = 60
"""

PROBE_SERVER = '''"""Send one train message to `nodes` nodes; write their replies (or errors) to `out`."""

import json
import time
from pathlib import Path

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context) -> None:
    want = int(context.run_config["nodes"])
    deadline = time.monotonic() + 60
    while len(nodes := sorted(grid.get_node_ids())) < want and time.monotonic() < deadline:
        time.sleep(0.5)
    messages = [Message(RecordDict({"config": ConfigRecord({"x": 1})}), dst_node_id=n, message_type="train")
                for n in nodes]
    replies = {}
    for reply in grid.send_and_receive(messages, timeout=float(context.run_config["timeout"])):
        node = str(reply.metadata.src_node_id)
        replies[node] = {"error": reply.error.reason} if reply.has_error() else dict(reply.content["metrics"])
    Path(str(context.run_config["out"])).write_text(json.dumps({"nodes": [str(n) for n in nodes], "replies": replies}))
'''

# In a package named `client`, like fedvid's: the site's own `client` package must not shadow it.
PROBE_CLIENT = '''"""Record that this code ran (and from where) the moment it is imported; answer train."""

import os
from pathlib import Path

from flwr.app import Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

VARIANT = {variant!r}
Path({markers!r}, f"{{VARIANT}}-{{os.getpid()}}").write_text(__file__)

app = ClientApp()


@app.train()
def train(msg, context):
    return Message(RecordDict({{"metrics": MetricRecord({{"trained": 1.0}})}}), reply_to=msg)
'''


def write_probe_app(folder: Path, variant: str, markers: Path) -> Path:
    """A minimal Flower app in `folder`: its ClientApp leaves a file `VARIANT-PID` in `markers`
    when its code is imported. Two variants differ in one line, as an edited bundle would."""
    folder, markers = Path(folder), Path(markers)
    (folder / "client").mkdir(parents=True, exist_ok=True)
    markers.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(PROBE_PYPROJECT)
    (folder / "probe_server.py").write_text(PROBE_SERVER)
    (folder / "client" / "__init__.py").write_text("")
    (folder / "client" / "probe_app.py").write_text(PROBE_CLIENT.format(variant=variant, markers=str(markers)))
    return folder
