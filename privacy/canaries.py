"""Audit canaries at a site: privacy units planted to measure, after training, how well they can
be told in from out (one-run auditing, Steinke, Nasr and Jagielski, NeurIPS 2023).

A run asks for ``audit-canaries = m``; a site may refuse through node config
``allow-audit-canaries = false``. The site then makes m canaries from its own secret and
includes each with probability 1/2, independently. The secret, the membership and the scores
stay in ``PRIVACY_DIR/canaries/RUN_ID.json``; nothing of them leaves the site. The set is fixed
at the run's first round: a coordinator that changes the key mid-run changes nothing.

Two kinds (run config ``audit-canary-kind``):

* ``gradient`` (white box, any task): a Dirac canary is a unit whose gradient is given, not
  computed: ``DIRAC_SCALE * max-grad-norm`` at one coordinate of the model, with a random sign,
  zero elsewhere. It goes through the same Poisson sampling, clipping and noise as every unit.
  Its score is the noisy gradient the DP-SGD step released at its coordinate, times its sign,
  summed over every step of the run: the transcript DP-SGD's guarantee covers.
* ``input`` (black box, task ``classify``): a canary is a clip of uniform noise with a random
  label. Its score is how much the site's model lowered its loss over the run (loss on the
  model the site received first, minus loss on the model it trained last).

Each canary is a privacy unit like any other: an included one is charged to the site budget
(unit id ``canary:RUN:I``), and the sample rate counts all m slots, included or not, so the
mechanism's public parameters do not depend on which canaries are in.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from privacy.dp_training import GivenGradient
from privacy.durable import atomic_write_json

KINDS = ("gradient", "input")
# A Dirac canary asks for 100x the clipping norm: an honest step clips it to max-grad-norm, a
# step that does not clip lets the whole of it through, and the audit sees that.
DIRAC_SCALE = 100.0
FOLDER = "canaries"


class CanaryError(ValueError):
    """A canary set that cannot serve this run (wrong model size, task or kind)."""


@dataclass
class RunCanaries:
    """One run's canaries at one site, and their scores so far."""

    path: Path
    run_id: str
    kind: str
    included: np.ndarray  # (m,) bool
    secret: str  # hex; the membership and every canary derive from it
    scores: np.ndarray  # (m,) float64: summed released gradient (gradient) or loss drop (input)
    start_loss: np.ndarray | None = None  # input canaries: loss on the first model received
    rounds: list[int] = field(default_factory=list)

    # ---------------------------------------------------------------- create, load, save

    @classmethod
    def for_run(cls, privacy_dir: Path, run_id: str, kind: str, count: int,
                seed: int | None = None) -> "RunCanaries":
        """The run's canaries: read when the site made them at an earlier round, else made now
        (from ``os.urandom``, or from the site's ``dp-seed``) and written before any training."""
        path = cls.path_for(privacy_dir, run_id)
        if path.exists():
            return cls.load(path)
        if kind not in KINDS:
            raise CanaryError(f"audit-canary-kind = {kind!r} must be one of {', '.join(KINDS)}")
        if count < 2:
            raise CanaryError(f"audit-canaries = {count} must be at least 2 (or 0: no audit)")
        secret = (hashlib.sha256(f"fedvid-canaries:{seed}:{run_id}".encode()).hexdigest()
                  if seed is not None else os.urandom(32).hex())
        included = _rng(secret, 0).random(count) < 0.5
        canaries = cls(path, str(run_id), kind, included, secret, np.zeros(count))
        path.parent.mkdir(parents=True, exist_ok=True)
        canaries.save()
        return canaries

    @staticmethod
    def path_for(privacy_dir: Path, run_id: str) -> Path:
        return Path(privacy_dir) / FOLDER / f"{run_id}.json"

    @classmethod
    def exists(cls, privacy_dir: Path, run_id: str) -> bool:
        return cls.path_for(privacy_dir, run_id).exists()

    @classmethod
    def load(cls, path: Path) -> "RunCanaries":
        try:
            state = json.loads(Path(path).read_text())
            start = state.get("start_loss")
            return cls(Path(path), str(state["run_id"]), state["kind"], np.array(state["included"], dtype=bool),
                       state["secret"], np.array(state["scores"], dtype=np.float64),
                       None if start is None else np.array(start, dtype=np.float64), list(state["rounds"]))
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise CanaryError(f"canary file {path} is unreadable: {err}") from None

    def save(self) -> None:
        atomic_write_json(self.path, {
            "run_id": self.run_id, "kind": self.kind, "included": self.included.astype(int).tolist(),
            "secret": self.secret, "scores": self.scores.tolist(), "rounds": self.rounds,
            "start_loss": None if self.start_loss is None else self.start_loss.tolist(),
        })

    @property
    def count(self) -> int:
        return len(self.included)

    def unit_ids(self) -> list[str]:
        """The budget's ids of the included canaries (the out ones are in no data)."""
        return [f"canary:{self.run_id}:{i}" for i in np.flatnonzero(self.included)]

    # ---------------------------------------------------------------- the canaries themselves

    def dirac(self, parameters: int) -> tuple[np.ndarray, np.ndarray]:
        """(coordinates, signs) of the Dirac canaries in a model of ``parameters`` trainable
        numbers, distinct coordinates, the same at every round."""
        if parameters < self.count:
            raise CanaryError(f"{self.count} gradient canaries need a model with at least as many "
                              f"parameters; it has {parameters}")
        rng = _rng(self.secret, 1)
        return rng.choice(parameters, size=self.count, replace=False), rng.choice((-1.0, 1.0), size=self.count)

    def input_example(self, index: int, like: torch.Tensor, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Canary ``index`` as an example: uniform noise shaped like ``like``, a random label."""
        rng = _rng(self.secret, 2, index)
        clip = torch.from_numpy(rng.random(tuple(like.shape), dtype=np.float32)).to(like.dtype)
        return clip, torch.tensor(int(rng.integers(classes)), dtype=torch.long)

    def slots(self, examples: Dataset, model: nn.Module, max_grad_norm: float, classes: int) -> "CanarySlots":
        """The m dataset slots the unit loader samples beside the site's units."""
        if self.kind == "gradient":
            coordinates, signs = self.dirac(trainable_count(model))
            values = signs * DIRAC_SCALE * max_grad_norm
            return CanarySlots(self.included, lambda i: [GivenGradient(int(coordinates[i]), float(values[i]))])
        like = examples[0][0]
        return CanarySlots(self.included, lambda i: [self.input_example(i, like, classes)])

    # ---------------------------------------------------------------- scores

    def gradient_observer(self, model: nn.Module) -> "DiracObserver":
        coordinates, signs = self.dirac(trainable_count(model))
        return DiracObserver(trainable_parameters(model), coordinates, signs)

    def input_losses(self, model: nn.Module, like: torch.Tensor, classes: int, device: torch.device) -> np.ndarray:
        """Cross-entropy of every canary (in and out) under ``model``."""
        losses = []
        was_training = model.training
        model.eval()
        with torch.no_grad():
            for start in range(0, self.count, 64):
                batch = [self.input_example(i, like, classes) for i in range(start, min(start + 64, self.count))]
                clips = torch.stack([c for c, _ in batch]).to(device)
                labels = torch.stack([y for _, y in batch]).to(device)
                losses.append(nn.functional.cross_entropy(model(clips), labels, reduction="none").double().cpu())
        model.train(was_training)
        return torch.cat(losses).numpy()

    # ---------------------------------------------------------------- a round

    def start_round(self, model: nn.Module, examples: Dataset, classes: int,
                    device: torch.device) -> "DiracObserver | None":
        """Before training: the step observer (gradient canaries), or the loss on the first
        model received (input canaries, once per run)."""
        if self.kind == "gradient":
            return self.gradient_observer(model)
        if self.start_loss is None:
            self.start_loss = self.input_losses(model, examples[0][0], classes, device)
            self.save()
        return None

    def finish_round(self, server_round: int, model: nn.Module, observer: "DiracObserver | None",
                     examples: Dataset, classes: int, device: torch.device) -> None:
        """After training: gradient scores add up over rounds; input scores are the loss drop
        from the first model received to the one just trained."""
        if self.kind == "gradient":
            self.scores = self.scores + observer.scores
        else:
            self.scores = self.start_loss - self.input_losses(model, examples[0][0], classes, device)
        self.rounds.append(int(server_round))
        self.save()


class CanarySlots(Dataset):
    """m slots: an included canary gives its unit (one example, or one given gradient); an out
    one gives an empty unit, which the collate drops: sampling it is sampling nothing."""

    def __init__(self, included: np.ndarray, unit: Callable[[int], list]):
        self.included, self.unit = included, unit  # canaries are made when sampled, not held

    def __len__(self) -> int:
        return len(self.included)

    def __getitem__(self, index: int) -> list:
        return self.unit(index) if self.included[index] else []


class DiracObserver:
    """The DP step's observer: reads the released (clipped, noised, averaged) gradient at every
    canary's coordinate, in and out alike, and sums it times the canary's sign."""

    def __init__(self, parameters: list[torch.Tensor], coordinates: np.ndarray, signs: np.ndarray):
        self.locate = locate_coordinates(parameters, coordinates)
        self.parameters, self.signs = parameters, signs
        self.scores = np.zeros(len(coordinates))

    def __call__(self, optimizer) -> None:
        released = np.zeros(len(self.signs))
        for p_index, (canaries, offsets) in self.locate.items():
            grad = self.parameters[p_index].grad.detach().reshape(-1)
            released[canaries] = grad[offsets].double().cpu().numpy()
        self.scores += self.signs * released


def trainable_parameters(model: nn.Module) -> list[torch.Tensor]:
    """The parameters DP-SGD updates, in the order the optimizer and the Dirac indices use."""
    return [p for p in model.parameters() if p.requires_grad]


def trainable_count(model: nn.Module) -> int:
    return sum(p.numel() for p in trainable_parameters(model))


def locate_coordinates(parameters: list[torch.Tensor], coordinates: np.ndarray) -> dict[int, tuple]:
    """{parameter index: (canary indices, offsets inside that parameter)} for flat coordinates."""
    ends = np.cumsum([p.numel() for p in parameters])
    owner = np.searchsorted(ends, coordinates, side="right")
    starts = np.concatenate([[0], ends[:-1]])
    out = {}
    for p_index in np.unique(owner):
        canaries = np.flatnonzero(owner == p_index)
        offsets = torch.as_tensor(coordinates[canaries] - starts[p_index], dtype=torch.long)
        out[int(p_index)] = (canaries, offsets.to(parameters[p_index].device))
    return out


def _rng(secret: str, stream: int, *more: int) -> np.random.Generator:
    """Independent streams of one secret: membership (0), Dirac coordinates (1), input clips (2, i)."""
    return np.random.default_rng(np.random.SeedSequence(int(secret, 16), spawn_key=(stream, *more)))
