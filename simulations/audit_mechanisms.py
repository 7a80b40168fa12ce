"""The empirical audit against honest and deliberately broken DP-SGD, at one site.

    python -m simulations.audit_mechanisms [--canaries 1000] [--epsilon 2] [--trainable-layers body.6,head] [--json]

Each row runs one site's private round (`client.private_round.private_round`, the production
path: plan, charge, canaries, Opacus, scores) on small generated video with audit canaries,
then the one-run audit (`privacy.empirical_audit`). The broken mechanisms are made here, by
patching the round, never in the product:

* ``honest``: the mechanism as shipped (gradient and input canaries);
* ``no-clipping``: per-unit gradients are summed unclipped (the noise is still sigma * C);
* ``noise/100``: Opacus adds 1/100 of the noise the site accounted;
* ``replayed-noise``: the noise comes from a seed the attacker knows (the old run-config seed);
  the attacker regenerates it and subtracts it from the released gradients before scoring.

A broken mechanism must give a lower bound above the accounted epsilon; the honest one below.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import numpy as np
import torch

import client.private_round as private_round_module
from client.dataset import ClipSet
from client.node_config import NodeConfig
from client.private_round import SitePrivacy, private_round
from client.run_config import RunConfig
from client.site import PrivacyUnits, SiteData
from models.pretrained import freeze_except
from models.registry import build_model
from privacy.canaries import DiracObserver, RunCanaries, trainable_count, trainable_parameters
from privacy.empirical_audit import CanaryAudit, audit_run_canaries
from privacy.site_budget import SiteBudget

MECHANISMS = ("honest", "no-clipping", "noise/100", "replayed-noise")
KNOWN_SEED = 1234  # what the attacker knows in "replayed-noise"
CLASSES = ("dark", "bright")


@dataclass(frozen=True)
class Setting:
    """One small audited site: its units, the run's DP settings, the canaries."""

    canaries: int = 1000
    target_epsilon: float = 2.0
    units: int = 200
    batch_size: int = 300
    local_epochs: int = 10
    kind: str = "gradient"
    trainable_layers: str = ""  # e.g. "body.6,head": a frozen backbone; canaries land on what trains

    def run_config(self) -> RunConfig:
        return RunConfig.from_mapping({
            "task": "classify", "model": "cnn3d", "model-size": "tiny", "clip-frames": 4,
            "frame-stride": 1, "frame-size": 16, "num-server-rounds": 1, "local-epochs": self.local_epochs,
            "batch-size": self.batch_size, "target-epsilon": self.target_epsilon, "delta": 1e-5,
            "learning-rate": 0.003, "audit-canaries": self.canaries, "audit-canary-kind": self.kind,
            "trainable-layers": self.trainable_layers,
        })


def site_data(units: int, seed: int = 0, frames: int = 4, size: int = 16) -> SiteData:
    """``units`` one-clip videos, two classes a model can learn (dark vs bright noise)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(CLASSES), units)
    base = np.where(labels[:, None, None, None, None] == 1, 160, 60)
    clips = np.clip(base + rng.normal(0, 40, (units, frames, size, size, 3)), 0, 255).astype(np.uint8)
    ids = [f"video-{i}" for i in range(units)]
    train = ClipSet(clips, labels.astype(np.int64), sources=ids)
    return SiteData(CLASSES, train, PrivacyUnits("video", ids, [[i] for i in range(units)]), None, [])


def run_mechanism(mechanism: str, setting: Setting, workdir: Path) -> CanaryAudit:
    """One site round under ``mechanism``, then the empirical audit of its canaries."""
    if mechanism not in MECHANISMS:
        raise ValueError(f"mechanism must be one of {MECHANISMS}, got {mechanism!r}")
    config = setting.run_config()
    seeded = mechanism == "replayed-noise"
    node = NodeConfig(partition_id=0, num_partitions=1, epsilon_budget=100.0, delta=1e-5,
                      dp_seed=KNOWN_SEED if seeded else -1)
    site = SitePrivacy("site-0", workdir / mechanism.replace("/", "-"), node)
    torch.manual_seed(0)
    model = build_model(config.model_spec(len(CLASSES)))
    freeze_except(model, config.trainable_layers)  # as the client app does
    with _broken(mechanism):
        private_round(model, site_data(setting.units), config, site, "audit", 1, torch.device("cpu"))
    canaries = RunCanaries.load(RunCanaries.path_for(site.privacy_dir, "audit"))
    return audit_run_canaries(site.site_id, canaries, SiteBudget.open_existing(site.privacy_dir))


@contextlib.contextmanager
def _broken(mechanism: str):
    """Patch the site's round into the broken ``mechanism`` (nothing for "honest")."""
    real = private_round_module.make_private
    if mechanism == "honest":
        yield
    elif mechanism == "noise/100":
        def quiet(model, optimizer, loader, noise_multiplier, *args, **kwargs):
            return real(model, optimizer, loader, noise_multiplier / 100, *args, **kwargs)
        with mock.patch.object(private_round_module, "make_private", quiet):
            yield
    elif mechanism == "no-clipping":
        def unclipped(*args, **kwargs):
            wrapped = real(*args, **kwargs)
            _sum_without_clipping(wrapped[1])
            return wrapped
        with mock.patch.object(private_round_module, "make_private", unclipped):
            yield
    else:  # replayed-noise: the released gradients are read by an attacker who replays the noise
        def replaying(self, model):
            coordinates, signs = self.dirac(trainable_count(model))
            return ReplayingObserver(DiracObserver(trainable_parameters(model), coordinates, signs), KNOWN_SEED + 1)
        with mock.patch.object(RunCanaries, "gradient_observer", replaying):
            yield


