"""Opacus DP-SGD over privacy units, with the site's own randomness; update clipping.

The DP example is a privacy UNIT (a video, a person, or a clip by explicit opt-in), not a
clip. Multi-clip DP-SGD (Luo et al., WACV 2024): Poisson sampling over units; each sampled
unit gives up to `clips-per-unit` of its clips, drawn afresh every step; the clips go through
the model as rows of one batch, Opacus computes a gradient per row, and `pool_grad_samples`
averages the rows of each unit into ONE per-unit gradient before Opacus clips and noises it.
So the clipping norm bounds what a whole unit changes, whatever its number of clips.

Randomness: the Poisson masks, the clips drawn per unit and the Gaussian noise come from
`SiteRandomness`, generators seeded from the operating system's entropy at the site, never
from the run config (whoever knows the seed can replay the noise and subtract it).

`make_private` uses a FRESH `opacus.PrivacyEngine` per round: its accountant is thrown away
(the site budget, charged before training, is the record) and its step hook refuses any step
beyond the charged count.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np
import torch
from opacus import PrivacyEngine
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from opacus.optimizers import DPOptimizer
from opacus.utils.module_utils import trainable_modules
from opacus.validators import ModuleValidator
from opacus.validators.errors import UnsupportedModuleError
from torch import nn
from torch.utils.data import DataLoader, Dataset, default_collate

from privacy import grad_samplers  # noqa: F401  (registers the convolutions' grad sampler with Opacus)

GRAD_SAMPLE_MODES = ("hooks", "functorch", "ghost")


class IncompatibleModelError(ValueError):
    """The model has layers Opacus cannot compute per-sample gradients for."""


class StepLimitExceeded(RuntimeError):
    """More DP-SGD steps were attempted than were charged to the site budget."""


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------


def validate_dp_settings(
    noise_multiplier: float | None,
    max_grad_norm: float,
    delta: float,
    target_epsilon: float | None,
    dataset_size: int,
    *,
    update_clip_norm: float | None = None,
    server_noise_multiplier: float | None = None,
) -> None:
    """Refuse bad DP settings with a ``ValueError`` naming the run-config key.

    ``noise_multiplier`` may be None (then it is calibrated from ``target_epsilon``, which
    must then be given); ``target_epsilon`` may be None when the noise is given. Checks:
    noise-multiplier > 0, max-grad-norm > 0, 0 < delta < 1/N (N = ``dataset_size``),
    target-epsilon > 0, update-clip-norm > 0 and server-noise-multiplier > 0 when given.
    """

    def positive(key: str, value: float | None, required: bool = False) -> None:
        if value is None:
            if required:
                raise ValueError(f"{key} is required")
            return
        v = float(value)
        if not math.isfinite(v) or v <= 0:
            raise ValueError(f"{key} must be a finite number > 0, got {value!r}")

    positive("noise-multiplier", noise_multiplier)
    positive("max-grad-norm", max_grad_norm, required=True)
    positive("target-epsilon", target_epsilon)
    if noise_multiplier is None and target_epsilon is None:
        raise ValueError("set noise-multiplier or target-epsilon (neither is set)")
    if int(dataset_size) != dataset_size or dataset_size <= 0:
        raise ValueError(f"dataset size must be a positive integer, got {dataset_size!r}")
    positive("delta", delta, required=True)
    if float(delta) >= 1.0 / dataset_size:
        raise ValueError(
            f"delta must be < 1/N = 1/{dataset_size} = {1.0 / dataset_size:.3g} "
            f"(N = privacy units at the site), got {delta!r}"
        )
    positive("update-clip-norm", update_clip_norm)
    positive("server-noise-multiplier", server_noise_multiplier)


def round_plan(data_loader: DataLoader, epochs: int) -> tuple[float, int]:
    """``(sample_rate, steps)`` that `make_private` + ``epochs`` epochs will take.

    Opacus sets q = 1/len(data_loader) (batch_size/N) and, under Poisson sampling, every
    epoch of the DP loader yields exactly len(data_loader) = 1/q batches of RANDOM size
    (expected batch_size; possibly empty). With ``poisson_sampling=False`` the loader is
    unchanged and the accountant still assumes Poisson sampling at the same q.
    """
    n = len(data_loader)
    if n == 0:
        raise ValueError("empty data loader")
    return 1.0 / n, int(epochs) * n


# --------------------------------------------------------------------------------------------
# make_private
# --------------------------------------------------------------------------------------------


class _RoundStepHook:
    """The DP optimizer's step hook: feeds the throw-away accountant, counts, guards."""

    def __init__(self, inner: Callable[[DPOptimizer], None] | None, max_steps: int | None,
                 observe: Callable[[DPOptimizer], None] | None = None):
        self.inner, self.max_steps, self.observe = inner, max_steps, observe
        self.steps = 0

    def __call__(self, optim: DPOptimizer) -> None:
        # Runs after clipping and noising, before the parameters change: raising here means
        # the extra step never touches the model.
        if self.max_steps is not None and self.steps >= self.max_steps:
            raise StepLimitExceeded(
                f"step {self.steps + 1} refused: only {self.max_steps} steps were charged "
                f"to the site budget for this round"
            )
        self.steps += 1
        if self.inner is not None:
            self.inner(optim)
        if self.observe is not None:
            self.observe(optim)


