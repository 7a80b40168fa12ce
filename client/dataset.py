"""Site data: folder-per-class videos -> split and partition -> anonymized clips -> tensors.

Data flows one way: video file -> decoded frames -> face anonymizer -> clips -> cache ->
training tensors. The anonymizer is a required argument of every function that produces
clips, so no code path can turn raw frames into training data.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import logging
import multiprocessing
import os
import tempfile
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Protocol, Sequence

import numpy as np
import torch

from client.video import VIDEO_SUFFIXES, VideoError, frames_to_clips, iter_frames, square_resize
from privacy.blazeface_dense import usable_cores

log = logging.getLogger(__name__)


class DataError(ValueError):
    """A site's dataset cannot be used for training; the message names the folder."""


class FrameAnonymizer(Protocol):
    """What the pipeline needs from the face anonymizer (privacy.anonymize.FaceAnonymizer)."""

    def anonymize_frames(self, frames: Iterable[np.ndarray], keep: Callable | None = None,
                         background: np.ndarray | None = None) -> tuple[list[np.ndarray], object]: ...

    def settings_key(self) -> str: ...


@dataclass(frozen=True)
class VideoItem:
    """One labelled video file."""

    path: Path
    label: int


@dataclass(frozen=True)
class ClipSpec:
    """How videos are cut into clips: frames per clip, frame stride, square frame size."""

    clip_frames: int
    frame_stride: int
    frame_size: int


@dataclass
class ClipSet:
    """Anonymized clips of a set of videos, held in memory as uint8."""

    clips: np.ndarray  # (N, T, S, S, 3) RGB uint8
    labels: np.ndarray  # (N,) int64
    faces_blurred: int = 0
    skipped: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)  # per clip: its video's content digest (the video unit)

    def __len__(self) -> int:
        return len(self.labels)

    def dataset(self) -> "ClipDataset":
        return ClipDataset(self.clips, self.labels)


def clips_to_tensor(clips: np.ndarray) -> torch.Tensor:
    """uint8 (N, T, S, S, 3) RGB -> float (N, 3, T, S, S) in [0, 1], the models' input."""
    return torch.from_numpy(np.ascontiguousarray(clips)).permute(0, 4, 1, 2, 3).float().div_(255)


