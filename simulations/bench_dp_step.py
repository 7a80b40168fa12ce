"""Benchmark: DP-SGD step time / plain step time, per Opacus grad_sample_mode.

    python -m simulations.bench_dp_step [--task classify] --model cnn3d --size tiny --batch-size 16

For each mode (hooks, functorch, ghost) the task's model is wrapped with
`privacy.dp_training.make_private` (noise 1.0, clipping 1.0, fixed batches, no Poisson
sampling so every step sees the same batch size) and one full step (zero_grad, forward,
loss, backward, optimizer step) is timed against the same step on the unwrapped model, the
two taken in turn (medians of ``--repeats`` each). ``--clips-per-unit K`` makes the batch's
clips batch-size / K units whose rows are pooled before clipping, as in training. The
process keeps freed memory as `fedvid`'s training does (`client.train.keep_freed_memory`);
``--fresh-pages`` leaves malloc's defaults.
The loss is the task's training loss (`models.tasks`) on random clips, labels or boxes.
``--device cuda`` runs both steps on a GPU, each timed to the end of its kernels.
Ghost mode (classify only: it needs a criterion of (output, labels)) uses the criterion returned
by make_private, as it must (backward through the plain criterion would skip clipping). The
model comes from `models.registry`; ``--model standin`` is a small Conv3d classifier. For
classify and detect it also prints the brute-force clipping check (`check_per_sample_clipping`).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings
from typing import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from client.train import keep_freed_memory
from privacy.dp_training import (GRAD_SAMPLE_MODES, check_per_sample_clipping, make_private,
                                 pool_grad_samples)


class StandInClassifier(nn.Module):
    """Small video classifier with the registry's interface: (B, 3, T, H, W) -> (B, K)."""

    def __init__(self, num_classes: int, width: int = 16):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv3d(3, width, (3, 3, 3), padding=1),
            nn.GroupNorm(4, width),
            nn.ReLU(),
            nn.Conv3d(width, 2 * width, (3, 3, 3), stride=(1, 2, 2), padding=1),
            nn.GroupNorm(4, 2 * width),
            nn.ReLU(),
            nn.AdaptiveAvgPool3d(1),
        )
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(clips).flatten(1))


def frozen(factory: Callable[[], nn.Module], trainable: str) -> Callable[[], nn.Module]:
    """`factory` with only the `trainable` layers (run-config `trainable-layers`) left to train."""
    from models.pretrained import freeze_except

    def build() -> nn.Module:
        model = factory()
        freeze_except(model, trainable)
        return model

    return build if trainable else factory


def model_factory(
    name: str, size: str, num_classes: int, clip_frames: int, frame_size: int, task: str = "classify"
) -> Callable[[], nn.Module]:
    """A zero-argument builder of the requested model (registry, or the stand-in)."""
    if name == "standin":
        return lambda: StandInClassifier(num_classes)
    from models import registry

    spec = registry.ModelSpec(task=task, name=name, size=size, num_classes=num_classes,
                              clip_frames=clip_frames, frame_size=frame_size)
    return lambda: registry.build_model(spec)