def incompatible_layers(model: nn.Module) -> list[str]:
    """``["name (Type): reason", ...]`` for every layer Opacus refuses (empty when fine)."""
    out = []
    if not model.training:
        out.append("<model>: must be in training mode (call model.train())")
    for name, sub in trainable_modules(model):
        validator = ModuleValidator.VALIDATORS.get(type(sub))
        if validator is None:
            continue
        for err in validator(sub):
            reason = str(err).split(". ")[0].strip()
            out.append(f"{name or '<root>'} ({type(sub).__name__}): {reason}")
    return out


@dataclass(frozen=True)
class SiteRandomness:
    """The generators of a site's DP step. ``sampling`` (CPU) draws the Poisson masks and the
    clips of each unit; ``noise`` (on the training device) draws the Gaussian noise."""

    sampling: torch.Generator
    noise: torch.Generator
    kind: str  # "os-entropy", or "seeded" (node-config `dp-seed`: tests and comparisons only)

    @classmethod
    def for_site(cls, device: torch.device, seed: int | None = None) -> "SiteRandomness":
        """Fresh generators from `os.urandom`, or from ``seed`` when the site asked for it."""
        seeds = (seed, seed + 1) if seed is not None else (int.from_bytes(os.urandom(8), "little") for _ in range(2))
        sampling_seed, noise_seed = seeds
        sampling = torch.Generator(device="cpu").manual_seed(sampling_seed)
        noise = torch.Generator(device=device).manual_seed(noise_seed)
        return cls(sampling, noise, "seeded" if seed is not None else "os-entropy")


class UnitDataset(Dataset):
    """One item per privacy unit: up to ``clips_per_unit`` of its examples, drawn afresh with
    the site's generator every time the unit is sampled."""

    def __init__(self, examples: Dataset, units: Sequence[Sequence[int]], clips_per_unit: int,
                 generator: torch.Generator):
        if clips_per_unit < 1:
            raise ValueError(f"clips-per-unit = {clips_per_unit} must be at least 1")
        if not units or any(len(u) == 0 for u in units):
            raise ValueError("every privacy unit needs at least one example")
        self.examples, self.units = examples, [list(u) for u in units]
        self.clips_per_unit, self.generator = clips_per_unit, generator

    def __len__(self) -> int:
        return len(self.units)

    def __getitem__(self, unit: int) -> list[tuple]:
        members = self.units[unit]
        if len(members) > self.clips_per_unit:
            order = torch.randperm(len(members), generator=self.generator)[: self.clips_per_unit]
            members = [members[i] for i in order.tolist()]
        return [tuple(self.examples[i]) for i in members]


@dataclass(frozen=True)
class GivenGradient:
    """A unit whose gradient is given, not computed: ``value`` at one coordinate of the model's
    flattened trainable parameters, zero elsewhere (a Dirac audit canary, `privacy.canaries`).
    It is clipped and noised like every unit's gradient."""

    flat_index: int
    value: float


