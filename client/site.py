"""Which videos a site trains and validates on, in simulation and in deployment.

In deployment a SuperNode's node config names the site's own folder (`data-dir`). In
simulation one dataset (the run config's `data-dir`, or the built-in synthetic one) is split
into a central test part and N site partitions; every virtual site computes the same split
from the seed and keeps its own partition.
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Mapping

from client.dataset import ClipSet, ClipSpec, FrameAnonymizer, VideoItem, file_digest, load_clips, partition_items, scan_video_folder, split_items
from client.boxes import load_detection_clips, scan_detection_folder
from client.run_config import RunConfig
from client.synth_detect import is_complete as is_detection_complete, write_synthetic_detection_dataset
from client.synth import is_complete, write_synthetic_dataset
from privacy.anonymize import AnonymizerSettings, FaceAnonymizer
from privacy.site_budget import dataset_fingerprint


def fedvid_home() -> Path:
    """Where fedvid keeps data, caches, face models and runs: $FEDVID_HOME or ~/.fedvid."""
    return Path(os.environ.get("FEDVID_HOME", Path.home() / ".fedvid")).expanduser()


def builtin_data_dir(progress: bool = False, task: str = "classify") -> Path:
    """The built-in synthetic dataset of `task`, written on first use (once, even with many
    sites): labelled motion videos, or for `detect` videos of moving objects with boxes."""
    name, write = ("synth-detect", write_synthetic_detection_dataset) if task == "detect" else ("synth", write_synthetic_dataset)
    target = fedvid_home() / "data" / name
    complete = is_detection_complete if task == "detect" else is_complete
    if complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not complete(target):
            write(target, seed=0, progress=progress)
    return target


def dataset_dir(config: RunConfig) -> Path:
    """The run's dataset folder: `data-dir`, or the task's built-in data when it is empty."""
    return Path(config.data_dir).expanduser() if config.data_dir else builtin_data_dir(task=config.task)


def scan_dataset(config: RunConfig, root: Path) -> tuple[tuple[str, ...], list[VideoItem]]:
    """(classes, videos) of a dataset folder in the task's layout: videos with box
    annotations for `detect`, one sub-folder per class for the other tasks."""
    if config.task == "detect":
        return scan_detection_folder(root, config.class_names())
    return scan_video_folder(root, config.class_names())


def load_task_clips(
    config: RunConfig, items: list[VideoItem], spec: ClipSpec, anonymizer: FrameAnonymizer, cache: Path | None,
    progress: bool = False,
) -> ClipSet:
    """Anonymized clips of `items`, with each clip's boxes for `detect`."""
    load = load_detection_clips if config.task == "detect" else load_clips
    return load(items, spec, anonymizer, cache, progress=progress)


def federation_split(config: RunConfig) -> tuple[tuple[str, ...], list[VideoItem], list[VideoItem]]:
    """(classes, videos shared among sites, central test videos) of a simulated federation."""
    classes, items = scan_dataset(config, dataset_dir(config))
    shared, test = split_items(items, config.test_fraction, config.seed)
    return classes, shared, test


def site_items(config: RunConfig, node_config: Mapping) -> tuple[tuple[str, ...], list[VideoItem]]:
    """(classes, this site's videos) from the node config (deployment) or the partition (simulation)."""
    if node_config.get("data-dir"):
        return scan_dataset(config, Path(str(node_config["data-dir"])).expanduser())
    classes, shared, _ = federation_split(config)
    parts = partition_items(
        shared, int(node_config["num-partitions"]), config.partition, config.dirichlet_alpha, config.seed
    )
    return classes, parts[int(node_config["partition-id"])]


@lru_cache(maxsize=1)
def site_anonymizer() -> FaceAnonymizer:
    """The face anonymizer, loaded once per process; fails closed without a face model."""
    return FaceAnonymizer(AnonymizerSettings())


@dataclass
class SiteData:
    """A site's anonymized training and validation clips."""

    classes: tuple[str, ...]
    train: ClipSet
    val: ClipSet
    fingerprint: str  # of the training videos' content: the key of the site's privacy budget


def clip_spec(config: RunConfig) -> ClipSpec:
    return ClipSpec(config.clip_frames, config.frame_stride, config.frame_size)


def cache_dir(node_config: Mapping) -> Path:
    """The site's clip cache: node config `cache-dir`, else under fedvid's home."""
    return Path(str(node_config.get("cache-dir") or fedvid_home() / "cache")).expanduser()


def load_site_data(config: RunConfig, node_config: Mapping, anonymizer: FrameAnonymizer) -> SiteData:
    """Decode, anonymize and split this site's videos into training and validation clips."""
    classes, items = site_items(config, node_config)
    train_items, val_items = split_items(items, config.val_fraction, config.seed)
    if not train_items:
        raise ValueError(f"the site has {len(items)} videos: none left for training after val-fraction")
    spec, cache = clip_spec(config), cache_dir(node_config)
    train = load_task_clips(config, train_items, spec, anonymizer, cache)
    val = load_task_clips(config, val_items, spec, anonymizer, cache) if val_items else train
    fingerprint = dataset_fingerprint((f"{i.path.parent.name}/{i.path.name}", file_digest(i.path)) for i in train_items)
    return SiteData(classes, train, val, fingerprint)


def site_id(node_config: Mapping, node_id: int) -> str:
    """The site's name: node config `site-id`, else its simulation partition, else its node id."""
    if node_config.get("site-id"):
        return str(node_config["site-id"])
    if "partition-id" in node_config:
        return f"site-{int(node_config['partition-id'])}"
    return f"node-{node_id}"


def default_privacy_dir(node_config: Mapping, site: str, config: RunConfig, run_id: int) -> Path:
    """Where a site keeps its budget and ledger when its node config names no `privacy-dir`.

    A real site (node config `data-dir`) keeps one state across all runs on its data. A
    simulated site is a fresh virtual site of its run: its state lives in the run directory
    (`sites/SITE/`), so a resumed run finds the budget its sites already spent.
    """
    if node_config.get("data-dir"):
        return fedvid_home() / "privacy" / site
    if config.run_dir:
        return Path(config.run_dir).expanduser() / "sites" / site
    return fedvid_home() / "privacy" / "simulations" / str(run_id) / site
