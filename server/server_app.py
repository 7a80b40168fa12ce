"""The ServerApp: the coordinator. FedAvg (or a robust aggregator) over the sites, central
evaluation, the run directory, and resuming a run from its last complete round."""

from __future__ import annotations

import dataclasses
import time
from logging import INFO
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from client.dataset import ClipSet
from client.run_config import RunConfig
from client.site import clip_spec, federation_split, fedvid_home, load_task_clips, site_anonymizer
from client.train import pick_device
from models.pretrained import freeze_except, load_initial_weights
from models.registry import build_model, class_dependent_keys
from models.tasks import Task, get_task
from privacy.durable import atomic_write_json
from server.central_privacy import CentralPrivacy
from server.model_average import ModelAverage
from server.polling_grid import PollingGrid
from server.run_dir import RunDirectory, resume_point
from server.strategy import RoundOffset, make_strategy
from server.update_guard import NORM_SLACK, UpdateGuard

app = ServerApp()


def default_run_dir(run_id: int) -> Path:
    return fedvid_home() / "runs" / f"{time.strftime('%Y%m%d-%H%M%S')}-{run_id}"


def central_test_set(config: RunConfig) -> tuple[tuple[str, ...], ClipSet | None]:
    """(classes, central test clips or None) from the run's dataset, when the server has it."""
    if not config.central_eval:
        names = config.class_names()
        if not names:
            raise ValueError("central-eval = false needs the class list in the run-config key `classes`")
        return names, None
    classes, _, test_items = federation_split(config)
    if not test_items:
        return classes, None
    return classes, load_task_clips(config, test_items, clip_spec(config), site_anonymizer(), fedvid_home() / "cache", progress=True)


def round_line(server_round: int, rounds: int, metrics: dict, seconds: float, task: Task) -> str:
    """One line a person can follow: the round's losses and the task's headline metric."""
    parts = [f"round {server_round}/{rounds}"]
    for prefix in ("train", "val", "test"):
        if f"{prefix}-loss" in metrics:
            part = f"{prefix} loss {metrics[f'{prefix}-loss']:.3f}"
            for name in (task.headline, task.baseline):
                if name and f"{prefix}-{name}" in metrics:
                    part += f" {name} {metrics[f'{prefix}-{name}']:.3f}"
            parts.append(part)
    parts.append(f"{seconds:.1f} s")
    return " | ".join(parts)