def random_batch(task: str, batch_size: int, num_classes: int, clip_frames: int,
                 frame_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(clips, labels), or (clips, dense detection targets) with one random box per clip."""
    clips = torch.rand(batch_size, 3, clip_frames, frame_size, frame_size)
    labels = torch.randint(0, num_classes, (batch_size,))
    if task != "detect":
        return clips, labels
    from models.video_detector import detection_targets

    corners = torch.rand(batch_size, 2) * frame_size / 2
    sides = frame_size / 4 + torch.rand(batch_size, 2) * frame_size / 4
    boxes = torch.cat([labels[:, None].float(), corners, corners + sides], dim=1).numpy()
    return clips, torch.stack([detection_targets(b[None], num_classes, frame_size) for b in boxes])


def _time_steps(steps: list[Callable[[], None]], warmup: int, repeats: int,
                device: torch.device = torch.device("cpu")) -> list[float]:
    """Median seconds of each step, the steps taken in turn so that they share the machine's
    state (a shared machine's speed drifts by tens of percent within a minute). On a GPU each
    step is timed to the end of its kernels, not of their launch."""
    def wait() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        for step in steps:
            step()
    times: list[list[float]] = [[] for _ in steps]
    for _ in range(repeats):
        for step, taken in zip(steps, times):
            wait()
            t = time.perf_counter()
            step()
            wait()
            taken.append(time.perf_counter() - t)
    return [statistics.median(taken) for taken in times]


def bench(
    factory: Callable[[], nn.Module],
    batch_size: int,
    num_classes: int,
    clip_frames: int,
    frame_size: int,
    modes: tuple[str, ...] = GRAD_SAMPLE_MODES,
    warmup: int = 2,
    repeats: int = 5,
    check: bool = True,
    task: str = "classify",
    clips_per_unit: int = 1,
    device: torch.device = torch.device("cpu"),
) -> list[dict]:
    """Median step times (seconds) per mode and the DP/plain ratio. With ``clips_per_unit`` K
    > 1 the batch's clips are batch_size / K units, and the DP step pools each unit's rows into
    one gradient before clipping (`pool_grad_samples`), as `fedvid`'s training does."""
    from models.tasks import get_task
    from models.video_detector import detection_loss

    if batch_size % clips_per_unit:
        raise ValueError(f"--batch-size {batch_size} is not a multiple of --clips-per-unit {clips_per_unit}")
    unit_index = torch.arange(batch_size // clips_per_unit).repeat_interleave(clips_per_unit)
    torch.manual_seed(0)
    x, y = (t.to(device) for t in random_batch(task, batch_size, num_classes, clip_frames, frame_size))
    unit_index = unit_index.to(device)
    base = factory().to(device).train()
    step_loss = get_task(task).step_loss
    # (output, labels) losses, for the ghost criterion and the brute-force check
    criterion = {"classify": nn.CrossEntropyLoss(), "detect": detection_loss}.get(task)

    plain = copy.deepcopy(base)
    opt = torch.optim.SGD(plain.parameters(), lr=1e-3)

    def plain_step() -> None:
        opt.zero_grad(set_to_none=True)
        step_loss(plain, x, y).backward()
        opt.step()

    rows = []
    for mode in modes:
        if mode == "ghost" and (task != "classify" or clips_per_unit > 1):
            rows.append(dict(mode=mode, plain_s=float("nan"), dp_s=float("nan"), ratio=float("nan"),
                             clip_rel_err=float("nan"),
                             error="ghost mode: classify with one clip per unit only"))
            continue
        model = copy.deepcopy(base)
        dp_opt_in = torch.optim.SGD(model.parameters(), lr=1e-3)
        loader = DataLoader(TensorDataset(x, y), batch_size=batch_size)
        wrapped = make_private(model, dp_opt_in, loader, noise_multiplier=1.0,
                               max_grad_norm=1.0, grad_sample_mode=mode,
                               poisson_sampling=False,
                               criterion=criterion if mode == "ghost" else None)
        dp_model, dp_opt = wrapped[0], wrapped[1]
        ghost_loss = wrapped[2] if mode == "ghost" else None

        def dp_step() -> None:
            dp_opt.zero_grad(set_to_none=True)
            loss = ghost_loss(dp_model(x), y) if ghost_loss else step_loss(dp_model, x, y)
            loss.backward()
            if clips_per_unit > 1:
                pool_grad_samples(dp_model, unit_index)
            dp_opt.step()

        try:
            t_plain, t_dp = _time_steps([plain_step, dp_step], warmup, repeats, device)
            err = (check_per_sample_clipping(lambda: factory().to(device), x[:8], y[:8], mode, criterion)
                   if check and criterion is not None else float("nan"))
            rows.append(dict(mode=mode, plain_s=t_plain, dp_s=t_dp, ratio=t_dp / t_plain,
                             clip_rel_err=err, error=None))
        except Exception as exc:  # report, keep benchmarking the other modes
            rows.append(dict(mode=mode, plain_s=float("nan"), dp_s=float("nan"),
                             ratio=float("nan"), clip_rel_err=float("nan"),
                             error=f"{type(exc).__name__}: {str(exc)[:80]}"))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="classify", choices=("classify", "detect", "generate", "enhance"))
    p.add_argument("--model", default="cnn3d", help="registry model name, or 'standin'")
    p.add_argument("--size", default="tiny")
    p.add_argument("--num-classes", type=int, default=5)
    p.add_argument("--clip-frames", type=int, default=8)
    p.add_argument("--frame-size", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=16, help="clips per step")
    p.add_argument("--clips-per-unit", type=int, default=1,
                   help="clips of each privacy unit in the batch (pooled into one gradient)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.add_argument("--modes", default=",".join(GRAD_SAMPLE_MODES))
    p.add_argument("--no-check", action="store_true", help="skip the brute-force clip check")
    p.add_argument("--fresh-pages", action="store_true",
                   help="leave malloc's defaults (freed memory handed back to the kernel every step)")
    p.add_argument("--trainable-layers", default="", help="train only these layers in both steps, e.g. 'layer4,fc'")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    if a.threads:
        torch.set_num_threads(a.threads)
    if not a.fresh_pages:
        keep_freed_memory()  # as fedvid's training does
    name = a.model
    factory = frozen(model_factory(name, a.size, a.num_classes, a.clip_frames, a.frame_size, a.task),
                     a.trainable_layers)
    warnings.filterwarnings("ignore")
    rows = bench(factory, a.batch_size, a.num_classes, a.clip_frames, a.frame_size,
                 tuple(a.modes.split(",")), repeats=a.repeats, check=not a.no_check, task=a.task,
                 clips_per_unit=a.clips_per_unit, device=device)
    params = sum(p.numel() for p in factory().parameters() if p.requires_grad)
    print(f"task={a.task} model={name} size={a.size} params={params} batch={a.batch_size} "
          f"input=(B,3,{a.clip_frames},{a.frame_size},{a.frame_size}) "
          f"device={device} threads={torch.get_num_threads()} trainable-layers={a.trainable_layers or 'all'} "
          f"clips-per-unit={a.clips_per_unit}")
    print(f"{'mode':<10} {'plain ms':>9} {'dp ms':>9} {'dp/plain':>9} {'clip err':>9}")
    for r in rows:
        if r["error"]:
            print(f"{r['mode']:<10} {r['plain_s'] * 1e3:9.1f} {'-':>9} {'-':>9} {'-':>9}  "
                  f"{r['error']}")
        else:
            print(f"{r['mode']:<10} {r['plain_s'] * 1e3:9.1f} {r['dp_s'] * 1e3:9.1f} "
                  f"{r['ratio']:8.2f}x {r['clip_rel_err']:9.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
