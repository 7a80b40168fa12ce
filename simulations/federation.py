"""`fedvid simulate`: a whole federation on one machine, through Flower's simulation engine.

Drives `flwr run` against a SuperLink of its own (simulation mode, loopback, a free port, a
private FLWR_HOME), so that nothing leaks between runs, the app's dependencies are never
re-installed (offline machines), and the command fails loudly when the run fails: `flwr run`
itself exits 0 even then, so success is read from the run directory's status.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

from client.run_config import RunConfig

APP_DIR = Path(__file__).resolve().parents[1]


def app_defaults(app_dir: Path = APP_DIR) -> dict:
    """The run config declared in the app's pyproject.toml, its tables flattened as Flower does."""
    from flwr.common.config import flatten_dict

    with open(app_dir / "pyproject.toml", "rb") as f:
        return flatten_dict(tomllib.load(f)["tool"]["flwr"]["app"]["config"])


def resolve_run_config(overrides: str, app_dir: Path = APP_DIR) -> RunConfig:
    """pyproject defaults + `--run-config` overrides, parsed as Flower parses them, validated."""
    from flwr.common.config import parse_config_args

    values = dict(app_defaults(app_dir))
    if overrides.strip():
        values.update(parse_config_args([overrides]))
    return RunConfig.from_mapping(values)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def simulated_site_config(config: RunConfig, node_config: str = "") -> dict:
    """The node config every simulated site gets: the user's `--node-config`, and, since the
    user plays every site, permission to train without DP when they ask for `dp=false`."""
    from flwr.common.config import parse_config_args

    from client.node_config import NodeConfig

    values = dict(parse_config_args([node_config])) if node_config.strip() else {}
    if not config.dp:
        values.setdefault("allow-non-private", True)
    NodeConfig.from_mapping({**values, "partition-id": 0, "num-partitions": 1})  # refused here, not at every site
    return values


def _flower_env(flwr_home: Path, site_config: dict) -> dict:
    from client.node_config import SIMULATED_SITE_CONFIG

    env = dict(os.environ)
    env[SIMULATED_SITE_CONFIG] = json.dumps(site_config)
    env.update(
        FLWR_HOME=str(flwr_home),
        # Offline machines: never let the SuperLink `uv sync` the app into a fresh env.
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
    )
    return env


def _start_superlink(flwr_home: Path, env: dict) -> tuple[subprocess.Popen, int]:
    """A simulation-mode SuperLink on a free loopback port, and a connection named `fedvid`."""
    port = _free_port()
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "fedvid"\n\n[superlink.fedvid]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    log = open(flwr_home / "superlink.log", "w")
    process = subprocess.Popen(
        ["flower-superlink", "--insecure", "--simulation", "--host", "127.0.0.1", "--port", str(port),
         "--database", str(flwr_home / "state.db"), "--disable-runtime-dependency-installation"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"flower-superlink exited with code {process.returncode}; see {flwr_home / 'superlink.log'}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return process, port
        time.sleep(0.3)
    process.kill()
    raise RuntimeError("flower-superlink did not start within 60 s")


def _stop(process: subprocess.Popen) -> None:
    """Stop the SuperLink and everything it started (its simulation and Ray workers)."""
    if process.poll() is None:
        os.killpg(process.pid, 15)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait()


def prepare_data(config: RunConfig, sites: int, site_config: dict | None = None) -> None:
    """Check the dataset and fill the clip caches with a progress bar, before Flower starts:
    the sites' videos as every simulated site anonymizes them (`site_config`, its node
    config: `anonymize-mode`, `anonymize-workers`, `cache-dir`), the test videos as the
    coordinator does.

    Sites then read anonymized clips from the cache instead of decoding in silence, and a
    bad dataset or a missing face model is reported before any process is started.
    """
    from client.dataset import DataError
    from client.node_config import NodeConfig
    from client.site import cache_dir, clip_spec, federation_split, load_task_clips, node_anonymizer, site_anonymizer

    classes, shared, test = federation_split(config)
    if len(shared) < sites:
        raise DataError(f"{len(shared)} videos cannot be shared among {sites} sites")
    node = NodeConfig.from_mapping({**(site_config or {}), "partition-id": 0, "num-partitions": sites})
    started = time.perf_counter()
    sets = [load_task_clips(config, shared, clip_spec(config), node_anonymizer(node),
                            cache_dir(node), progress=True, workers=node.anonymize_workers)]
    if test:
        sets.append(load_task_clips(config, test, clip_spec(config), site_anonymizer(), cache_dir(), progress=True))
    print(
        f"data: {len(classes)} classes, {len(shared) + len(test)} videos -> {sum(map(len, sets))} clips "
        f"({sum(len(s.skipped) for s in sets)} skipped), {sum(s.faces_blurred for s in sets)} faces blurred, "
        f"{time.perf_counter() - started:.1f} s"
    )


def simulate(sites: int, overrides: str = "", out: Path | None = None, cpus_per_site: int = 1,
             node_config: str = "") -> int:
    """Run a simulated federation of `sites` sites, each with `node_config`; return 0 when the
    run completed."""
    from client.site import builtin_data_dir, fedvid_home

    config = resolve_run_config(f'{overrides} run-dir="{Path(out).resolve()}"' if out else overrides)
    site_config = simulated_site_config(config, node_config)
    if sites < config.min_sites:
        raise ValueError(f"--sites {sites} is below min-sites = {config.min_sites}")
    if not config.data_dir:
        builtin_data_dir(progress=True, task=config.task)
    prepare_data(config, sites, site_config)
    run_dir = Path(config.run_dir or fedvid_home() / "runs" / time.strftime("%Y%m%d-%H%M%S")).resolve()
    if (run_dir / "status.json").exists() and not config.resume:
        raise FileExistsError(f"{run_dir} already holds a run; choose another --out, or resume=true to continue it")
    flwr_home = Path(tempfile.mkdtemp(prefix="fedvid-flwr-"))
    env = _flower_env(flwr_home, site_config)
    superlink, _ = _start_superlink(flwr_home, env)
    try:
        command = [
            "flwr", "run", str(APP_DIR), "fedvid", "--stream",
            "--federation-config", f"num-supernodes={sites} client-resources-num-cpus={cpus_per_site}",
            "--run-config", f'{overrides} run-dir="{run_dir}"'.strip(),
        ]
        flwr_exit = subprocess.run(command, env=env).returncode
    finally:
        _stop(superlink)
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy(flwr_home / "superlink.log", run_dir / "superlink.log")
        shutil.rmtree(flwr_home, ignore_errors=True)
    status = _read_status(run_dir)
    if flwr_exit != 0 or status.get("status") != "completed":
        print(f"fedvid simulate: the run failed ({status or 'no status written'}); "
              f"see {run_dir / 'superlink.log'}", file=sys.stderr)
        return 1
    _print_summary(run_dir)
    return 0


def _read_status(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "status.json").read_text())
    except (OSError, ValueError):
        return {}


def _print_summary(run_dir: Path) -> None:
    from models.tasks import get_task
    from server.run_dir import read_metrics

    task = get_task(json.loads((run_dir / "config.json").read_text())["run-config"]["task"])
    last = read_metrics(run_dir / "metrics.jsonl")[-1]
    baseline = f" (baseline {last[f'test-{task.baseline}']:.3f})" if f"test-{task.baseline}" in last else ""
    print(f"fedvid simulate: completed {last['round']} rounds; final {task.headline} "
          f"{last.get(task.headline, float('nan')):.3f}{baseline}, loss {last.get('loss', float('nan')):.3f}; "
          f"run directory {run_dir}")
