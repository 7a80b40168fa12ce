"""FedAvg through Flower vs centralized training of the same model on the same data.

    python -m simulations.compare_centralized [--sites 4] [--run-config '...']

Runs a non-private IID federation with `fedvid simulate`, then trains the same architecture
centrally on the union of the sites' training clips for the same number of epochs
(rounds x local epochs), and prints both test accuracies (same central test split) side by side.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from client.dataset import load_clips, partition_items, split_items
from client.site import cache_dir, clip_spec, federation_split, site_anonymizer
from client.train import make_optimizer, pick_device, train_epochs
from models.registry import build_model
from models.tasks import classification_loss, evaluate_classifier
from simulations.federation import resolve_run_config, simulate


def centralized_accuracy(overrides: str, sites: int) -> float:
    """Test accuracy of the model trained on all sites' training videos in one place."""
    config = resolve_run_config(overrides)
    classes, shared, test = federation_split(config)
    parts = partition_items(shared, sites, config.partition, config.dirichlet_alpha, config.seed)
    train_items = [item for part in parts for item in split_items(part, config.val_fraction, config.seed)[0]]
    spec, anonymizer, cache = clip_spec(config), site_anonymizer(), cache_dir()
    train, test_set = load_clips(train_items, spec, anonymizer, cache), load_clips(test, spec, anonymizer, cache)
    torch.manual_seed(config.seed)
    device = pick_device()
    model = build_model(config.model_spec(len(classes))).to(device)
    loader = DataLoader(train.dataset(), batch_size=config.batch_size, shuffle=True)
    train_epochs(model, loader, make_optimizer(model, config.learning_rate), config.num_server_rounds * config.local_epochs, device,
                 classification_loss)
    return evaluate_classifier(model, test_set, device)["accuracy"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--run-config", default="")
    args = parser.parse_args()
    overrides = f'{args.run_config} dp=false partition="iid"'.strip()
    run_dir = Path(tempfile.mkdtemp(prefix="fedvid-compare-")) / "run"
    if simulate(args.sites, overrides, run_dir) != 0:
        raise SystemExit("the federated run failed")
    federated = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]["test-accuracy"]
    central = centralized_accuracy(overrides, args.sites)
    print(f"\n{'training':<14}{'test accuracy':>14}")
    print(f"{'FedAvg':<14}{federated:>14.3f}")
    print(f"{'centralized':<14}{central:>14.3f}")
    print(f"{'gap (points)':<14}{100 * (central - federated):>14.1f}")


if __name__ == "__main__":
    main()