def _sum_without_clipping(optimizer) -> None:
    """The bug: per-unit gradients summed as they are, whatever their norm."""
    from opacus.optimizers.optimizer import _mark_as_processed

    def clip_and_accumulate():
        for p in optimizer.params:
            grad = optimizer._get_flat_grad_sample(p).to(p.dtype).sum(0)
            p.summed_grad = grad if p.summed_grad is None else p.summed_grad + grad
            _mark_as_processed(p.grad_sample)
    optimizer.clip_and_accumulate = clip_and_accumulate


class ReplayingObserver:
    """The attacker of "replayed-noise": it knows the seed of the site's noise generator, draws
    the same noise Opacus drew (same generator, same order: every parameter, every step) and
    scores the canaries on the released gradient minus that noise."""

    def __init__(self, honest: DiracObserver, noise_seed: int):
        self.honest = honest
        self.generator = torch.Generator(device="cpu").manual_seed(noise_seed)
        self.scores = honest.scores

    def __call__(self, optimizer) -> None:
        from opacus.optimizers.optimizer import _generate_noise

        std = optimizer.noise_multiplier * optimizer.max_grad_norm
        noise = [_generate_noise(std, p.grad, self.generator) / optimizer.expected_batch_size
                 for p in optimizer.params]
        saved = [p.grad.clone() for p in optimizer.params]
        for p, n in zip(optimizer.params, noise):
            p.grad -= n
        self.honest(optimizer)
        for p, g in zip(optimizer.params, saved):
            p.grad = g


def audit_table(setting: Setting, mechanisms=MECHANISMS, kinds=("gradient",)) -> list[CanaryAudit]:
    """Every mechanism (and the honest one with every kind in ``kinds``), in a temporary folder."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in kinds:
            for mechanism in mechanisms:
                if kind != "gradient" and mechanism != "honest":
                    continue
                run = Setting(**{**setting.__dict__, "kind": kind})
                rows.append((mechanism, run_mechanism(mechanism, run, Path(tmp) / kind)))
    return rows


def round_cost(canaries: int = 1000, units: int = 360, repeats: int = 2) -> dict[str, float]:
    """Seconds of one site round of the quick start's model and settings (cnn3d small, 48 px,
    8 frames, batch 120, 3 local epochs, ``units`` one-clip videos): plain, and with
    ``canaries`` gradient or input canaries. The best of ``repeats``, interleaved."""
    import time

    base = {"task": "classify", "frame-size": 48, "clip-frames": 8, "num-server-rounds": 16}
    data = site_data(units, frames=8, size=48)
    best: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(repeats):
            for kind, count in (("plain", 0), ("gradient", canaries), ("input", canaries)):
                config = RunConfig.from_mapping({**base, "audit-canaries": count,
                                                 "audit-canary-kind": "input" if kind == "input" else "gradient"})
                node = NodeConfig(partition_id=0, num_partitions=1, epsilon_budget=100.0)
                site = SitePrivacy("site-0", Path(tmp) / f"{kind}-{repeat}", node)
                model = build_model(config.model_spec(len(CLASSES)))
                start = time.perf_counter()
                private_round(model, data, config, site, f"cost-{repeat}", 1, torch.device("cpu"))
                best[kind] = min(best.get(kind, float("inf")), time.perf_counter() - start)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--canaries", type=int, default=1000)
    parser.add_argument("--epsilon", type=float, default=2.0, help="the target epsilon the site accounts")
    parser.add_argument("--trainable-layers", default="",
                        help="train only these layers, e.g. 'body.6,head' (canaries land on them only, so they need more weights than canaries)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--cost", action="store_true",
                        help="instead: seconds of one site round of fedvid simulate from scratch, plain vs with canaries")
    args = parser.parse_args(argv)
    if args.cost:
        cost = round_cost(args.canaries)
        for kind, seconds in cost.items():
            print(f"{kind:9} {seconds:7.1f} s   {seconds / cost['plain']:.2f}x plain")
        return 0
    rows = audit_table(Setting(canaries=args.canaries, target_epsilon=args.epsilon,
                                 trainable_layers=args.trainable_layers), kinds=("gradient", "input"))
    if args.json:
        print(json.dumps([dict(a.to_dict(), mechanism=m) for m, a in rows], indent=1))
        return 0
    print(f"{'mechanism':16} {'canaries':>14} {'accounted (pld)':>16} {'lower bound':>12} {'provable max':>13}  verdict")
    for mechanism, a in rows:
        print(f"{mechanism:16} {f'{a.canaries} {a.kind}':>14} {a.epsilon_accounted:16.3f} "
              f"{a.empirical_epsilon_lower:12.3f} {a.empirical_epsilon_max:13.3f}  "
              f"{'LEAKS' if a.violated else 'ok'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