class UnitBatch(NamedTuple):
    """A step's sampled units: ``fields`` the clips' rows (empty when no unit with clips was
    sampled), ``unit_index[row]`` the row's unit, ``given`` the units with given gradients."""

    unit_index: torch.Tensor
    fields: tuple[torch.Tensor, ...]
    given: tuple[GivenGradient, ...]

    @property
    def units(self) -> int:
        return (int(self.unit_index.max()) + 1 if len(self.unit_index) else 0) + len(self.given)


def collate_units(batch: list[list]) -> UnitBatch:
    """Sampled units -> a `UnitBatch`: every clip a row. An empty unit (an audit canary that is
    not in the data) is dropped; no unit at all gives a batch of no rows (noise only)."""
    units = [unit for unit in batch if unit]
    given = tuple(unit[0] for unit in units if isinstance(unit[0], GivenGradient))
    with_clips = [unit for unit in units if not isinstance(unit[0], GivenGradient)]
    rows = [example for unit in with_clips for example in unit]
    unit_index = torch.tensor([u for u, unit in enumerate(with_clips) for _ in unit], dtype=torch.long)
    return UnitBatch(unit_index, tuple(default_collate(rows)) if rows else (), given)


def unit_loader(dataset: UnitDataset, batch_size: int, generator: torch.Generator) -> DataLoader:
    """Poisson sampling over units at rate 1/ceil(N / batch-size), ceil(N / batch-size) steps an
    epoch, with the site's generator.

    Built here, not by `PrivacyEngine.make_private`: its loader would draw the masks from its
    secure RNG, which is None without secure mode, i.e. from torch's global RNG (and Opacus's
    own empty-batch handling fails on these batches when the first one is empty)."""
    batches = math.ceil(len(dataset) / batch_size)
    sampler = UniformWithReplacementSampler(num_samples=len(dataset), sample_rate=1.0 / batches,
                                            generator=generator, steps=batches)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_units)


def pool_grad_samples(model: nn.Module, unit_index: torch.Tensor) -> None:
    """Replace each parameter's per-row gradients with per-unit gradients: the mean of the
    rows of each unit (its loss is the mean of its clips' losses). Call between backward and
    the optimizer step, so that Opacus clips and noises one gradient per unit."""
    units = int(unit_index.max()) + 1
    # One row per unit, in order (clips-per-unit 1): the rows already are the units' gradients.
    identity = len(unit_index) == units and torch.equal(unit_index, torch.arange(units))
    counts = torch.bincount(unit_index, minlength=units)
    for p in model.parameters():
        if not p.requires_grad or getattr(p, "grad_sample", None) is None:
            continue
        if not isinstance(p.grad_sample, torch.Tensor):
            raise TypeError("per-unit pooling needs one backward pass per step (no gradient accumulation)")
        rows = p.grad_sample
        if rows.shape[0] != len(unit_index):
            raise ValueError(f"{rows.shape[0]} per-row gradients for {len(unit_index)} rows")
        if identity:
            continue
        index = unit_index.to(rows.device)
        pooled = torch.zeros((units, *rows.shape[1:]), dtype=rows.dtype, device=rows.device).index_add_(0, index, rows)
        p.grad_sample = pooled / counts.to(rows.device, rows.dtype).view(-1, *([1] * (rows.dim() - 1)))


