"""The run directory: everything a run leaves behind, written as it goes.

    config.json        the resolved run config, classes and model spec
    metrics.jsonl      one JSON object per round (round 0 is the initial model)
    checkpoints/       round-001.pt, ... the global model after each round, with the round,
                       the ledger head, the central accountant's rounds and (`ema-decay`) the
                       average of the global models: a resumed run continues from the last one
                       (`resume_point`)
    model.pt           the final global model (with `ema-decay`: its average over rounds)
    metrics.png        the task's metric (accuracy, mAP, PSNR) and loss per round
    status.json        "running", then "completed" or "failed"
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from models.registry import ModelSpec
from models.tasks import Task, get_task
from privacy.durable import atomic_write_json

if TYPE_CHECKING:
    from client.run_config import RunConfig


def save_model(path: Path, state_dict: dict, spec: ModelSpec, classes: tuple[str, ...], **info: Any) -> None:
    """A model file that says how to rebuild its architecture."""
    tmp = path.with_suffix(".tmp")
    torch.save({"state_dict": state_dict, "spec": dataclasses.asdict(spec), "classes": list(classes), **info}, tmp)
    os.replace(tmp, path)


def load_model_file(path: Path) -> tuple[torch.nn.Module, dict]:
    """Rebuild a model saved by `save_model`; returns (model, the file's contents)."""
    from models.registry import build_model

    content = torch.load(path, map_location="cpu", weights_only=False)
    model = build_model(ModelSpec(**content["spec"]))
    model.load_state_dict(content["state_dict"])
    return model, content


def load_finished_run(run_dir: Path) -> tuple[torch.nn.Module, ModelSpec, tuple[str, ...], RunConfig]:
    """(model, spec, classes, RunConfig) of a finished run, or a clear error naming the path."""
    from client.run_config import RunConfig

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    final = run_dir / "model.pt"
    if not final.is_file():
        raise FileNotFoundError(
            f"{final} not found: the run in {run_dir} has no final model (still running or failed? "
            "round checkpoints alone are not used)"
        )
    config_file = run_dir / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: {run_dir} is not a fedvid run directory")
    config = RunConfig.from_mapping(json.loads(config_file.read_text())["run-config"])
    model, content = load_model_file(final)
    return model.eval(), ModelSpec(**content["spec"]), tuple(content["classes"]), config


class RunDirectory:
    """Writes one run's files; every write is atomic or an append of a whole line."""

    def __init__(self, path: Path, config: dict, spec: ModelSpec, classes: tuple[str, ...], resumed: bool = False):
        self.path = Path(path)
        if not resumed and (self.path / "status.json").exists():
            raise FileExistsError(f"{self.path} already holds a run; continue it with resume = true or choose another run-dir")
        self.spec, self.classes = spec, classes
        (self.path / "checkpoints").mkdir(parents=True, exist_ok=True)
        atomic_write_json(
            self.path / "config.json",
            {"run-config": config, "classes": list(classes), "model": dataclasses.asdict(spec)},
        )
        self.set_status("running")

    def set_status(self, status: str, **info: Any) -> None:
        atomic_write_json(self.path / "status.json", {"status": status, **info})

    def record_round(self, server_round: int, metrics: dict, state_dict: dict | None, **checkpoint: Any) -> None:
        """Save the round's checkpoint (with `checkpoint` info), then append its metrics (round 0: metrics only)."""
        if state_dict is not None and server_round > 0:
            save_model(self.path / "checkpoints" / f"round-{server_round:03d}.pt", state_dict, self.spec, self.classes,
                       round=server_round, **checkpoint)
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"round": server_round, **metrics}) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def finish(self, state_dict: dict, **info: Any) -> None:
        """Save the final model, draw the plot and mark the run completed."""
        save_model(self.path / "model.pt", state_dict, self.spec, self.classes)
        plot_metrics(self.path / "metrics.jsonl", self.path / "metrics.png", get_task(self.spec.task))
        self.set_status("completed", **info)


@dataclass(frozen=True)
class ResumePoint:
    """Where a resumed run continues: the last complete round's checkpoint."""

    round: int
    state_dict: dict
    ledger_head: tuple[int, str]
    central_rounds: int
    run_id: str
    checkpoint: Path
    average: dict | None = None  # the `ema-decay` average of the global models, when the run keeps one


def resume_point(run_path: Path, spec: ModelSpec, classes: tuple[str, ...]) -> ResumePoint | None:
    """The last complete round of the run in `run_path`, checked against its ledger; None if none.

    Raises ValueError when the checkpoint was made for another model or class list, and when
    the ledger does not contain the head recorded in the checkpoint (records lost or edited).
    Ledger records after that head (a round that crashed after the sites reported) are kept:
    the sites did spend that budget.
    """
    from privacy.ledger import verify_chain

    checkpoints = sorted(Path(run_path, "checkpoints").glob("round-*.pt"))
    for path in reversed(checkpoints):
        try:
            content = torch.load(path, map_location="cpu", weights_only=False)
        except Exception:  # noqa: BLE001 - a checkpoint torn by a crash: fall back to the previous one
            continue
        if "ledger_head" not in content:
            continue
        if content["spec"] != dataclasses.asdict(spec) or tuple(content["classes"]) != tuple(classes):
            raise ValueError(f"{path} was made for model {content['spec']} and classes {content['classes']}, "
                             f"not for this run's {dataclasses.asdict(spec)} and {list(classes)}")
        head = (int(content["ledger_head"][0]), str(content["ledger_head"][1]))
        chain = verify_chain(Path(run_path) / "ledger.jsonl", expected_head=head)
        if not chain.ok:
            raise ValueError(f"cannot resume {run_path}: the ledger does not continue checkpoint {path.name} "
                             f"({chain.reason} at line {chain.bad_line})")
        return ResumePoint(int(content["round"]), content["state_dict"], head, int(content["central_rounds"]),
                           str(content["run_id"]), path, content.get("average"))
    return None


def read_metrics(path: Path) -> list[dict]:
    """The rounds of a metrics.jsonl file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_metrics(metrics_file: Path, png: Path, task: Task) -> None:
    """The task's headline metric (and its baseline) and the loss per round, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = read_metrics(metrics_file)
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
    for prefix, style in (("train", ":"), ("val", "--"), ("test", "-")):
        for ax, metric in ((ax_acc, task.headline), (ax_acc, task.baseline), (ax_loss, "loss")):
            points = [(r["round"], r[f"{prefix}-{metric}"]) for r in rounds if f"{prefix}-{metric}" in r]
            if metric and points:
                ax.plot(*zip(*points), style, marker="o" if metric != task.baseline else "x", label=f"{prefix} {metric}")
    for ax, title in ((ax_acc, task.headline), (ax_loss, "loss")):
        ax.set_xlabel("round")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
