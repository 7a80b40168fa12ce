"""Benchmark: one site's DP rounds through the real ClientApp handler, on the CPU or a GPU.

    python -m simulations.bench_site_round [--device cuda] [--rounds 3] [--sites 4]
        [--run-config '...']

The site is partition 0 of a simulated federation of ``--sites`` sites on the built-in data (the
quick start's site), its videos anonymized as a site anonymizes them (`faces`, cached after the
first load). Each round sends the last round's weights to `client.client_app.train` in a Flower
Message, as a coordinator would, under the quick start's run config (plus ``--run-config``
overrides). Budget and ledger go to a temporary privacy dir: no real site's budget is charged.
Prints the load time, then per round the seconds, DP-SGD steps, privacy units per second and
the epsilon spent, and last the model's loss and accuracy on the site's own training clips (to
compare devices; not a figure a site would release).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict
from flwr.common.config import parse_config_args

import client.client_app as client_app
from client.run_config import RunConfig
from client.site import builtin_data_dir
from client.train import pick_device
from models.registry import build_model
from models.tasks import get_task


def ask_to_train(model: torch.nn.Module, server_round: int) -> Message:
    """The coordinator's train message for `server_round`, carrying `model`'s weights."""
    metadata = Metadata(run_id=1, message_id=f"train-{server_round}", src_node_id=0, dst_node_id=1,
                        reply_to_message_id="", group_id=str(server_round), created_at=time.time(),
                        ttl=3600, message_type="train")
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                          "config": ConfigRecord({"server-round": server_round})})
    return Message(content, metadata=metadata)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="",
                   help="cpu, cuda, cuda:1 ... (default: the GPU when there is one)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--sites", type=int, default=4, help="the site holds 1/sites of the shared data")
    p.add_argument("--run-config", default="", help="overrides, as `fedvid simulate --run-config`")
    a = p.parse_args(argv)
    overrides = parse_config_args([a.run_config]) if a.run_config.strip() else {}
    config = RunConfig.from_mapping({**RunConfig().to_mapping(), **overrides})
    device = pick_device(a.device)
    builtin_data_dir(progress=True, task=config.task)
    with tempfile.TemporaryDirectory() as privacy_dir:
        node = {"partition-id": 0, "num-partitions": a.sites, "privacy-dir": privacy_dir,
                "device": str(device), "site-id": "bench"}
        context = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(),
                          run_config=config.to_mapping())
        started = time.perf_counter()
        _, _, _, data = client_app.site_of(context)
        print(f"device={device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}) "
              f"torch={torch.__version__} threads={torch.get_num_threads()} task={config.task} "
              f"model={config.model}/{config.model_size} batch={config.batch_size} epochs={config.local_epochs}")
        print(f"site data: {len(data.units)} units, {len(data.train)} clips, "
              f"loaded and anonymized in {time.perf_counter() - started:.1f} s")
        torch.manual_seed(0)
        model = build_model(config.model_spec(len(data.classes)))
        print(f"{'round':>5} {'seconds':>8} {'steps':>6} {'units/s':>8} {'epsilon':>8}")
        for server_round in range(1, a.rounds + 1):
            started = time.perf_counter()
            reply = client_app.train(ask_to_train(model, server_round), context)
            seconds = time.perf_counter() - started
            record = json.loads(reply.content["site"]["ledger-record"])
            if record.get("refused"):
                print(f"round {server_round} refused: {record.get('refused_reason')}")
                return 1
            model.load_state_dict(reply.content["arrays"].to_torch_state_dict())
            steps = record["local_steps"]
            units = steps * config.batch_size  # expected units per step (Poisson sampling)
            print(f"{server_round:>5} {seconds:8.1f} {steps:>6} {units / seconds:8.1f} "
                  f"{record['epsilon_cumulative']:8.3f}")
        metrics = get_task(config.task).evaluate(model.to(device), data.train, device)
        print("on the site's training clips: " + ", ".join(f"{k}={v:.3f}" for k, v in metrics.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
