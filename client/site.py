"""Which videos a site trains and validates on, in simulation and in deployment.

In deployment a SuperNode's node config names the site's own folder (`data-dir`). In
simulation one dataset (the run config's `data-dir`, or the built-in synthetic one) is split
into a central test part and N site partitions; every virtual site computes the same split
from the seed and keeps its own partition.
"""

from __future__ import annotations

import csv
import fcntl
import hashlib
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from client.dataset import ClipSet, ClipSpec, DataError, FrameAnonymizer, VideoItem, file_digest, load_clips, partition_items, scan_video_folder, split_items
from client.boxes import load_detection_clips, scan_detection_folder
from client.run_config import RunConfig
from client.synth_detect import is_complete as is_detection_complete, write_synthetic_detection_dataset
from client.synth import is_complete, write_synthetic_dataset
from privacy.anonymize import AnonymizerSettings, FaceAnonymizer
from client.node_config import NodeConfig
from privacy.durable import atomic_write_bytes


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
    progress: bool = False, workers: int = 0,
) -> ClipSet:
    """Anonymized clips of `items`, with each clip's boxes for `detect`; `workers` processes
    anonymize the videos not yet cached (0: one per core, at most 8)."""
    load = load_detection_clips if config.task == "detect" else load_clips
    return load(items, spec, anonymizer, cache, progress=progress, workers=workers)


def federation_split(config: RunConfig) -> tuple[tuple[str, ...], list[VideoItem], list[VideoItem]]:
    """(classes, videos shared among sites, central test videos) of a simulated federation."""
    classes, items = scan_dataset(config, dataset_dir(config))
    shared, test = split_items(items, config.test_fraction, config.seed)
    return classes, shared, test


def site_items(config: RunConfig, node: NodeConfig) -> tuple[tuple[str, ...], list[VideoItem]]:
    """(classes, this site's videos) from the node config (deployment) or the partition (simulation)."""
    if node.data_dir:
        return scan_dataset(config, Path(node.data_dir).expanduser())
    classes, shared, _ = federation_split(config)
    parts = partition_items(shared, node.num_partitions, config.partition, config.dirichlet_alpha, config.seed)
    return classes, parts[node.partition_id]


@lru_cache(maxsize=1)
def site_anonymizer(mode: str = "faces", int8: bool = True, smallest_face: int = 14) -> FaceAnonymizer:
    """The anonymizer for node-config `anonymize-mode`, `anonymize-int8` and
    `anonymize-smallest-face`, loaded once per process; fails closed without a face model."""
    return FaceAnonymizer(AnonymizerSettings.for_mode(mode, smallest_face, int8=int8))


def node_anonymizer(node: NodeConfig) -> FaceAnonymizer:
    """The anonymizer a site's node config asks for."""
    return site_anonymizer(node.anonymize_mode, node.anonymize_int8, node.anonymize_smallest_face)


@dataclass
class PrivacyUnits:
    """The site's privacy units: an id each (it never leaves the site) and its clips' indices."""

    kind: str  # "video", "person" or "clip"
    ids: list[str]
    members: list[list[int]]

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class SiteData:
    """A site's anonymized training clips, grouped into privacy units, and its validation clips
    (only when the site releases exact evaluation)."""

    classes: tuple[str, ...]
    train: ClipSet
    units: PrivacyUnits
    val: ClipSet | None
    val_units: list[str]


def clip_spec(config: RunConfig) -> ClipSpec:
    return ClipSpec(config.clip_frames, config.frame_stride, config.frame_size)


def cache_dir(node: NodeConfig | None = None) -> Path:
    """The site's clip cache: node config `cache-dir`, else under fedvid's home."""
    return Path(node.cache_dir if node and node.cache_dir else fedvid_home() / "cache").expanduser()


def load_site_data(config: RunConfig, node: NodeConfig, anonymizer: FrameAnonymizer, privacy_dir: Path) -> SiteData:
    """Decode, anonymize and group this site's videos into privacy units, holding out units for
    validation only when the site releases exact evaluation."""
    classes, items = site_items(config, node)
    unit_of = unit_keys(items, node)
    train_items, val_items = items, []
    if node.release_exact_eval:
        train_items, val_items = (split_items(items, config.val_fraction, config.seed) if node.simulated
                                  else pinned_split(items, unit_of, node.val_fraction, privacy_dir))
    if not train_items:
        raise DataError(f"the site has {len(items)} videos: none left for training after val-fraction")
    spec, cache = clip_spec(config), cache_dir(node)
    workers = node.anonymize_workers
    train = load_task_clips(config, train_items, spec, anonymizer, cache, workers=workers)
    val = load_task_clips(config, val_items, spec, anonymizer, cache, workers=workers) if val_items else None
    by_digest = {file_digest(i.path): unit_of[i.path] for i in items}
    val_units = sorted({by_digest[d] for d in val.sources}) if val is not None else []
    return SiteData(classes, train, privacy_units(train, node.privacy_unit, by_digest), val, val_units)


