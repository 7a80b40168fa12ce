"""A site's node config: the settings the site trusts, validated once, in one place.

The coordinator chooses the run config; the node config is the site's own (`flower-supernode
--node-config`), so everything that decides what a site's data may be used for lives here:
its budget and delta, its privacy unit, whether it ever trains without DP, whether exact
evaluation results may leave it. Unknown keys are refused (a misspelt `epsilon-budget` must
not silently become the default).

Simulated sites have no SuperNode of their own: `fedvid simulate` gives all of them the same
node config through the environment variable `FEDVID_SIMULATED_SITE_CONFIG` (JSON), which the
user, who plays every site, sets from `--node-config` and `--run-config 'dp=false'`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any, Mapping

from privacy.accounting import UNITS
from privacy.anonymize import ANONYMIZE_MODES, SMALLEST_FACES

SIMULATED_SITE_CONFIG = "FEDVID_SIMULATED_SITE_CONFIG"


@dataclass(frozen=True)
class NodeConfig:
    """A validated node config; attribute `epsilon_budget` is key `epsilon-budget`."""

    data_dir: str = ""               # the site's videos (deployment); empty: a simulated partition
    site_id: str = ""
    privacy_dir: str = ""            # budget, ledger and ledger key; default under fedvid's home
    cache_dir: str = ""
    device: str = ""
    epsilon_budget: float = 8.0      # per privacy unit, over every run
    delta: float = 1e-5              # the site's, never the run's; must be < 1/units
    privacy_unit: str = "video"      # "video", "person" (needs `subjects`) or "clip" (explicit opt-in)
    subjects: str = ""               # CSV `video,subject` (video relative to data-dir), for privacy-unit "person"
    allow_non_private: bool = False  # train rounds the run asks to run without DP (dp = false)
    allow_audit_canaries: bool = True  # take part in runs that plant audit canaries (`audit-canaries`)
    release_exact_eval: bool = False  # send exact validation metrics (those units lose their DP guarantee)
    val_fraction: float = 0.2        # units held out for evaluation, only with release-exact-eval
    dp_seed: int = -1                # >= 0: seeded DP noise and sampling (tests, comparisons); -1: os entropy
    allowed_fab_hashes: str = ""     # comma-separated SHA-256 of the app bundles the site runs
    anonymize_mode: str = "faces"    # "faces", or "faces+heads": also hide moving people's heads
    anonymize_workers: int = 0       # processes that anonymize the site's videos; 0: one per core, at most 8
    anonymize_int8: bool = True      # small faces found by the int8 network (faster); false: the float one (less collateral)
    anonymize_smallest_face: int = 14  # px: the smallest faces a video's levels find (20 faster, 12 about half as fast)
    partition_id: int = -1           # simulation only (set by Flower)
    num_partitions: int = 0          # simulation only (set by Flower)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "NodeConfig":
        """Build from Flower's node config, plus the simulated-site settings for a simulated
        site; raise ValueError naming the key."""
        values = dict(values)
        if not values.get("data-dir") and os.environ.get(SIMULATED_SITE_CONFIG):
            values = {**json.loads(os.environ[SIMULATED_SITE_CONFIG]), **values}
        known = {f.name.replace("_", "-"): f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"unknown node-config key(s): {', '.join(unknown)}")
        kwargs = {known[key].name: _coerce(key, value, type(getattr(cls, known[key].name)))
                  for key, value in values.items()}
        config = cls(**kwargs)
        config.check()
        return config

    def check(self) -> None:
        if not self.epsilon_budget > 0:
            raise ValueError(f"node-config epsilon-budget = {self.epsilon_budget} must be > 0")
        if not 0 < self.delta < 1:
            raise ValueError(f"node-config delta = {self.delta} must be in (0, 1)")
        if self.privacy_unit not in UNITS:
            raise ValueError(f"node-config privacy-unit = {self.privacy_unit!r} must be one of {', '.join(UNITS)}")
        if self.privacy_unit == "person" and not self.subjects:
            raise ValueError("node-config privacy-unit = \"person\" needs subjects: a CSV of video,subject")
        if self.anonymize_mode not in ANONYMIZE_MODES:
            raise ValueError(f"node-config anonymize-mode = {self.anonymize_mode!r} must be one of "
                             f"{', '.join(ANONYMIZE_MODES)}")
        if self.anonymize_smallest_face not in SMALLEST_FACES:
            raise ValueError(f"node-config anonymize-smallest-face = {self.anonymize_smallest_face} must be "
                             f"one of {', '.join(map(str, SMALLEST_FACES))} (pixels of the frame)")
        if self.anonymize_workers < 0:
            raise ValueError(f"node-config anonymize-workers = {self.anonymize_workers} must be >= 0 "
                             "(0: one per core)")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"node-config val-fraction = {self.val_fraction} must be in [0, 1)")
        if not self.data_dir and self.partition_id < 0:
            raise ValueError("node-config data-dir is not set: the site has no videos")

    @property
    def simulated(self) -> bool:
        return not self.data_dir

    @property
    def seed(self) -> int | None:
        """The DP seed the site chose, or None: noise and sampling from the OS's entropy."""
        return self.dp_seed if self.dp_seed >= 0 else None


def _coerce(key: str, value: Any, kind: type) -> Any:
    if kind is bool and isinstance(value, bool):
        return value
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is str and isinstance(value, str):
        return value
    raise ValueError(f"node-config key {key} = {value!r} must be of type {kind.__name__}")
