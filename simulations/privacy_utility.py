"""The privacy-utility trade-off: every task at several epsilons, from scratch and pretrained.

    python -m simulations.privacy_utility [--tasks classify,detect,generate,enhance]
        [--epsilons 1,3,8,off] [--starts scratch,pretrained] [--seeds 0,1,2] [--sites 4]
        [--run-config '...'] [--pretrain-epochs 12] [--judge CLASSIFY_RUN_DIR]

One simulated federation per (task, start, epsilon or "off", seed). "pretrained" starts from
`fedvid pretrain` on the task's built-in public data (made once per task). Each row gives the
task's headline test metric and its trivial baseline (mean and spread over seeds) beside the
largest epsilon any site actually spent, read from the run's ledger by the audit, not from the
target. With ``--judge`` (a classify run on the built-in classes, e.g. the quick start's), each
generate row also gives its class score: the share of samples the judge classifies as the class
they were generated for (chance 1/6).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path

from models.inference import class_score, load_task_run
from models.tasks import get_task
from privacy.audit import audit_run
from simulations.federation import resolve_run_config, simulate


@dataclass(frozen=True)
class RunResult:
    headline: float  # the task's headline test metric
    baseline: float | None  # its trivial baseline
    epsilon: float  # the largest epsilon a site spent, from the audited ledger
    unaveraged: float | None  # the headline of the last round's model alone (`ema-decay` runs)
    class_score: float | None  # generate, with a judge: samples classified as their class


def run_once(sites: int, overrides: str, run_dir: Path, task: str, judge: Path | None = None) -> RunResult:
    """One simulated run, its figures read from its run directory."""
    if simulate(sites, overrides, run_dir) != 0:
        raise SystemExit(f"the run in {run_dir} failed")
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    spec = get_task(task)
    sites_eps = [site["epsilon"] for site in audit_run(run_dir).to_dict()["sites"].values()]
    epsilon = max((float(e) for e in sites_eps), default=math.inf)
    baseline = last.get(f"test-{spec.baseline}") if spec.baseline else None
    score = class_score(run_dir, judge) if judge and task == "generate" else None
    return RunResult(last[f"test-{spec.headline}"], baseline, epsilon,
                     last.get(f"test-unaveraged-{spec.headline}"), score)


def pretrained_file(task: str, overrides: str, root: Path, epochs: int) -> Path:
    """A model pretrained on the built-in public data for `task`."""
    from models.pretrained import pretrain

    path = root / f"pretrained-{task}.pt"
    if not path.is_file():
        pretrain(pretrain_config(task, overrides), path, epochs=epochs)
    return path


def pretrain_config(task: str, overrides: str):
    """The runs' model and clip settings for pretraining (which trains at `pretrain-learning-rate`,
    not at the runs' `learning-rate`: a DP recipe's 0.1 for a head alone makes full training diverge)."""
    return resolve_run_config(f"{overrides} task={json.dumps(task)}")


def table(results: dict[tuple[str, str, str], list[RunResult]]) -> str:
    """One markdown row per (task, start, privacy), over its seeds; a class-score column when
    any run has one."""
    scored = any(r.class_score is not None for runs in results.values() for r in runs)
    lines = ["| task | start | privacy | spent epsilon (max site) | headline (test) | last round's model alone "
             "| baseline |" + (" class score |" if scored else ""),
             "|---|---|---|---:|---|---|---|" + ("---|" if scored else "")]
    for (task, start, setting), runs in results.items():
        if not runs:
            continue
        columns = [[r.unaveraged for r in runs], [r.baseline for r in runs]]
        if scored:
            columns.append([r.class_score for r in runs])
        figures = [f"{get_task(task).headline} {spread([r.headline for r in runs])}"]
        for values in columns:
            values = [v for v in values if v is not None]
            figures.append(spread(values) if values else "-")
        lines.append(f"| {task} | {start} | {setting} | {max(r.epsilon for r in runs):.2f} | "
                     + " | ".join(figures) + " |")
    return "\n".join(lines)


def spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f} (n={len(values)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="classify")
    parser.add_argument("--epsilons", default="1,3,8,off", help="target epsilons; off: dp=false")
    parser.add_argument("--starts", default="scratch,pretrained")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--run-config", default="", help="overrides for every run, e.g. 'num-server-rounds=8'")
    parser.add_argument("--pretrain-epochs", type=int, default=12)
    parser.add_argument("--out", type=Path, default=None, help="where the runs go (default: a new temporary folder)")
    parser.add_argument("--judge", type=Path, default=None,
                        help="a classify run on the built-in classes: score the generators' samples by class")
    args = parser.parse_args()
    if args.judge:  # refused before any run, not after the first generator's
        try:
            load_task_run(args.judge, "classify")
        except (OSError, ValueError) as exc:
            parser.error(f"--judge {args.judge}: {exc}")
    root = args.out or Path(tempfile.mkdtemp(prefix="fedvid-privacy-utility-"))
    root.mkdir(parents=True, exist_ok=True)
    privacy = ["dp=false" if e == "off" else f"target-epsilon={float(e)}" for e in args.epsilons.split(",")]
    inits = {task: pretrained_file(task, args.run_config, root, args.pretrain_epochs) if "pretrained" in args.starts else None
             for task in args.tasks.split(",")}
    cells = [(task, start, setting) for task in args.tasks.split(",") for start in args.starts.split(",")
             for setting in privacy if start == "scratch" or inits[task] is not None]
    results: dict[tuple, list] = {cell: [] for cell in cells}
    for seed in args.seeds.split(","):  # seeds outermost: an interrupted table is balanced
        for task, start, setting in cells:
            name = f"{task}-{start}-{setting.replace('=', '-')}-seed{seed}"
            overrides = f"{args.run_config} task={json.dumps(task)} {setting} seed={seed}"
            if start == "pretrained":
                overrides += f" init-from={json.dumps(str(inits[task]))}"
            results[(task, start, setting)].append(run_once(args.sites, overrides, root / name, task, args.judge))
            print(f"{name}: {results[(task, start, setting)][-1]}", flush=True)
    print()
    print(table(results))
    print(f"runs in {root}")


if __name__ == "__main__":
    main()
