"""A site runs only the app bundles (FABs) it approved, by SHA-256, with code it installed itself.

`flwr run` ships the app as a FAB and every ClientApp process installs and imports it: the
coordinator decides what code touches a site's videos. What Flower 1.42 offers a SuperNode
does not stop that in a self-hosted federation:

- `flower-supernode --trusted-entities` accepts only FABs that carry Ed25519 signatures *and*
  that the SuperLink marks `valid_license`; an open-source SuperLink marks only FABs it
  fetched from Flower Hub, never the FAB of `flwr run .`.
- Nothing else checks a FAB. The SuperNode stores whatever bytes the SuperLink sends under
  whatever hash the SuperLink names (`GetRun` -> `Run.fab_hash`, `GetFab`), and
  `flwr-clientapp` installs them (`install_from_fab`) and imports the app from them.

So the site starts the SuperNode with `--isolation process` and, itself, the process that
launches ClientApps:

    flower-supernode --isolation process --port 9094 ... \\
        --node-config '... privacy-dir="/var/fedvid/privacy" allowed-fab-hashes="SHA256[,SHA256]"'
    fedvid-superexec --runtime-api-address 127.0.0.1:9094 --insecure

`fedvid-superexec` (or `python -m client.app_pin superexec ...`) is Flower's SuperExec that
launches ClientApp tasks only (no AgentApp, connector or model tasks, whatever the run
claims to be), each as Flower's ClientApp process with one step added: after the FAB's bytes
reach the process and before anything is installed or imported, their SHA-256 must be in the
node config's `allowed-fab-hashes` and match what the run claims. Otherwise nothing of the
FAB runs, the coordinator gets an error reply, and the site logs the refusal and appends it
to PRIVACY_DIR/refused-apps.jsonl. A node config without `allowed-fab-hashes` runs nothing.

The hash of an app the site approved, exactly as `flwr run` will ship it:

    python -m client.app_pin hash PATH     # PATH: the app's folder, or a .fab from `flwr build`

(the same as `sha256sum` of the `.fab` that `flwr build --app PATH` writes: Flower builds FABs
deterministically, with sorted files and fixed timestamps).

This module imports only the standard library and flwr: whatever of the site's own packages
the ClientApp process has imported would shadow the FAB's modules of the same name.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib
import json
import logging
import os
import re
import shlex
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

ALLOWED_KEY = "allowed-fab-hashes"
REFUSED_FILE = "refused-apps.jsonl"
_SHA256 = re.compile(r"[0-9a-f]{64}")


class AppRefused(Exception):
    """The FAB of a run is not one this site approved; none of its code was run."""


def fab_hash(fab: bytes) -> str:
    """SHA-256 (hex) of a FAB's bytes: Flower's `Run.fab_hash`, and the name `flwr build` gives it."""
    return hashlib.sha256(fab).hexdigest()


def approved_fab_hash(path: Path) -> str:
    """The hash of a `.fab` file, or of the FAB that `flwr run`/`flwr build` make of an app folder."""
    path = Path(path).expanduser()
    if path.is_dir():
        from flwr.cli.build import build_fab_from_disk

        return fab_hash(build_fab_from_disk(path))
    return fab_hash(path.read_bytes())


def allowed_fab_hashes(node_config: Mapping) -> frozenset[str]:
    """The node config's `allowed-fab-hashes`: comma-separated SHA-256 hex digests."""
    raw = str(node_config.get(ALLOWED_KEY, "")).strip()
    if not raw:
        raise AppRefused(f"the node config sets no {ALLOWED_KEY}: this site runs no app")
    hashes = frozenset(h.strip().lower() for h in raw.split(",") if h.strip())
    if bad := sorted(h for h in hashes if not _SHA256.fullmatch(h)):
        raise AppRefused(f"node config {ALLOWED_KEY}: not SHA-256 hex digests: {bad}")
    return hashes


def check_app(fab: bytes, claimed_hash: str, run_hash: str, fab_id: str, fab_version: str,
              node_config: Mapping) -> str:
    """Return the FAB's hash if this site may run it; raise `AppRefused` (with the reason) if not.

    Besides the allow-list: the hash the SuperLink names for the FAB and the run's `fab_id`
    and version must be this FAB's own, because Flower loads the app from the install folder
    that those name, not from the bytes it just checked.
    """
    digest = fab_hash(fab)
    allowed = allowed_fab_hashes(node_config)
    if digest not in allowed:
        raise AppRefused(f"FAB sha256 {digest} is not in this site's {ALLOWED_KEY}")
    if claimed_hash != digest or run_hash != digest:
        raise AppRefused(f"the SuperLink names FAB {claimed_hash!r} (run: {run_hash!r}) for bytes of sha256 {digest}")
    from flwr.common.config import get_fab_config, get_metadata_from_config

    own_id, own_version = get_metadata_from_config(get_fab_config(fab))
    if (fab_id, fab_version) != (own_id, own_version):
        raise AppRefused(f"the run names app {fab_id} {fab_version}; the FAB is {own_id} {own_version}")
    return digest


def refusals_file(node_config: Mapping, node_id: int = 0) -> Path:
    """PRIVACY_DIR/refused-apps.jsonl. PRIVACY_DIR: node config `privacy-dir`, else where a
    deployed site keeps its budget by default ($FEDVID_HOME/privacy/SITE, as client.site says;
    not imported: see the module docstring)."""
    folder = node_config.get("privacy-dir")
    if not folder:
        home = Path(os.environ.get("FEDVID_HOME", Path.home() / ".fedvid")).expanduser()
        folder = home / "privacy" / str(node_config.get("site-id") or f"node-{node_id}")
    return Path(str(folder)).expanduser() / REFUSED_FILE