def make_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: DataLoader,
    noise_multiplier: float,
    max_grad_norm: float,
    grad_sample_mode: str = "hooks",
    poisson_sampling: bool = True,
    *,
    criterion: nn.Module | None = None,
    max_steps: int | None = None,
    noise_generator: torch.Generator | None = None,
    observe_step: Callable[[DPOptimizer], None] | None = None,
) -> tuple[Any, ...]:
    """Wrap (model, optimizer, data_loader) for DP-SGD with a fresh `opacus.PrivacyEngine`.

    Pass a loader that already samples (`unit_loader`, with the site's generator) and
    ``poisson_sampling=False``; ``poisson_sampling=True`` lets Opacus build the loader from
    torch's global RNG and is kept for tests and benchmarks only. ``noise_generator`` must live
    on the training device. Returns ``(model, optimizer, data_loader)``; with
    ``grad_sample_mode="ghost"`` ``(model, optimizer, criterion, data_loader)`` like Opacus,
    and the returned criterion must be used (backward on another silently skips clipping).

    ``max_steps``: the steps charged for this round; a further optimizer step raises
    `StepLimitExceeded` before it changes the parameters. ``observe_step(optimizer)`` is
    called at every step with the released gradient in ``p.grad`` (clipped, noised, averaged),
    before the parameters change (the audit canaries' white-box scores). Raises
    `IncompatibleModelError` listing every layer Opacus refuses.
    """
    if grad_sample_mode not in GRAD_SAMPLE_MODES:
        raise ValueError(
            f"grad_sample_mode must be one of {GRAD_SAMPLE_MODES}, got {grad_sample_mode!r}"
        )
    if not (noise_multiplier >= 0 and math.isfinite(noise_multiplier)):
        raise ValueError(f"noise-multiplier must be finite and >= 0, got {noise_multiplier!r}")
    if not (max_grad_norm > 0 and math.isfinite(max_grad_norm)):
        raise ValueError(f"max-grad-norm must be a finite number > 0, got {max_grad_norm!r}")
    if grad_sample_mode == "ghost" and criterion is None:
        raise ValueError(
            "grad_sample_mode='ghost' needs criterion=...: use the returned criterion for "
            "the loss, or clipping is silently skipped"
        )
    try:
        ModuleValidator.validate(model, strict=True)
    except UnsupportedModuleError:
        layers = incompatible_layers(model) or ["(see ModuleValidator.validate)"]
        raise IncompatibleModelError(
            "model is not compatible with Opacus DP-SGD; incompatible layers:\n  "
            + "\n  ".join(layers)
            + "\nopacus.validators.ModuleValidator.fix(model) replaces most of them "
            "(BatchNorm -> GroupNorm, LSTM -> DPLSTM, MultiheadAttention -> DPMultiheadAttention)"
        ) from None

    engine = PrivacyEngine(accountant="prv")  # throw-away: one round's steps only
    kwargs: dict[str, Any] = {}
    if criterion is not None:
        kwargs["criterion"] = criterion
    # Hooks and functorch modes: the hooks take the summed loss's gradients as they come, the
    # model's output gradient scaled once (`grad_samplers.sum_loss_gradients`).
    summed = grad_sample_mode in ("hooks", "functorch")
    wrapped = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=data_loader,
        noise_multiplier=float(noise_multiplier),
        max_grad_norm=float(max_grad_norm),
        poisson_sampling=poisson_sampling,
        grad_sample_mode=grad_sample_mode,
        noise_generator=noise_generator,
        loss_reduction="sum" if summed else "mean",
        **kwargs,
    )
    dp_optimizer = wrapped[1]
    if summed:  # the training loss stays a batch mean; removed with the model's hooks
        dp_optimizer.loss_reduction = "mean"  # the clipped sum divided by the expected batch
        wrapped[0].autograd_grad_sample_hooks.append(grad_samplers.sum_loss_gradients(model))
    if grad_sample_mode == "hooks":
        wrapped[0].autograd_grad_sample_hooks.append(grad_samplers.skip_batch_weight_gradients(model))
    dp_optimizer.attach_step_hook(_RoundStepHook(dp_optimizer.step_hook, max_steps, observe_step))
    return wrapped


def train_units(
    model: nn.Module, loader: DataLoader, optimizer: DPOptimizer, epochs: int, device: torch.device,
    step_loss: Callable[..., torch.Tensor],
) -> int:
    """DP-SGD over `unit_loader` batches for ``epochs`` epochs; returns the units seen.

    No loss or count leaves this function for the reply: it is the site's private data."""
    model.train()
    seen = 0
    for _ in range(epochs):
        for batch in loader:
            optimizer.zero_grad(set_to_none=True)
            if batch.fields:
                with warnings.catch_warnings():
                    # A trained layer whose input needs no gradient (the clip, a frozen layer's
                    # output): Opacus's hooks fire on its output's gradient, all they need.
                    warnings.filterwarnings("ignore", "Full backward hook is firing when gradients are computed "
                                            "with respect to module outputs", UserWarning)
                    step_loss(model, *[t.to(device) for t in batch.fields]).backward()
                pool_grad_samples(model, batch.unit_index)
            else:
                _no_rows(model)
            if batch.given:
                append_given_gradients(model, batch.given)
            optimizer.step()
            seen += batch.units
    return seen


