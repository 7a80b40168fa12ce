"""The privacy-utility trade-off: the default task trained at several epsilons.

    python -m simulations.privacy_utility [--sites 4] [--epsilons 1,3,8] [--run-config '...']

Runs one simulated federation per target epsilon (and one without DP) and prints the test
accuracy beside the largest epsilon any site actually spent (read from the run's ledger via
the audit, not from the target).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

from privacy.audit import audit_run
from simulations.federation import simulate


def run_once(sites: int, overrides: str, root: Path, name: str) -> tuple[float, float]:
    """(test accuracy, largest site epsilon) of one simulated run."""
    run_dir = root / name
    if simulate(sites, overrides, run_dir) != 0:
        raise SystemExit(f"the run {name} failed; see {run_dir}")
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    sites_eps = [site["epsilon"] for site in audit_run(run_dir).to_dict()["sites"].values()]
    epsilon = max((float(e) for e in sites_eps), default=math.inf)
    return last["test-accuracy"], epsilon


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--epsilons", default="1,3,8")
    parser.add_argument("--run-config", default="")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="fedvid-privacy-utility-"))
    rows = []
    for target in [float(e) for e in args.epsilons.split(",")]:
        rows.append((f"{target:g}", *run_once(args.sites, f"{args.run_config} target-epsilon={target}", root, f"eps-{target:g}")))
    rows.append(("off", *run_once(args.sites, f"{args.run_config} dp=false", root, "dp-off")))
    print(f"\n{'target eps':>10} {'spent eps (max site)':>21} {'test accuracy':>14}")
    for target, accuracy, spent in rows:
        print(f"{target:>10} {spent:>21.2f} {accuracy:>14.3f}")
    print(f"runs in {root}")


if __name__ == "__main__":
    main()
