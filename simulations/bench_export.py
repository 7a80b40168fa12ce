"""Benchmark: distil, export and quantize a finished run, then print the report's table.

    python -m simulations.bench_export RUN_DIR [--out DIR] [--student cnn3d-tiny] [--epochs 12]
        [--transfer FOLDER] [--int8-ops MatMul,Gemm]

Runs `models.export.export_run` (artefacts and report.json / report.md in --out, default
RUN_DIR/export) and prints report.md: parameters, file size, accuracy on the run's central
test split, CPU latency per clip and epsilon for teacher and student, fp32 and int8.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from models.distill import EPOCHS
from models.export import QUANTIZED_OPS, export_run, render_markdown


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="artefacts and report (default: RUN_DIR/export)")
    parser.add_argument("--transfer", type=Path, default=None, help="public transfer folder (default: synthetic)")
    parser.add_argument("--student", default=None, help="NAME-SIZE or SIZE (default: one size down)")
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--int8-ops", default=",".join(QUANTIZED_OPS), help="op types given int8 weights")
    parser.add_argument("--latency-repeats", type=int, default=200)
    args = parser.parse_args(argv)
    report = export_run(
        args.run_dir, args.out or args.run_dir / "export", args.transfer, args.student, args.epochs,
        progress=True, int8_ops=tuple(op for op in args.int8_ops.split(",") if op),
        latency_repeats=args.latency_repeats,
    )
    print(render_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