class ClipDataset(torch.utils.data.Dataset):
    """(clip, label) pairs; a clip is float (3, T, S, S) in [0, 1]."""

    def __init__(self, clips: np.ndarray, labels: np.ndarray):
        self.clips = torch.from_numpy(clips)
        self.labels = torch.from_numpy(labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.clips[i].permute(3, 0, 1, 2).float().div_(255), self.labels[i]


# --- Finding, splitting and partitioning videos --------------------------------------


def scan_video_folder(root: Path, classes: Sequence[str] | None = None) -> tuple[tuple[str, ...], list[VideoItem]]:
    """Find videos laid out one sub-folder per class (UCF101 / HMDB51 style).

    `classes` fixes the label order (all sites of a federation must agree); by default the
    sorted sub-folder names. Raises DataError before any training when the folder is
    missing or empty, holds fewer than two classes, or names a class outside `classes`.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    found = {p.name: sorted(v for v in p.rglob("*") if v.suffix.lower() in VIDEO_SUFFIXES) for p in folders}
    found = {name: videos for name, videos in found.items() if videos}
    if not found:
        raise DataError(
            f"data folder {root} holds no videos: expected one sub-folder per class "
            f"with video files ({', '.join(VIDEO_SUFFIXES)}) inside"
        )
    names = tuple(classes) if classes else tuple(sorted(found))
    if len(names) < 2:
        raise DataError(f"data folder {root} holds a single class ({names[0]}): need at least two")
    strangers = sorted(set(found) - set(names))
    if strangers:
        raise DataError(f"data folder {root} has classes {strangers} that are not in classes = {list(names)}")
    items = [VideoItem(path, names.index(name)) for name, videos in found.items() for path in videos]
    return names, sorted(items, key=lambda item: str(item.path))


def split_items(items: Sequence[VideoItem], fraction: float, seed: int) -> tuple[list[VideoItem], list[VideoItem]]:
    """Split off `fraction` of the videos of each class, deterministically: (kept, held out)."""
    rng = np.random.default_rng(seed)
    kept, held = [], []
    for label in sorted({item.label for item in items}):
        group = [item for item in items if item.label == label]
        order = rng.permutation(len(group))
        n_held = int(round(fraction * len(group)))
        held += [group[i] for i in order[:n_held]]
        kept += [group[i] for i in order[n_held:]]
    return kept, held


def partition_items(
    items: Sequence[VideoItem], num_partitions: int, scheme: str = "iid", alpha: float = 0.5, seed: int = 0
) -> list[list[VideoItem]]:
    """Share videos among `num_partitions` sites: every video goes to exactly one site.

    `iid`: a shuffled round-robin deal. `dirichlet`: per class, site shares drawn from
    Dir(alpha) (small alpha: each site sees few classes). Deterministic from `seed`, so every
    virtual site computes the same partition on its own.
    """
    if num_partitions < 1:
        raise ValueError(f"num-partitions = {num_partitions} must be at least 1")
    if len(items) < num_partitions:
        raise DataError(f"{len(items)} videos cannot be shared among {num_partitions} sites")
    rng = np.random.default_rng(seed)
    parts: list[list[VideoItem]] = [[] for _ in range(num_partitions)]
    if scheme == "iid":
        for rank, i in enumerate(rng.permutation(len(items))):
            parts[rank % num_partitions].append(items[i])
    elif scheme == "dirichlet":
        for label in sorted({item.label for item in items}):
            group = [item for item in items if item.label == label]
            group = [group[i] for i in rng.permutation(len(group))]
            shares = rng.dirichlet(np.full(num_partitions, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(group)).round().astype(int)
            for site, chunk in enumerate(np.split(np.arange(len(group)), cuts)):
                parts[site] += [group[i] for i in chunk]
        # A site left with nothing gets a video from the largest site, so every site can train.
        for site in range(num_partitions):
            if not parts[site]:
                donor = max(range(num_partitions), key=lambda s: len(parts[s]))
                parts[site].append(parts[donor].pop())
    else:
        raise ValueError(f"partition = {scheme!r} must be 'iid' or 'dirichlet'")
    return [sorted(p, key=lambda item: str(item.path)) for p in parts]


# --- Decoding, anonymizing and caching clips -------------------------------------------

_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_digest(path: Path) -> str:
    """SHA-256 of a file's content, remembered per (path, size, mtime) within a process."""
    stat = os.stat(path)
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _DIGESTS[key] = digest.hexdigest()
    return _DIGESTS[key]


def _cache_path(cache_dir: Path, path: Path, spec: ClipSpec, anonymizer: FrameAnonymizer) -> Path:
    """Cache file named by the video's content, the clip spec and the anonymizer's settings."""
    key = hashlib.sha256(
        f"{file_digest(path)}|{spec.clip_frames}|{spec.frame_stride}|{spec.frame_size}|{anonymizer.settings_key()}".encode()
    ).hexdigest()
    return cache_dir / key[:2] / f"{key}.npz"


def video_clips(path: Path, spec: ClipSpec, anonymizer: FrameAnonymizer, cache_dir: Path | None) -> tuple[np.ndarray, int]:
    """Anonymized clips of one video and the number of faces blurred in it.

    Decode, detect and blur run once per video: later calls read the cache, whose file name
    changes with the video's content and the anonymizer's settings, so a stale entry is never
    read. Only anonymized frames are ever written to it.
    """
    target = _cache_path(cache_dir, path, spec, anonymizer) if cache_dir else None
    if target is not None and target.is_file():
        try:
            with np.load(target) as cached:
                return cached["clips"], int(cached["faces"])
        except (OSError, ValueError, KeyError) as exc:
            log.warning("ignoring unreadable cache entry %s (%s)", target, exc)
    clips, faces = _anonymized_clips(path, spec, anonymizer)
    if target is not None:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".npz", delete=False) as tmp:
            np.savez(tmp, clips=clips, faces=faces)
        os.replace(tmp.name, target)
    return clips, faces


def _anonymized_clips(path: Path, spec: ClipSpec, anonymizer: FrameAnonymizer) -> tuple[np.ndarray, int]:
    """Decode, anonymize and shrink a video one frame at a time: only the anonymizer's
    look-ahead is held at the video's own size, however long the video."""
    frames = iter_frames(path, spec.frame_stride)
    first = next(frames)  # a video without a decodable frame is refused here (VideoError)
    background = None
    if getattr(getattr(anonymizer, "settings", None), "heads", None) is not None:
        from privacy.anonymize_video import video_background

        background = video_background(path)
    small, stats = anonymizer.anonymize_frames(itertools.chain([first], frames), background=background,
                                               keep=lambda frame: square_resize(frame, spec.frame_size))
    return frames_to_clips(small, spec.clip_frames, spec.frame_size), int(getattr(stats, "faces_blurred", 0))


