"""False-positive rate of every stage-06 test on simulated nulls (run by hand).

    python benchmarks/bench_calibration.py --json calibration.json [--n-sims 50] [--n-controls 19]

Each null is simulated with the package's own functions (rephelpers.influence.calibration) and read
by rephelpers.influence.stats exactly as notebook 06 reads a run; a test holds its α when its
false-positive rate is at most α (the CI-sized version, tests/test_calibration.py, allows
α + 0.03). Tests marked "legacy"/"rejected" are not reported by stage 06: they are run to
show why they were replaced.
"""

from __future__ import annotations

import argparse
import json
import time

from rephelpers.influence.calibration import calibrate, calibration_frame


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=None, help="write {'tests': [...]} here")
    parser.add_argument("--n-sims", type=int, default=50, help="simulations per null and grid point")
    parser.add_argument("--n-controls", type=int, default=19, help="random-control draws per perturbation")
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    started = time.time()
    result = calibrate(n_sims=args.n_sims, alpha=args.alpha, n_controls=args.n_controls, seed=args.seed)
    result["seconds"] = round(time.time() - started, 1)
    frame = calibration_frame(result)
    print(frame[["name", "null", "reported", "alpha", "fpr", "n_tests", "n_sims", "holds"]].to_string(index=False))
    print(f"grid {result['grid']}, {args.n_controls} control draws, {result['seconds']} s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
        print(f"-> {args.json}")


if __name__ == "__main__":
    main()
