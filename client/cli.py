"""The `fedvid` command: everything that is not `flwr run`.

    fedvid setup                      provision the face-detection models (once per machine)
    fedvid synth --out DIR            write the built-in synthetic dataset
    fedvid simulate [--sites N] ...   run a simulated federation through Flower
    fedvid anonymize IN OUT           blur the faces in a video or image
    fedvid audit RUN_DIR --site-keys FILE   check a run's privacy ledger against the sites' pinned keys
    fedvid audit --site-dir DIR       check one site's own ledger and budget
    fedvid ledger-key --privacy-dir DIR   print a site's ledger public key (to pin with the auditors)
    fedvid pretrain --out FILE        train a model on public data, for run-config `init-from`
    fedvid export RUN_DIR --out DIR   distill and quantize the final model to int8 ONNX
    fedvid predict MODEL.onnx VIDEO   classify a video's clips with an exported model
    fedvid generate RUN_DIR --out DIR write sample videos from a trained generator
    fedvid detect RUN_DIR VIDEO --out annotated.mp4   draw a trained detector's boxes on a video
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def cmd_setup(args: argparse.Namespace) -> int:
    from privacy.face_models import DERIVED_FROM, provision_face_models

    for name, path in provision_face_models(args.model_dir).items():
        how = f"derived from {DERIVED_FROM[path.name]}, " if path.name in DERIVED_FROM else ""
        print(f"{name}: {path} ({how}SHA-256 verified)")
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from client.synth import write_synthetic_dataset

    out = write_synthetic_dataset(args.out, seed=args.seed, videos_per_class=args.videos_per_class, progress=True)
    print(f"wrote the synthetic dataset to {out}")
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from simulations.federation import simulate

    return simulate(args.sites, args.run_config, args.out, args.cpus_per_site, args.node_config)


def cmd_anonymize(args: argparse.Namespace) -> int:
    from privacy.anonymize import AnonymizerSettings
    from privacy.anonymize_video import anonymize_file

    settings = AnonymizerSettings.for_mode(args.mode, args.smallest_face, min_confidence=args.confidence,
                                           blur=args.blur)
    stats = anonymize_file(args.input, args.output, settings, preview=args.preview, progress=True)
    heads = f", heads hidden on {stats.frames_with_heads} frames" if args.mode == "faces+heads" else ""
    print(f"{args.output}: {stats.frames} frames, {stats.faces_blurred} face regions blurred{heads}")
    if args.preview:
        print(f"preview: {args.preview}")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from privacy.audit import run_audit_command

    if args.run_dir is None and not args.site_dirs:
        raise ValueError("give a RUN_DIR, or --site-dir DIR to audit a site's own state")
    return run_audit_command(args.run_dir, as_json=args.json, plot=args.plot, site_keys=args.site_keys,
                             site_dirs=args.site_dirs, empirical=args.empirical)


def cmd_ledger_key(args: argparse.Namespace) -> int:
    from privacy.ledger import LedgerKey

    print(LedgerKey.load_or_create(args.privacy_dir).public_key_text())
    return 0


# The DP recipes measured on the built-in data (README, "Starting from public weights").
DP_RECIPES = {
    ("classify", "cnn3d"): ' trainable-layers="head" learning-rate=0.1 ema-decay=0.5',
    ("detect", "cnn3d"): ' trainable-layers="heatmap,box" learning-rate=0.01',
    ("generate", "cnn3d"): ' trainable-layers="film,*.norm*" learning-rate=0.03',
}


def cmd_pretrain(args: argparse.Namespace) -> int:
    from flwr.common.config import parse_config_args

    from models.pretrained import pretrain
    from simulations.federation import resolve_run_config

    config = resolve_run_config(args.run_config)
    named = parse_config_args([args.run_config]) if args.run_config.strip() else {}
    if "learning-rate" in named and "pretrain-learning-rate" not in named:
        print(f"note: learning-rate is the federation's; pretraining runs at pretrain-learning-rate = "
              f"{config.pretrain_learning_rate} (set that key to change it)")
    result = pretrain(config, args.out, args.data, args.epochs, progress=True)
    chosen = result["history"][result["chosen-epoch"] - 1]
    headline = {k: round(v, 4) for k, v in chosen.items() if k.startswith("held-out-")}
    print(f"{args.out}: {config.task}/{config.model}-{config.model_size} on {result['train-clips']} public clips "
          f"of {result['public-data']} ({', '.join(result['classes'])}); kept epoch {result['chosen-epoch']} "
          f"of {result['epochs']}, the best held out: {headline}")
    task = f'task="{config.task}" ' if config.task != "classify" else ""  # classify is the default
    recipe = DP_RECIPES.get((config.task, config.model), "")
    print(f"start a federation from it: fedvid simulate --run-config '{task}init-from=\"{args.out}\"{recipe}'")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from models.export import export_run

    report = export_run(args.run_dir, args.out, transfer=args.transfer, student=args.student, epochs=args.epochs)
    print((args.out / "report.md").read_text())
    return 0 if report else 1


def cmd_predict(args: argparse.Namespace) -> int:
    from models.predict import predict_command

    return predict_command(args.model, args.video)


def cmd_generate(args: argparse.Namespace) -> int:
    from models.inference import generate_from_run

    result = generate_from_run(args.run_dir, args.out, args.per_class, args.seeds, args.classifier)
    print(f"wrote {len(result['samples'])} sample videos to {args.out}")
    if "class-conditional-accuracy" in result:
        print(f"classifier accuracy on class-conditional samples: {result['class-conditional-accuracy']:.3f}")
    return 0


def cmd_detect(args: argparse.Namespace) -> int:
    from models.inference import detect_from_run

    frames = detect_from_run(args.run_dir, args.video, args.out, args.score_threshold)
    print(f"{args.out}: {frames} frames with detections drawn")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedvid", description="Federated, privacy-preserving video training.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("setup", help="provision the face-detection models (verified by SHA-256)")
    p.add_argument("--model-dir", type=Path, default=None, help="where to put them (default: ~/.fedvid/face-models)")
    p.set_defaults(func=cmd_setup)

    p = sub.add_parser("synth", help="write the built-in synthetic video dataset")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--videos-per-class", type=int, default=300)
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("simulate", help="run a simulated federation through Flower")
    p.add_argument("--sites", type=int, default=4, help="number of simulated sites (default 4)")
    p.add_argument("--run-config", default="", help="overrides, e.g. 'num-server-rounds=3 partition=\"dirichlet\"'")
    p.add_argument("--out", type=Path, default=None, help="the run directory (default: ~/.fedvid/runs/TIME)")
    p.add_argument("--cpus-per-site", type=int, default=1, help="CPU cores each simulated site gets")
    p.add_argument("--node-config", default="",
                   help="every simulated site's own settings, e.g. 'privacy-unit=\"clip\" epsilon-budget=4.0'")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("anonymize", help="blur every face in a video (mp4/avi -> mp4) or an image")
    p.add_argument("input", type=Path)
    p.add_argument("output", type=Path)
    p.add_argument("--preview", type=Path, default=None, help="write a side-by-side PNG with detected boxes")
    p.add_argument("--confidence", type=float, default=0.7,
                   help="face score needed by boxes over 0.1%% of the frame (default 0.7; smaller ones need 0.3)")
    p.add_argument("--blur", choices=("gaussian", "pixelate", "fill"), default="gaussian")
    p.add_argument("--mode", choices=("faces", "faces+heads"), default="faces",
                   help="faces+heads also hides the head of every moving person (small-face surveillance video)")
    p.add_argument("--smallest-face", type=int, default=14,
                   help="the smallest faces, in pixels, a video's levels find: 20 (faster), 14 (default) "
                        "or 12 (about half as fast)")
    p.set_defaults(func=cmd_anonymize)

    p = sub.add_parser("audit", help="check a run's privacy ledger (or a site's own) and print its budget table",
                       description="Exit code bits: 1 chain broken, signature invalid or records missing; "
                                   "2 an epsilon under-stated or a record inconsistent; 4 a site over budget; "
                                   "8 (--empirical) a measured lower bound above the accounted epsilon, or no canaries.")
    p.add_argument("run_dir", type=Path, nargs="?", default=None,
                   help="the run directory (omit it to audit the --site-dir sites' own state)")
    p.add_argument("--site-keys", type=Path, default=None,
                   help="the sites' ledger public keys, pinned out of band: a JSON object "
                        "{\"site-id\": \"ed25519:...\"} (what `fedvid ledger-key` prints); without it and without "
                        "--site-dir, the keys of RUN_DIR/sites/* are used (a simulation: valid against an edited "
                        "run ledger only)")
    p.add_argument("--site-dir", type=Path, action="append", dest="site_dirs", default=None, metavar="DIR",
                   help="a site's privacy dir (repeatable): cross-check its ledger and budget file with the run's")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--plot", type=Path, default=None, help="write epsilon per round per site as a PNG")
    p.add_argument("--empirical", action="store_true",
                   help="also measure a lower bound on each site's epsilon from its audit canaries (a run with "
                        "audit-canaries = N; needs fedvid[audit]) and fail when it exceeds the accounted epsilon")
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("ledger-key", help="print a site's ledger public key (created if missing), to pin with the auditors")
    p.add_argument("--privacy-dir", type=Path, required=True, help="the site's privacy dir (node config `privacy-dir`)")
    p.set_defaults(func=cmd_ledger_key)

    p = sub.add_parser("pretrain", help="train the run's model without DP on public videos no site holds, for init-from")
    p.add_argument("--out", type=Path, required=True, help="the model file to write (a fedvid model file)")
    p.add_argument("--data", type=Path, default=None,
                   help="public videos, one sub-folder per class; for detect, videos with .gt.txt boxes and "
                        "classes.txt (default: the task's built-in public set: other shapes, backgrounds and "
                        "motions than the sites' data)")
    p.add_argument("--run-config", default="", help="the run's model and clip settings, e.g. 'model=\"r3d-18\" model-size=\"tiny\"'")
    p.add_argument("--epochs", type=int, default=12)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("export", help="distill the run's model into a small student and quantize both to int8 ONNX")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--out", type=Path, required=True, help="where the .onnx files and report.json/report.md go")
    p.add_argument("--transfer", type=Path, default=None, help="public video folder to distill on (default: the built-in public set, none of the sites' classes)")
    p.add_argument("--student", default=None, help="student architecture, e.g. cnn2d-small or cnn3d-tiny (default: cnn2d at the teacher's size)")
    p.add_argument("--epochs", type=int, default=12, help="distillation epochs")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("predict", help="classify every clip of a video with an exported ONNX model (no torch needed)")
    p.add_argument("model", type=Path)
    p.add_argument("video", type=Path)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("generate", help="write sample videos from a run's generator (task = generate)")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--out", type=Path, required=True, help="folder for the .mp4 samples")
    p.add_argument("--per-class", type=int, default=2, help="samples per class (default 2)")
    p.add_argument("--seeds", type=Path, default=None,
                   help="public folder-per-class videos whose first frames start each sample (default: synthetic)")
    p.add_argument("--classifier", type=Path, default=None,
                   help="a classify run on the same classes: report its accuracy on the class-conditional samples")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("detect", help="draw a run's detections (task = detect) on a video")
    p.add_argument("run_dir", type=Path)
    p.add_argument("video", type=Path)
    p.add_argument("--out", type=Path, required=True, help="the annotated .mp4")
    p.add_argument("--score-threshold", type=float, default=0.3)
    p.set_defaults(func=cmd_detect)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `fedvid` console command."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as exc:
        # Bad input is reported in one line naming the file or setting, not as a traceback.
        print(f"fedvid {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
