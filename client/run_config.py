"""The run config: Flower's `[tool.flwr.app.config]`, validated once, in one place.

Keys are kebab-case (`num-server-rounds`); every error names the key it is about, and a bad
config is refused before any site trains.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from models.registry import ModelSpec, check_model_choice


AGGREGATIONS = ("fedavg", "median", "trimmed-mean", "krum")


MAX_CANARIES = 100_000  # each is a unit in the site budget; a hostile run must not fill the disk

# Keys whose value 0 means "the task's own default", and those defaults, as pyproject.toml's
# `[tool.flwr.app.config.task-defaults.TASK]` tables declare them (Flower flattens a table into
# keys `task-defaults.TASK.KEY`, which a run config may override like any other key).
# `pretrain-learning-rate` is `fedvid pretrain`'s (non-private, on public data), apart from the
# federation's: a DP recipe's rate (0.1 for a head alone) makes full training diverge.
TASK_DEFAULT_KEYS = ("learning-rate", "pretrain-learning-rate")
TASK_DEFAULTS: dict[str, dict[str, float]] = {
    "classify": {"learning-rate": 0.003, "pretrain-learning-rate": 0.001},  # 0.001: off its plateau sooner
    "detect": {"learning-rate": 0.003, "pretrain-learning-rate": 0.003},
    "generate": {"learning-rate": 0.0003, "pretrain-learning-rate": 0.0003},  # measured better than 0.003 under DP
    "enhance": {"learning-rate": 0.0003, "pretrain-learning-rate": 0.0003},
}
TASK_DEFAULTS_PREFIX = "task-defaults."


@dataclass(frozen=True)
class RunConfig:
    """A validated run config; attribute `num_server_rounds` is key `num-server-rounds`."""

    task: str = "classify"
    model: str = "cnn3d"
    model_size: str = "small"
    num_server_rounds: int = 16
    local_epochs: int = 3
    learning_rate: float = 0.0  # 0: the task's default (TASK_DEFAULTS)
    pretrain_learning_rate: float = 0.0  # 0: the task's default; `fedvid pretrain` only
    batch_size: int = 120
    clips_per_unit: int = 1
    clip_frames: int = 8
    frame_stride: int = 2
    frame_size: int = 48
    data_dir: str = ""
    classes: str = ""
    partition: str = "iid"
    dirichlet_alpha: float = 0.5
    val_fraction: float = 0.2
    test_fraction: float = 0.2
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_sites: int = 2
    central_eval: bool = True
    seed: int = 0
    run_dir: str = ""
    dp: bool = True
    target_epsilon: float = 8.0
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    noise_multiplier: float = 0.0
    grad_sample_mode: str = "hooks"
    update_clip_norm: float = 10.0
    server_noise_multiplier: float = 0.0
    audit_canaries: int = 0
    audit_canary_kind: str = "gradient"
    aggregation: str = "fedavg"
    resume: bool = False
    round_timeout: float = 3600.0
    init_from: str = ""
    trainable_layers: str = ""
    ema_decay: float = 0.0
    task_defaults: tuple[tuple[str, str, float], ...] = tuple(sorted(
        (task, key, value) for task, values in TASK_DEFAULTS.items() for key, value in values.items()
    ))

    def __post_init__(self) -> None:
        # Resolved once: every reader of `learning_rate` sees the value the run trains with.
        defaults = {(task, key): value for task, key, value in self.task_defaults}
        for key in TASK_DEFAULT_KEYS:
            name = key.replace("-", "_")
            if getattr(self, name) == 0 and (self.task, key) in defaults:
                object.__setattr__(self, name, defaults[(self.task, key)])

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "RunConfig":
        """Build from a Flower run config (kebab-case keys); raise ValueError naming the key."""
        known = {f.name.replace("_", "-"): f for f in dataclasses.fields(cls) if f.name != "task_defaults"}
        plain = {k: v for k, v in values.items() if not k.startswith(TASK_DEFAULTS_PREFIX)}
        unknown = sorted(set(plain) - set(known))
        if unknown:
            raise ValueError(f"unknown run-config key(s): {', '.join(unknown)}")
        kwargs = {}
        for key, value in plain.items():
            kwargs[known[key].name] = _coerce(key, value, type(getattr(cls, known[key].name)))
        kwargs["task_defaults"] = _task_defaults(values)
        config = cls(**kwargs)
        config.check()
        return config

    def to_mapping(self) -> dict[str, Any]:
        """The config as kebab-case keys, e.g. for `config.json`."""
        values = {f.name.replace("_", "-"): getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "task_defaults"}
        values.update({f"{TASK_DEFAULTS_PREFIX}{task}.{key}": value for task, key, value in self.task_defaults})
        return values

    def check(self) -> None:
        """Raise ValueError naming the key of the first bad value."""
        check_model_choice(self.task, self.model, self.model_size)
        positive = ("num_server_rounds", "local_epochs", "batch_size", "clips_per_unit", "clip_frames", "frame_stride", "min_sites")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{_key(name)} = {getattr(self, name)} must be at least 1")
        if self.frame_size < 16:
            raise ValueError(f"frame-size = {self.frame_size} must be at least 16 pixels")
        for name in ("learning_rate", "pretrain_learning_rate"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{_key(name)} = {getattr(self, name)} must be > 0")
        if self.partition not in ("iid", "dirichlet"):
            raise ValueError(f"partition = {self.partition!r} must be 'iid' or 'dirichlet'")
        if not self.dirichlet_alpha > 0:
            raise ValueError(f"dirichlet-alpha = {self.dirichlet_alpha} must be > 0")
        for name in ("val_fraction", "test_fraction"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{_key(name)} = {getattr(self, name)} must be in [0, 1)")
        self.check_dp()
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation = {self.aggregation!r} must be one of {', '.join(AGGREGATIONS)}")
        if self.aggregation != "fedavg" and self.dp and self.server_noise_multiplier > 0:
            # The central noise is calibrated to the sensitivity of a mean of clipped updates.
            raise ValueError(f"aggregation = {self.aggregation!r} cannot be combined with server-noise-multiplier > 0")
        if self.resume and not self.run_dir:
            raise ValueError("resume = true needs run-dir: the directory of the run to continue")
        if not self.round_timeout > 0:
            raise ValueError(f"round-timeout = {self.round_timeout} must be > 0 seconds")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema-decay = {self.ema_decay} must be in [0, 1) (0: the run's model is the last round's)")
        for name in ("fraction_train", "fraction_evaluate"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{_key(name)} = {getattr(self, name)} must be in (0, 1]")

    def check_dp(self) -> None:
        """DP settings that are wrong whatever the data (delta < 1/N is checked at each site)."""
        if not self.target_epsilon > 0:
            raise ValueError(f"target-epsilon = {self.target_epsilon} must be > 0")
        if not 0 < self.delta < 1:
            raise ValueError(f"delta = {self.delta} must be in (0, 1)")
        if not self.max_grad_norm > 0:
            raise ValueError(f"max-grad-norm = {self.max_grad_norm} must be > 0")
        if self.noise_multiplier < 0:
            raise ValueError(f"noise-multiplier = {self.noise_multiplier} must be > 0 (or 0: derive it from target-epsilon)")
        if not self.update_clip_norm > 0:
            raise ValueError(f"update-clip-norm = {self.update_clip_norm} must be > 0")
        if self.server_noise_multiplier < 0:
            raise ValueError(f"server-noise-multiplier = {self.server_noise_multiplier} must be >= 0")
        if self.audit_canaries < 0 or self.audit_canaries == 1 or self.audit_canaries > MAX_CANARIES:
            raise ValueError(f"audit-canaries = {self.audit_canaries} must be 0 (no audit) or in [2, {MAX_CANARIES}]")
        if self.audit_canary_kind not in ("gradient", "input"):
            raise ValueError(f"audit-canary-kind = {self.audit_canary_kind!r} must be 'gradient' or 'input'")
        if self.audit_canaries and self.audit_canary_kind == "input" and self.task != "classify":
            raise ValueError(f"audit-canary-kind = 'input' needs task = 'classify' (random-label clips); "
                             f"task = {self.task!r} takes 'gradient' canaries")
        if self.audit_canaries and not self.dp:
            raise ValueError("audit-canaries needs dp = true: there is no epsilon to audit without DP")
        # Ghost clipping is left out: it needs Opacus's wrapped criterion and measured slowest
        # on convolutional video models.
        if self.grad_sample_mode not in ("hooks", "functorch"):
            raise ValueError(f"grad-sample-mode = {self.grad_sample_mode!r} must be 'hooks' or 'functorch'")

    def model_spec(self, num_classes: int) -> ModelSpec:
        """The model every party builds for this run."""
        return ModelSpec(self.task, self.model, self.model_size, num_classes, self.clip_frames, self.frame_size)

    def class_names(self) -> tuple[str, ...] | None:
        """Class names fixed by the `classes` key, or None to take them from the data."""
        names = tuple(n.strip() for n in self.classes.split(",") if n.strip())
        return names or None


def _task_defaults(values: Mapping[str, Any]) -> tuple[tuple[str, str, float], ...]:
    """TASK_DEFAULTS overlaid with the run config's `task-defaults.TASK.KEY` keys, checked."""
    merged = {(task, key): value for task, keys in TASK_DEFAULTS.items() for key, value in keys.items()}
    for name, value in values.items():
        if not name.startswith(TASK_DEFAULTS_PREFIX):
            continue
        task, _, key = name.removeprefix(TASK_DEFAULTS_PREFIX).partition(".")
        if task not in TASK_DEFAULTS or key not in TASK_DEFAULT_KEYS:
            raise ValueError(f"unknown run-config key {name}: task defaults are task-defaults.TASK.KEY with TASK in "
                             f"{', '.join(TASK_DEFAULTS)} and KEY in {', '.join(TASK_DEFAULT_KEYS)}")
        merged[(task, key)] = _coerce(name, value, float)
        if not merged[(task, key)] > 0:
            raise ValueError(f"{name} = {value} must be > 0")
    return tuple(sorted((task, key, value) for (task, key), value in merged.items()))


def _key(name: str) -> str:
    return name.replace("_", "-")


def _coerce(key: str, value: Any, kind: type) -> Any:
    """Check a value's type against the default's; ints are accepted where floats are."""
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(value, kind):
        return value
    raise ValueError(f"run-config key {key} = {value!r} must be of type {kind.__name__}")