def load_clips(
    items: Sequence[VideoItem],
    spec: ClipSpec,
    anonymizer: FrameAnonymizer,
    cache_dir: Path | None,
    progress: bool = False,
    workers: int = 0,
) -> ClipSet:
    """Anonymized clips of `items`; a video that cannot be decoded is reported and skipped.
    `workers`: processes that anonymize videos not yet cached (see `fill_cache`)."""
    from rich.progress import track

    fill_cache(items, spec, anonymizer, cache_dir, workers, progress)
    clips, labels, skipped, faces, sources = [], [], [], 0, []
    iterator = track(items, description="preparing clips") if progress else items
    for item in iterator:
        try:
            video, n_faces = video_clips(item.path, spec, anonymizer, cache_dir)
        except VideoError as exc:
            log.warning("skipping video: %s", exc)
            skipped.append(item.path.name)
            continue
        clips.append(video)
        labels += [item.label] * len(video)
        sources += [file_digest(item.path)] * len(video)
        faces += n_faces
    if not clips:
        raise DataError(f"none of the {len(items)} videos could be decoded")
    return ClipSet(np.concatenate(clips), np.asarray(labels, dtype=np.int64), faces, skipped, sources)


# --- Anonymizing a site's videos on all its cores -------------------------------------

MAX_DEFAULT_WORKERS = 8  # each worker holds its own detector (~0.3 GB at 720p)


def anonymize_workers(requested: int = 0) -> int:
    """Processes that anonymize videos: `requested`, or with 0 one per usable core, at most 8."""
    return requested or min(usable_cores(), MAX_DEFAULT_WORKERS)


def fill_cache(items: Sequence[VideoItem], spec: ClipSpec, anonymizer: FrameAnonymizer,
               cache_dir: Path | None, workers: int = 0, progress: bool = False) -> None:
    """Anonymize the videos of `items` that are not in the clip cache yet, several at a time,
    each in a worker process that loads the anonymizer's models itself: a video's clips do
    not depend on which process made them (the cache is keyed on the settings, the models'
    bytes and the algorithm). Loaders then read the cache. A video that cannot be decoded is
    left to them to report and skip; any other error (a face model that does not load in a
    worker) stops the loading. Without a cache, with one worker, or with an anonymizer that
    cannot be rebuilt from its settings (a given detector), nothing happens here."""
    settings = getattr(anonymizer, "settings", None) if getattr(anonymizer, "rebuildable", False) else None
    workers = anonymize_workers(workers)
    if cache_dir is None or settings is None or workers < 2:
        return
    todo = [item.path for item in items if not _cache_path(cache_dir, item.path, spec, anonymizer).is_file()]
    if len(todo) < 2:
        return
    workers = min(workers, len(todo))
    # LiteRT's threads shared among the workers: speed only, never the output.
    settings = dataclasses.replace(settings, threads=settings.threads or max(1, usable_cores() // workers))
    # Spawned, not forked: a forked child would inherit the parent's threads' locks.
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_cache_one, path, spec, settings, cache_dir) for path in todo]
        try:
            for future in _progress(as_completed(futures), len(futures), progress):
                future.result()
        except BrokenProcessPool as exc:
            # A worker died (out of memory, or it could not start: a calling script without
            # `if __name__ == "__main__":`). The loader anonymizes what is left itself.
            log.warning("anonymizing in %d worker processes failed (%s); going on in this one", workers, exc)
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise


def _progress(futures, total: int, enabled: bool):
    if not enabled:
        return futures
    from rich.progress import track

    return track(futures, total=total, description="anonymizing videos")


_WORKER_ANONYMIZER = None  # one per worker process, loaded on its first video


def _cache_one(path: Path, spec: ClipSpec, settings, cache_dir: Path) -> None:
    """In a worker process: anonymize one video into the cache."""
    global _WORKER_ANONYMIZER
    if _WORKER_ANONYMIZER is None:
        from privacy.anonymize import FaceAnonymizer

        _WORKER_ANONYMIZER = FaceAnonymizer(settings)  # fails closed, like the parent's
    try:
        video_clips(path, spec, _WORKER_ANONYMIZER, cache_dir)
    except VideoError:
        pass  # the loader decodes it again, reports it and skips it
