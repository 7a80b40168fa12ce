"""Benchmark: distil, export and quantize a finished run, then print the report's table.

    python -m simulations.bench_export RUN_DIR [--out DIR] [--student cnn2d-small] [--epochs 12]
        [--transfer FOLDER] [--alpha 0.7] [--int8-ops Conv,MatMul,Gemm]

Runs `models.export.export_run` (artefacts and report.json / report.md in --out, default
RUN_DIR/export) and prints report.md: parameters, file size, accuracy on the run's central
test split, CPU latency per clip and epsilon for teacher and student, fp32 and int8.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from models.distill import ALPHA, EPOCHS
from models.export import QUANTIZED_OPS, export_run, render_markdown


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="artefacts and report (default: RUN_DIR/export)")
    parser.add_argument("--transfer", type=Path, default=None, help="public transfer folder (default: synthetic)")
    parser.add_argument("--student", default=None, help="NAME-SIZE, NAME or SIZE (default: cnn2d at the teacher's size)")
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--alpha", type=float, default=ALPHA, help="weight of the teacher's soft outputs (1: no labels)")
    parser.add_argument("--int8-ops", default=",".join(QUANTIZED_OPS), help="op types given int8 weights (Conv is left out of models with 3D convolutions)")
    parser.add_argument("--latency-repeats", type=int, default=200)
    args = parser.parse_args(argv)
    report = export_run(
        args.run_dir, args.out or args.run_dir / "export", args.transfer, args.student, args.epochs,
        progress=True, int8_ops=tuple(op for op in args.int8_ops.split(",") if op),
        latency_repeats=args.latency_repeats, alpha=args.alpha,
    )
    print(render_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