def update_norm_limit(config: RunConfig) -> float | None:
    """The largest update norm accepted: sites clip to `update-clip-norm` in DP runs."""
    return config.update_clip_norm * NORM_SLACK if config.dp else None


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run `num-server-rounds` rounds (or the rest of them, with `resume`) and write the run directory."""
    config = RunConfig.from_mapping(context.run_config)
    task = get_task(config.task)
    resume = config.resume
    classes, test_set = central_test_set(config)
    spec = config.model_spec(len(classes))
    torch.manual_seed(config.seed)
    model = build_model(spec)
    freeze_except(model, config.trainable_layers)  # a layer name that does not exist is refused here
    init = None
    if config.init_from and not resume:
        init = load_initial_weights(model, Path(config.init_from), classes, class_dependent_keys(spec))
    run_path = Path(config.run_dir).expanduser() if config.run_dir else default_run_dir(context.run_id)
    point = resume_point(run_path, spec, classes) if resume else None
    if point is not None:
        model.load_state_dict(point.state_dict)
        log(INFO, "fedvid: resuming %s after round %s (ledger at seq %s)", run_path, point.round, point.ledger_head[0])
    done = point.round if point else 0
    run = RunDirectory(run_path, config.to_mapping(), spec, classes, resumed=resume)
    log(INFO, "fedvid: run directory %s", run.path)
    if init is not None:
        atomic_write_json(run.path / "init-from.json", dataclasses.asdict(init))
        log(INFO, "fedvid: init-from: %s", init.summary())
    average = ModelAverage(config.ema_decay, point.average if point else None) if config.ema_decay else None
    if done >= config.num_server_rounds:
        run.finish(point.average if point and point.average is not None else model.state_dict())
        log(INFO, "fedvid: all %s rounds were complete already", config.num_server_rounds)
        return

    ledger_run_id = point.run_id if point else str(context.run_id)  # one logical run across restarts
    central = CentralPrivacy(config, run.path / "ledger.jsonl", ledger_run_id, total_sites=len(list(grid.get_node_ids())))
    # Sites are averaged uniformly: a site's size is not sent (it is private). With central
    # noise the average is over the fixed number of sampled sites (see server.central_privacy).
    strategy = make_strategy(
        config.aggregation,
        fixed_denominator=central.sites_expected if central.noised else None,
        fraction_train=config.fraction_train,
        fraction_evaluate=config.fraction_evaluate,
        min_train_nodes=config.min_sites,
        min_evaluate_nodes=config.min_sites,
        min_available_nodes=config.min_sites,
        weighted_by_key="site-weight",
    )
    central.rounds = point.central_rounds if point else 0
    guard = UpdateGuard(central.wrap(strategy), update_norm_limit(config))
    running = RoundOffset(guard, done) if done else guard
    device = pick_device()
    clock = {"start": time.perf_counter()}

    def after_round(step: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Central evaluation, checkpoint and metrics line; Flower calls it after each round."""
        server_round = step + done
        if step == 0 and done:
            return None  # the resumed model is round `done`, already evaluated and recorded
        metrics = dict(strategy.round_metrics) if server_round > 0 else {}
        round_state = arrays.to_torch_state_dict()
        averaged = average is not None and server_round > 0
        if server_round > 0:
            metrics.update(guard.round_report())
        if averaged:
            average.update(round_state)
        if test_set is not None:  # the run's model: the average when there is one
            model.load_state_dict(average.state if averaged else round_state)
            metrics.update({f"test-{key}": value for key, value in task.evaluate(model, test_set, device).items()})
            if averaged:
                model.load_state_dict(round_state)
                metrics[f"test-unaveraged-{task.headline}"] = task.evaluate(model, test_set, device)[task.headline]
        source = "test" if test_set is not None else "val"
        if f"{source}-{task.headline}" in metrics:  # the round's headline, e.g. `accuracy` or `map50`
            metrics.update({task.headline: metrics[f"{source}-{task.headline}"], "loss": metrics[f"{source}-loss"]})
        if server_round > 0:
            metrics.update(central.record_round(server_round, strategy.ledger_records + guard.rejected_ledger_records,
                                                sites_contributed=int(strategy.round_metrics.get("sites-trained", 0))))
        seconds = time.perf_counter() - clock["start"]
        metrics["seconds"] = seconds
        run.record_round(
            server_round, {**metrics, "sites": strategy.site_metrics if server_round else []},
            round_state if server_round else None,
            ledger_head=list(central.ledger.head()), central_rounds=central.rounds, run_id=ledger_run_id,
            average=average.state if averaged else None,
        )
        log(INFO, "fedvid: %s", round_line(server_round, config.num_server_rounds, metrics, seconds, task))
        clock["start"] = time.perf_counter()
        return MetricRecord({k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})

    try:
        model.to(device)
        result = running.start(
            grid=PollingGrid(grid),
            initial_arrays=ArrayRecord(model.state_dict()),
            num_rounds=config.num_server_rounds - done,
            timeout=config.round_timeout,
            train_config=ConfigRecord({"learning-rate": config.learning_rate}),
            evaluate_fn=after_round,
        )
    except BaseException as exc:
        run.set_status("failed", error=f"{type(exc).__name__}: {exc}")
        raise
    if average is not None and average.state is not None:
        run.finish(average.state)
    else:  # no round aggregated anything (every update refused or rejected): the model is unchanged
        run.finish(result.arrays.to_torch_state_dict() if len(result.arrays) else model.cpu().state_dict())
    log(INFO, "fedvid: run completed, results in %s", run.path)
