"""Starting a federation from public weights: run-config keys `init-from` and `trainable-layers`.

`init-from` names a file of weights: a fedvid model file (`fedvid pretrain`, a run's
`model.pt`), a plain PyTorch state dict, or one wrapped as {"state_dict": ...} or
{"model": ...} (e.g. torchvision's published video checkpoints, which load into `r3d-18` and
`r2plus1d-18` as they are). Tensors load by name; what cannot load is said, not hidden:

- a tensor whose shape differs (the head of another number of classes) keeps its fresh
  initialisation, and so do the class-dependent tensors when the file names other classes (a
  fedvid file from public data: its head means the public labels, not the run's);
- BatchNorm running statistics have no place in the GroupNorm a DP model uses, and are dropped;
- a file that fills less than half of the model's weights is another architecture: refused.

The weights come from the coordinator's side (it chooses every round's weights anyway), so
they change what the sites train, never what a site's epsilon is.
"""

from __future__ import annotations

import copy
import fnmatch
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

BATCHNORM_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


@dataclass
class InitReport:
    """What `load_initial_weights` did, for the log and the run directory."""

    path: str
    sha256: str
    loaded: list[str] = field(default_factory=list)
    reinitialised: list[str] = field(default_factory=list)  # in the model; missing or another shape in the file
    dropped: list[str] = field(default_factory=list)  # in the file; no place in the model
    loaded_fraction: float = 0.0  # of the model's parameters, by count

    def summary(self) -> str:
        return (f"{len(self.loaded)} tensors ({self.loaded_fraction:.0%} of the weights) from {self.path}; "
                f"kept fresh: {', '.join(self.reinitialised) or 'none'}; dropped: {len(self.dropped)}")