def record_refusal(node_config: Mapping, record: dict, node_id: int = 0) -> Path:
    """Append one JSON line (fsynced: an append, so not privacy.durable's replace-whole-file)."""
    path = refusals_file(node_config, node_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, sort_keys=True, default=str) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


def read_refusals(node_config: Mapping, node_id: int = 0) -> list[dict]:
    """Every refusal recorded at this site, oldest first."""
    path = refusals_file(node_config, node_id)
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


# -- the ClientApp process ---------------------------------------------------------------


def _forget_own_packages() -> None:
    """Drop this package from sys.modules, so `import client...` loads the FAB's code."""
    top = (__spec__.name if __spec__ else __name__).split(".")[0]  # __main__ under `python -m`
    for name in [m for m in sys.modules if m == top or m.startswith(f"{top}.")]:
        del sys.modules[name]


def guard_clientapp_runtime(runtime) -> None:
    """Make Flower's ClientApp process (`runtime`: flwr.supernode.runtime.run_clientapp) check
    the FAB before it installs it. `run_clientapp` calls `pull_task_input` then
    `install_from_fab(fab.content)`; a refusal raised there is answered as a ClientApp error."""
    original_pull, original_install = runtime.pull_task_input, runtime.install_from_fab
    task: dict = {}

    def pull_task_input(client):
        message, context, run, fab = original_pull(client)
        task.update(context=context, run=run, fab=fab)
        return message, context, run, fab

    def install_from_fab(content, *args, **kwargs):
        context, run, fab = task["context"], task["run"], task["fab"]
        node_config = dict(context.node_config)
        try:
            check_app(content, fab.hash_str, run.fab_hash, run.fab_id, run.fab_version, node_config)
        except Exception as err:  # a malformed FAB is refused like an unknown one
            reason = str(err) if isinstance(err, AppRefused) else f"unreadable FAB: {err!r}"
            record = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                      "run_id": run.run_id, "fab_hash": fab_hash(content), "claimed_fab_hash": run.fab_hash,
                      "fab_id": run.fab_id, "fab_version": run.fab_version,
                      "site_id": node_config.get("site-id", ""), "reason": reason}
            from flwr.supercore import log

            log(logging.ERROR, "fedvid: refused app %s %s of run %s: %s",
                run.fab_id, run.fab_version, run.run_id, reason)
            path = record_refusal(node_config, record, context.node_id)  # if this fails, still refused
            log(logging.ERROR, "fedvid: refusal recorded in %s", path)
            raise AppRefused(f"site refused the app: {reason}") from None
        _forget_own_packages()
        return original_install(content, *args, **kwargs)

    runtime.pull_task_input = pull_task_input
    runtime.install_from_fab = install_from_fab


def clientapp_main(argv: Sequence[str] | None = None) -> None:
    """Flower's `flwr-clientapp` (same options), which runs only FABs the node config allows."""
    runtime = importlib.import_module("flwr.supernode.runtime.run_clientapp")
    for name in ("pull_task_input", "install_from_fab"):
        if not callable(getattr(runtime, name, None)):  # fail closed if flwr changed shape
            sys.exit(f"fedvid-clientapp: flwr {runtime.__name__}.{name} is missing; refusing to run any app")
    guard_clientapp_runtime(runtime)
    sys.argv = ["flwr-clientapp", *(sys.argv[1:] if argv is None else argv)]
    importlib.import_module("flwr.supernode.cli.flwr_clientapp").flwr_clientapp()


# -- the site's SuperExec ----------------------------------------------------------------


def _clientapp_launcher(folder: Path) -> str:
    """An executable that starts `clientapp_main` with this interpreter: the SuperExec runs a
    command name, and a name looked up on PATH could be anyone's."""
    launcher = folder / "fedvid-clientapp"
    launcher.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -I -m client.app_pin clientapp \"$@\"\n")
    launcher.chmod(0o700)
    return str(launcher)


def superexec_main(argv: Sequence[str] | None = None) -> None:
    """`fedvid-superexec`: Flower's `flower-superexec` (same options, subprocess executor only)
    that launches ClientApp tasks only, each through `clientapp_main`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a == "--executor" or a.startswith("--executor") for a in argv):
        sys.exit("fedvid-superexec: only Flower's subprocess executor is supported (no --executor options)")
    from flwr.supercore import constant
    from flwr.supercore.constant import TaskType
    from flwr.supercore.superexec.plugin.base_exec_plugin import AutoExecPlugin

    folder = Path(tempfile.mkdtemp(prefix="fedvid-superexec-"))
    try:
        constant.TASK_TYPE_TO_COMMAND[TaskType.CLIENT_APP] = _clientapp_launcher(folder)
        # AcquireTask asks the SuperNode for these types only; an AgentApp run stays pending.
        AutoExecPlugin.supported_task_types = frozenset({TaskType.CLIENT_APP})
        sys.argv = ["flower-superexec", *argv]
        importlib.import_module("flwr.supercore.cli.flower_superexec").flower_superexec()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m client.app_pin hash PATH | superexec ... | clientapp ...`"""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["superexec"]:
        superexec_main(argv[1:])
        return 0
    if argv[:1] == ["clientapp"]:
        clientapp_main(argv[1:])
        return 0
    parser = argparse.ArgumentParser(prog="python -m client.app_pin", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    hashing = commands.add_parser("hash", help=f"print the SHA-256 to put in {ALLOWED_KEY}")
    hashing.add_argument("paths", nargs="+", type=Path, help="an app folder or a .fab file")
    commands.add_parser("superexec", help="the site's SuperExec (flower-superexec's options)")
    commands.add_parser("clientapp", help="one ClientApp task (flwr-clientapp's options)")
    args = parser.parse_args(argv)
    for path in args.paths:
        print(f"{approved_fab_hash(path)}  {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