def _no_rows(model: nn.Module) -> None:
    """No unit with clips was sampled: the step still happens (noise, and any given gradients).
    Skipping it would let the model tell that a step was empty, which depends on how many
    units the site has."""
    for p in model.parameters():
        if p.requires_grad:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)


def append_given_gradients(model: nn.Module, given: Sequence[GivenGradient]) -> None:
    """Append one per-unit gradient row per given unit, after the computed rows."""
    params = [p for p in model.parameters() if p.requires_grad]
    ends = np.cumsum([p.numel() for p in params])
    rows = [torch.zeros((len(given), p.numel()), dtype=p.dtype, device=p.device) for p in params]
    for row, unit in enumerate(given):
        owner = int(np.searchsorted(ends, unit.flat_index, side="right"))
        if owner >= len(params) or unit.flat_index < 0:
            raise ValueError(f"given gradient at coordinate {unit.flat_index}: the model has {ends[-1]}")
        rows[owner][row, unit.flat_index - (ends[owner - 1] if owner else 0)] = unit.value
    for p, extra in zip(params, rows):
        p.grad_sample = torch.cat([p.grad_sample, extra.view(len(given), *p.shape)])


def steps_taken(optimizer: DPOptimizer) -> int:
    """DP-SGD steps taken by an optimizer returned by `make_private`."""
    hook = getattr(optimizer, "step_hook", None)
    if not isinstance(hook, _RoundStepHook):
        raise TypeError("optimizer was not returned by privacy.dp_training.make_private")
    return hook.steps


# --------------------------------------------------------------------------------------------
# Checking per-sample clipping against the obvious implementation
# --------------------------------------------------------------------------------------------


def per_sample_grads_bruteforce(
    model: nn.Module, criterion: nn.Module, x: torch.Tensor, y: torch.Tensor
) -> list[list[torch.Tensor]]:
    """Per-example gradients computed the slow way: one backward per example."""
    params = [p for p in model.parameters() if p.requires_grad]
    out = []
    for i in range(x.shape[0]):
        loss = criterion(model(x[i : i + 1]), y[i : i + 1])
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        out.append([torch.zeros_like(p) if g is None else g.detach().clone()
                    for p, g in zip(params, grads)])
    return out


def clipped_mean_bruteforce(
    per_sample: list[list[torch.Tensor]], max_grad_norm: float
) -> list[torch.Tensor]:
    """Flat per-example clipping (Opacus's factor C/(norm+1e-6)) then average."""
    total = None
    for grads in per_sample:
        norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
        factor = torch.clamp(max_grad_norm / (norm + 1e-6), max=1.0)
        clipped = [g.double() * factor for g in grads]
        total = clipped if total is None else [a + b for a, b in zip(total, clipped)]
    return [t / len(per_sample) for t in total]


def check_per_sample_clipping(
    model_factory: Callable[[], nn.Module],
    x: torch.Tensor,
    y: torch.Tensor,
    grad_sample_mode: str = "hooks",
    criterion: nn.Module | None = None,
) -> float:
    """Max relative error between a DP step's gradient and brute-force clip-and-average.

    Noise 0, ``max_grad_norm`` = median per-sample norm (so about half the examples are
    clipped). ~1e-5 when Opacus really clips per sample; O(0.1-1) when it does not (e.g. a
    model that folds time into the batch). Use it on every registry model.
    """
    criterion = criterion or nn.CrossEntropyLoss()
    torch.manual_seed(0)
    ref = model_factory().train()
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    per_sample = per_sample_grads_bruteforce(ref, criterion, x, y)
    norms = torch.stack(
        [torch.sqrt(sum((g.double() ** 2).sum() for g in gs)) for gs in per_sample]
    )
    c = float(norms.median())
    expected = clipped_mean_bruteforce(per_sample, c)

    model = model_factory().train()
    model.load_state_dict(state)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    loader = DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=len(x))
    wrapped = make_private(
        model, opt, loader, noise_multiplier=0.0, max_grad_norm=c,
        grad_sample_mode=grad_sample_mode, poisson_sampling=False,
        criterion=criterion if grad_sample_mode == "ghost" else None,
    )
    dp_model, dp_opt = wrapped[0], wrapped[1]
    loss_fn = wrapped[2] if grad_sample_mode == "ghost" else criterion
    dp_opt.zero_grad()
    loss = loss_fn(dp_model(x), y)
    loss.backward()
    dp_opt.step()
    got = [torch.zeros_like(p, dtype=torch.float64) if p.grad is None else p.grad.double()
           for p in dp_model.parameters() if p.requires_grad]
    return gradient_rel_error(got, expected)