def read_weights(path: Path) -> tuple[dict[str, torch.Tensor], list[str] | None]:
    """(tensors, the class names the file was trained on, when it says) of a weights file, or a
    ValueError naming it. Never unpickles code."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"init-from = {str(path)!r}: no such file")
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a pickle of code, a truncated file, not a torch file at all
        raise ValueError(f"init-from = {str(path)!r} is not a weights file torch can load safely: {exc}") from exc
    classes = content.get("classes") if isinstance(content, dict) else None
    for wrapper in ("state_dict", "model"):
        if isinstance(content, dict) and isinstance(content.get(wrapper), dict):
            content = content[wrapper]
    if not isinstance(content, dict) or not all(isinstance(v, torch.Tensor) for v in content.values()):
        raise ValueError(f"init-from = {str(path)!r} holds no state dict (name -> tensor)")
    classes = list(classes) if isinstance(classes, (list, tuple)) else None
    return {k.removeprefix("module."): v for k, v in content.items()}, classes  # DataParallel's prefix


def load_initial_weights(model: nn.Module, path: Path, classes: tuple[str, ...] = (),
                         class_keys: set[str] = frozenset()) -> InitReport:
    """Load the weights in `path` into `model` by name, in place (see module doc). `classes` are
    the run's, `class_keys` the model's tensors that depend on them."""
    path = Path(path).expanduser()
    state, file_classes = read_weights(path)
    report = InitReport(str(path), hashlib.sha256(path.read_bytes()).hexdigest())
    own = model.state_dict()
    fresh = set(class_keys) if file_classes is not None and tuple(file_classes) != tuple(classes) else set()
    matched = {}
    for name, tensor in state.items():
        if name in own and own[name].shape == tensor.shape and name not in fresh:
            matched[name] = tensor.to(own[name].dtype)
        elif name not in own:
            report.dropped.append(name)
    report.loaded = sorted(matched)
    report.reinitialised = sorted(set(own) - set(matched))
    counts = {name: p.numel() for name, p in model.named_parameters()}
    report.loaded_fraction = sum(counts[n] for n in matched if n in counts) / max(1, sum(counts.values()))
    if report.loaded_fraction < 0.5:
        raise ValueError(
            f"init-from = {str(path)!r} fills {report.loaded_fraction:.0%} of the model's weights: another "
            f"architecture (or model-size)? kept fresh: {', '.join(report.reinitialised[:8])}"
        )
    model.load_state_dict(matched, strict=False)
    return report


def freeze_except(model: nn.Module, trainable: str) -> int:
    """Train only the parameters under the comma-separated module prefixes `trainable` (run-config
    `trainable-layers`; empty: all); return how many parameters stay trainable. An entry with
    `*` or `?` is a pattern for whole parameter names (`*.norm*`: every norm layer's). Frozen
    ones get no per-example gradient under DP-SGD, which makes the step cheaper and the noise
    smaller relative to the signal."""
    prefixes = [p.strip() for p in trainable.split(",") if p.strip()]
    if not prefixes:
        return sum(p.numel() for p in model.parameters() if p.requires_grad)
    names = [name for name, _ in model.named_parameters()]
    for prefix in prefixes:
        if not any(_under(name, prefix) for name in names):
            heads = sorted({name.split(".")[0] for name in names})
            raise ValueError(f"trainable-layers: {prefix!r} names no layer of the model; its top-level layers: {', '.join(heads)}")
    kept = 0
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(any(_under(name, prefix) for prefix in prefixes))
        kept += parameter.numel() if parameter.requires_grad else 0
    return kept


def _under(name: str, prefix: str) -> bool:
    if "*" in prefix or "?" in prefix:
        return fnmatch.fnmatchcase(name, prefix)
    return name == prefix or name.startswith(prefix + ".")


PRETRAIN_VALIDATION = 0.2  # of the public videos, held out to report what pretraining learnt


def public_data_dir(task: str, progress: bool = False) -> Path:
    """The built-in public pretraining set for `task` (client.synth_public), written on first use."""
    from client.site import fedvid_home
    from client.synth_public import (DETECTION_DONE_FILE, DONE_FILE, is_complete, write_public_dataset,
                                     write_public_detection_dataset)

    name, write, done = (("synth-public-detect", write_public_detection_dataset, DETECTION_DONE_FILE) if task == "detect"
                         else ("synth-public", write_public_dataset, DONE_FILE))
    target = fedvid_home() / "data" / name
    if not is_complete(target, done):
        write(target, progress=progress)
    return target


def pretrain(config, out: Path, data: Path | None = None, epochs: int = 12, batch_size: int = 32,
             progress: bool = False) -> dict:
    """Train the run's model (task, model, size, clip geometry of `config`) without DP on public
    videos (`data`, one sub-folder per class; default: the built-in public set) and save it to
    `out` as a fedvid model file for `init-from`: the weights of the epoch with the best held-out
    headline metric. Returns what it measured."""
    from rich.progress import track
    from torch.utils.data import DataLoader

    from client.dataset import scan_video_folder, split_items
    from client.site import cache_dir, clip_spec, load_task_clips, site_anonymizer
    from client.train import make_optimizer, pick_device, train_epochs
    from models.registry import build_model
    from models.tasks import get_task
    from server.run_dir import save_model

    if epochs < 1:
        raise ValueError(f"pretraining needs epochs >= 1, not {epochs}")
    root = Path(data).expanduser() if data else public_data_dir(config.task, progress)
    if config.task == "detect":
        from client.boxes import scan_detection_folder
        classes, items = scan_detection_folder(root, None)
    else:
        classes, items = scan_video_folder(root, None)
    train_items, held_items = split_items(items, PRETRAIN_VALIDATION, config.seed)
    if not held_items:
        raise ValueError(f"public data {root}: too few videos to hold {PRETRAIN_VALIDATION:.0%} out (3 a class at least)")
    spec, anonymizer, cache = clip_spec(config), site_anonymizer(), cache_dir()
    train_set = load_task_clips(config, train_items, spec, anonymizer, cache, progress=progress)
    held_set = load_task_clips(config, held_items, spec, anonymizer, cache, progress=progress)
    task, device = get_task(config.task), pick_device()
    torch.manual_seed(config.seed)
    model_spec = config.model_spec(len(classes))
    model = build_model(model_spec).to(device)
    optimizer = make_optimizer(model, config.pretrain_learning_rate)
    loader = DataLoader(task.examples(train_set), batch_size=batch_size, shuffle=True)
    history, best = [], None
    for epoch in track(range(epochs), description="pretraining") if progress else range(epochs):
        stats = train_epochs(model, loader, optimizer, 1, device, task.step_loss)
        history.append({"epoch": epoch + 1, "train-loss": stats.loss,
                        **{f"held-out-{k}": v for k, v in task.evaluate(model, held_set, device).items()}})
        # Keep the epoch that generalises best: the last one can be worse (training is noisy
        # and may overfit), and only public data decides.
        if best is None or history[-1][f"held-out-{task.headline}"] > best[0]:
            best = (history[-1][f"held-out-{task.headline}"], epoch + 1, copy.deepcopy(model.state_dict()))
    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"public-data": str(root), "classes": list(classes), "train-clips": len(train_set),
              "held-out-clips": len(held_set), "epochs": epochs, "chosen-epoch": best[1],
              f"held-out-{task.headline}": best[0], "history": history}
    save_model(out, {k: v.cpu() for k, v in best[2].items()}, model_spec, classes, pretrained=result)
    return result
