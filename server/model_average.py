"""Run-config key `ema-decay`: the run's model is an exponential moving average of the global
model over rounds, not the last round's model alone.

Under DP every round's aggregate is noisy; averaging the sequence of global models cancels part
of that noise (Polyak averaging). The average is computed at the coordinator from the global
models it has already released, so it is post-processing: it costs no privacy. The sites keep
training from the last round's model; only what the run evaluates and saves is the average.
"""

from __future__ import annotations

import torch


class ModelAverage:
    """`state` after a round: decay * `state` before + (1 - decay) * the round's model; the first
    round's model itself. Tensors that are not floating point (counters) take the newest value."""

    def __init__(self, decay: float, state: dict[str, torch.Tensor] | None = None):
        self.decay, self.state = decay, state

    def update(self, model_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.state is None:
            self.state = {k: v.detach().clone() for k, v in model_state.items()}
        else:
            self.state = {k: self.decay * self.state[k] + (1 - self.decay) * v if v.is_floating_point() else v.clone()
                          for k, v in model_state.items()}
        return self.state