def unit_keys(items: list[VideoItem], node: NodeConfig) -> dict[Path, str]:
    """Each video's privacy unit: its content digest (a re-encoded copy is another unit), or
    for `privacy-unit = "person"` the people in it, from the site's `subjects` manifest.
    Videos that share a person are one unit (removing a person removes all of them)."""
    if node.privacy_unit != "person":
        return {i.path: file_digest(i.path) for i in items}
    root = Path(node.data_dir).expanduser() if node.data_dir else None
    manifest = Path(node.subjects).expanduser()
    if not manifest.is_file():
        raise DataError(f"subjects manifest {manifest} does not exist")
    people: dict[str, set[str]] = {}
    with open(manifest, newline="") as f:
        for line, row in enumerate(csv.reader(f), start=1):
            if not row or row[0].startswith("#") or row[:2] == ["video", "subject"]:
                continue
            if len(row) != 2 or not row[1].strip():
                raise DataError(f"{manifest}:{line}: expected `video,subject`, got {row}")
            people.setdefault(row[0].strip(), set()).add(row[1].strip())
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            x = parent[x]
        return x

    keys = {}
    for item in items:
        name = str(item.path.relative_to(root)) if root else item.path.name
        if name not in people:
            raise DataError(f"{manifest}: video {name} has no subject: every video needs one (privacy-unit person)")
        first, *rest = sorted(people[name])
        for other in rest:
            parent[find(other)] = find(first)
        keys[item.path] = first
    return {path: "person:" + find(subject) for path, subject in keys.items()}


def pinned_split(items: list[VideoItem], unit_of: dict[Path, str], fraction: float,
                 privacy_dir: Path) -> tuple[list[VideoItem], list[VideoItem]]:
    """(train, val) fixed by the site: a unit is held out when a keyed hash of it falls below
    `fraction`. The key is the site's own (PRIVACY_DIR/split-key), so the coordinator's seed
    cannot move units between the splits, and a unit keeps its side as videos are added."""
    path = Path(privacy_dir) / "split-key"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, os.urandom(32).hex().encode())
    key = path.read_bytes()
    held = {u for u in set(unit_of.values())
            if int(hashlib.sha256(key + u.encode()).hexdigest()[:15], 16) < fraction * 16 ** 15}
    return [i for i in items if unit_of[i.path] not in held], [i for i in items if unit_of[i.path] in held]


def privacy_units(train: ClipSet, kind: str, unit_of_video: dict[str, str]) -> PrivacyUnits:
    """Group the training clips into privacy units (a clip is its own unit for kind "clip")."""
    groups: dict[str, list[int]] = {}
    clips_seen: dict[str, int] = {}
    for index, digest in enumerate(train.sources):
        nth = clips_seen[digest] = clips_seen.get(digest, -1) + 1  # a clip is named within its video:
        unit = f"{digest}:{nth}" if kind == "clip" else unit_of_video[digest]  # stable as videos come and go
        groups.setdefault(unit, []).append(index)
    ids = sorted(groups)
    return PrivacyUnits(kind, ids, [groups[u] for u in ids])


def site_id(node: NodeConfig, node_id: int) -> str:
    """The site's name: node config `site-id`, else its simulation partition, else its node id."""
    if node.site_id:
        return node.site_id
    if node.partition_id >= 0:
        return f"site-{node.partition_id}"
    return f"node-{node_id}"


def default_privacy_dir(node: NodeConfig, site: str, config: RunConfig, run_id: int) -> Path:
    """Where a site keeps its budget, ledger and keys when its node config names no `privacy-dir`.

    A real site (node config `data-dir`) keeps one state across all runs on its data. A
    simulated site is a fresh virtual site of its run: its state lives in the run directory
    (`sites/SITE/`), so a resumed run finds the budget its sites already spent.
    """
    if node.privacy_dir:
        return Path(node.privacy_dir).expanduser()
    if node.data_dir:
        return fedvid_home() / "privacy" / site
    if config.run_dir:
        return Path(config.run_dir).expanduser() / "sites" / site
    return fedvid_home() / "privacy" / "simulations" / str(run_id) / site
