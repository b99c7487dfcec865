"""Scripts under launch/ that fasttrain's GPU check runs: the reader of the reference airbench's console table."""

import json
import subprocess
import sys

from helpers import REPO

# The reference prints this table (columns padded as its print_columns does): a warm-up run, then the timed runs,
# each ending with an "eval" row that holds its TTA accuracy and its cumulative time.
REFERENCE_OUTPUT = """\
---------------------------------------------------------------------------------
|  run     |  epoch  |  train_acc  |  val_acc  |  tta_val_acc  |  time_seconds  |
---------------------------------------------------------------------------------
|  warmup  |      0  |     0.3000  |   0.4000  |               |        0.2000  |
|          |   eval  |             |           |       0.9000  |        3.0000  |
|       0  |      0  |     0.3000  |   0.4000  |               |        0.2000  |
|          |      7  |     0.9000  |   0.9000  |               |        1.4000  |
|          |   eval  |             |           |       0.9070  |        1.5500  |
|       1  |      0  |     0.3100  |   0.4100  |               |        0.2000  |
|          |   eval  |             |           |       0.9080  |        1.6500  |
|       2  |      0  |     0.3100  |   0.4100  |               |        0.2000  |
|          |   eval  |             |           |       0.9060  |        1.5000  |
Mean: 0.9070    Std: 0.0010
"""


def test_anchor_table_reads_each_timed_run_and_leaves_out_the_warm_up(tmp_path):
    log = tmp_path / "anchor.txt"
    log.write_text(REFERENCE_OUTPUT)
    proc = subprocess.run(
        [sys.executable, str(REPO / "launch" / "anchor_table.py"), str(log)], capture_output=True, text=True, check=True
    )
    result = json.loads(proc.stdout)
    assert [(r["run"], r["tta_acc"], r["time_s"]) for r in result["runs"]] == [
        ("0", 0.907, 1.55), ("1", 0.908, 1.65), ("2", 0.906, 1.5),
    ]  # fmt: skip
    assert result["n"] == 3 and result["time_s_median"] == 1.55
    assert abs(result["tta_acc_mean"] - 0.907) < 1e-12 and abs(result["tta_acc_std"] - 0.001) < 1e-12
