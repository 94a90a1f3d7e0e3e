#!/usr/bin/env python3
"""Compares the step records of two runs for the run tests (check_distributed.sh,
check_device_train.sh): every step's loss and gradient norm within RTOL, relative to
max(|value|, FLOOR) (a floor for losses that are sums near 0, as GRPO's).

    compare_steps.py A/metrics.jsonl B/metrics.jsonl RTOL LABEL [FLOOR]

Prints "LABEL: N steps, largest relative difference ..." and exits 0 when within RTOL,
1 when not (or when the runs logged other steps)."""
import json
import sys


def steps(path):
    out = {}
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            if r.get("type") == "step":
                out[r["step"]] = (r["loss"], r["grad_norm"])
    return out


def main():
    a, b = steps(sys.argv[1]), steps(sys.argv[2])
    tol, label = float(sys.argv[3]), sys.argv[4]
    floor = float(sys.argv[5]) if len(sys.argv) > 5 else 1e-30
    if not a or sorted(a) != sorted(b):
        print(f"{label}: the runs logged other steps: {sorted(a)} and {sorted(b)}")
        return 1
    worst = 0.0
    for s in a:
        for u, v in zip(a[s], b[s]):
            d = abs(u - v) / max(abs(u), floor)
            worst = d if not d <= worst else worst  # NaN is the worst
    print(f"{label}: {len(a)} steps, largest relative difference of a loss or gradient norm {worst:.3g}")
    return 0 if worst <= tol else 1


if __name__ == "__main__":
    sys.exit(main())
