"""Read the console table of the reference airbench94_muon.py (../shared/anchors) and print one JSON object: each
run's TTA accuracy and time (its own timer: whitening init + training + final TTA evaluation, compile excluded),
their mean, std and median. The warm-up run is left out, as the reference leaves it out of its mean.

    python launch/anchor_table.py anchor.txt
"""

import json
import statistics
import sys


def runs_of(lines: list[str]) -> list[dict]:
    runs, label = [], None
    for line in lines:
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else []
        if len(cells) != 6 or cells[0] == "run":
            continue
        label = cells[0] or label  # the run's label is printed on its first row only
        if cells[1] == "eval" and label != "warmup":
            runs.append({"run": label, "tta_acc": float(cells[4]), "time_s": float(cells[5])})
    return runs


def main(path: str) -> dict:
    with open(path) as f:
        runs = runs_of(f.read().splitlines())
    accs, times = [r["tta_acc"] for r in runs], [r["time_s"] for r in runs]
    summary = {"runs": runs, "n": len(runs)}
    if runs:
        summary |= {
            "tta_acc_mean": statistics.mean(accs), "tta_acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "time_s_median": statistics.median(times), "time_s_mean": statistics.mean(times),
        }  # fmt: skip
    return summary


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))