def gradient_rel_error(got: list[torch.Tensor], expected: list[torch.Tensor]) -> float:
    """||got - expected|| / ||expected|| over all tensors (flattened together)."""
    num = torch.sqrt(sum(((g.double() - e.double()) ** 2).sum() for g, e in zip(got, expected)))
    den = torch.sqrt(sum((e.double() ** 2).sum() for e in expected))
    return float(num / den)


# --------------------------------------------------------------------------------------------
# Central DP: clip a site's model update
# --------------------------------------------------------------------------------------------


def clip_update(
    new_params: list[np.ndarray], old_params: list[np.ndarray], clip_norm: float
) -> tuple[list[np.ndarray], float]:
    """Return ``old + clip(new - old)`` and the pre-clip update L2 norm (all arrays flat).

    The update is scaled by ``min(1, clip_norm / norm)`` in float64; if rounding
    ``old + update`` back to the parameter dtype pushes the update norm (measured in float64
    on the returned arrays) over ``clip_norm``, the scale is shrunk until it does not, so the
    guarantee holds for what is actually sent.
    Arrays keep their dtype and shape. Non-float arrays (integer buffers) are refused: they
    could carry unclipped information.
    """
    if not (clip_norm > 0 and math.isfinite(clip_norm)):
        raise ValueError(f"update-clip-norm must be a finite number > 0, got {clip_norm!r}")
    if len(new_params) != len(old_params):
        raise ValueError(f"{len(new_params)} new arrays vs {len(old_params)} old arrays")
    for i, (n, o) in enumerate(zip(new_params, old_params)):
        if n.shape != o.shape:
            raise ValueError(f"array {i}: shape {n.shape} vs {o.shape}")
        if not (np.issubdtype(n.dtype, np.floating) and np.issubdtype(o.dtype, np.floating)):
            raise TypeError(f"array {i}: non-float dtype {n.dtype}/{o.dtype} cannot be clipped")
    deltas = [n.astype(np.float64) - o.astype(np.float64) for n, o in zip(new_params, old_params)]
    norm = float(math.sqrt(sum(float(np.dot(d.ravel(), d.ravel())) for d in deltas)))
    if not math.isfinite(norm):
        raise ValueError("the model update has a NaN/inf entry; refusing to clip it")
    if norm <= clip_norm:
        return [n.copy() for n in new_params], norm
    scale = clip_norm / norm
    out = []
    for d, o in zip(deltas, old_params):
        o64 = o.astype(np.float64)
        r = (o64 + d * scale).astype(o.dtype)
        out.append(r)
    # Rounding back to the dtype can move the update by up to half an ulp of |old + d|
    # per entry. If that pushes the norm over the clip, shrink until it does not.
    for _ in range(60):
        got = math.sqrt(
            sum(float(np.sum((r.astype(np.float64) - o.astype(np.float64)) ** 2))
                for r, o in zip(out, old_params))
        )
        if got <= clip_norm:
            break
        scale *= clip_norm / got * (1 - 1e-7) if got > clip_norm * (1 + 1e-6) else (1 - 1e-6)
        out = [(o.astype(np.float64) + d * scale).astype(o.dtype)
               for d, o in zip(deltas, old_params)]
    else:  # could not fit after rounding: send no update at all (the safe fallback)
        out = [o.copy() for o in old_params]
    return out, norm
