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


# --- launch/gpu_report.py: the GPU check's sitting, gathered and written as README rows ---------------------------


def _report(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "launch" / "gpu_report.py"), *args], capture_output=True, text=True, timeout=60
    )


def _sitting(results, steps: list[tuple], outputs: dict, boot_ids=("machine-a", "machine-a")) -> None:
    """A results folder as gpu_check.sh leaves it: calls.tsv, steps.tsv (name rc seconds estimate call), NAME.json."""
    results.mkdir()
    (results / "calls.tsv").write_text(
        "".join(f"{i + 1}\t2026-12-01T10:0{i}:00Z\t570\t{boot}\n" for i, boot in enumerate(boot_ids))
    )
    (results / "steps.tsv").write_text("".join("\t".join(map(str, row)) + "\n" for row in steps))
    for name, result in outputs.items():
        (results / f"{name}.json").write_text("progress the bench printed\n" + json.dumps(result) + "\n")
        (results / f"{name}.cmd").write_text(f"python3 -m fasttrain.bench {name}")


RESNET9 = {
    "tta_acc": 0.9135,
    "val_acc": 0.9102,
    "epochs": 24,
    "train_time_s": 13.5,
    "compile_time_s": 41.0,
    "images_per_sec": 120_000.0,
    "process_wall_s": 80.0,
    "time_to_target_s": 13.1,
    "target_acc": 0.91,
    "gc_collections": [3, 0, 1],
}
AIRBENCH = {
    "runs": 10,
    "tta_acc": {"mean": 0.9081, "std": 0.0021},
    "total_time_s": {"median": 1.76},
    "train_time_s": {"median": 1.5},
    "compile_time_s": {"values": [150.0, 0.0]},
    "compiled_graphs": [3, 0],
    "gc_collections": [[2, 0, 0], [1, 1, 0]],
}
ANCHOR = {"n": 10, "tta_acc_mean": 0.9075, "tta_acc_std": 0.002, "time_s_median": 1.6}


def test_gpu_report_gathers_two_calls_and_says_which_targets_are_missed_and_by_how_much(tmp_path):
    results = tmp_path / "results"
    _sitting(
        results,
        [("imports", 0, 9, 15, 1), ("resnet9", 0, 95, 110, 1), ("airbench", 0, 190, 200, 1),
         ("anchor", "not_run", 0, 200, 1), ("anchor", 0, 185, 200, 2), ("stream", "not_run", 0, 90, 2),
         ("step", 1, 12, 45, 2)],
        {"imports": {"device": "NVIDIA H200", "torch": "2.11.0+cu130", "cuda": "13.0", "accelerate": "1.15.0"},
         "resnet9": RESNET9, "airbench": AIRBENCH, "anchor": ANCHOR},
    )  # fmt: skip
    collected = _report("collect", str(results))
    assert collected.returncode == 0, collected.stderr
    sitting = json.loads(collected.stdout)
    assert sitting["one_machine"] and [c["call"] for c in sitting["calls"]] == [1, 2]
    assert sitting["steps"]["anchor"]["status"] == "ok" and sitting["steps"]["anchor"]["call"] == 2
    assert sitting["steps"]["resnet9"]["result"] == RESNET9  # the last stdout line, the progress before it dropped
    (tmp_path / "results.json").write_text(collected.stdout)

    rows = {
        line.split(" | ")[0].strip("| "): line
        for line in _report("table", str(tmp_path / "results.json")).stdout.splitlines()
    }
    head = next(line for line in rows if line.startswith("**GPU rows**"))
    assert "NVIDIA H200" in head and "torch 2.11.0+cu130" in head and "2 call(s) on one machine" in head
    resnet9 = rows["resnet9 recipe, data resident on the GPU"]
    assert "80 s wall; GC in the timed part: 1 full, 3 younger collections |" in resnet9
    assert "91.35% flip-TTA" in resnet9 and "MISSED: 1.5 s over 12 s" in resnet9 and "pp short" not in resnet9
    airbench = rows["airbench94 recipe (fasttrain), TTA level 2"]
    assert "90.81% +- 0.21 over 10 seeds" in airbench and "1.10x the reference" in airbench
    assert "GC in the timed part: 0 full, 4 younger collections over 2 runs" in airbench
    assert "MISSED: 1.10x the reference's median time (10% slower)" in airbench
    assert "not run: the budget ran out" in rows["resnet9 recipe, ffcv stream"]
    assert "failed (exit 1) after 12 s" in rows["bench step"]

    summary = _report("summary", str(tmp_path / "results.json"))
    assert summary.returncode == 1  # a step failed
    assert json.loads(summary.stdout)["failed"] == ["step"] and json.loads(summary.stdout)["not_run"] == ["stream"]


def test_gpu_report_says_when_the_calls_ran_on_different_machines_and_when_all_targets_are_met(tmp_path):
    results = tmp_path / "results"
    fast = {**RESNET9, "train_time_s": 11.0}
    _sitting(results, [("resnet9", 0, 95, 110, 1)], {"resnet9": fast}, boot_ids=("machine-a", "machine-b"))
    (tmp_path / "results.json").write_text(_report("collect", str(results)).stdout)
    table = _report("table", str(tmp_path / "results.json")).stdout
    assert "MORE THAN ONE machine" in table
    assert next(line for line in table.splitlines() if line.startswith("| resnet9 recipe, data")).endswith("| met |")


def test_gpu_report_never_calls_a_target_met_on_a_missing_figure_and_marks_a_stopped_step_partial(tmp_path):
    results = tmp_path / "results"
    _sitting(
        results,
        [("resnet9", 0, 95, 110, 1), ("stream", 0, 80, 90, 1), ("anchor", 124, 200, 200, 1),
         ("overhead", 0, 50, 60, 1)],
        {"resnet9": {**RESNET9, "train_time_s": None}, "anchor": {**ANCHOR, "n": 4},
         "overhead": {"overhead_pct": 1.2, "overhead_pct_repeats": [0.5, 1.2, 2.0],
                      "fasttrain_images_per_sec": 99_000.0, "bare_images_per_sec": 100_200.0}},
    )  # fmt: skip
    (results / "stream.json").write_text("Traceback (most recent call last):\n  ...\n")  # exit 0, no JSON
    (results / "calls.tsv").write_text("1\t2026-12-01T10:00:00Z\t497.5\tmachine-a\n")  # the lease's fraction
    (tmp_path / "results.json").write_text(_report("collect", str(results)).stdout)
    rows = {
        line.split(" | ")[0].strip("| "): line
        for line in _report("table", str(tmp_path / "results.json")).stdout.splitlines()
    }
    resnet9 = rows["resnet9 recipe, data resident on the GPU"]
    assert "result unreadable (Unreadable: no train_time_s)" in resnet9 and resnet9.endswith("| not measured |")
    assert "unreadable output after 80 s" in rows["resnet9 recipe, ffcv stream"]
    anchor = rows["reference airbench94_muon.py, same images"]
    assert "stopped at the budget, partial: 90.75% +- 0.20 over 4 seeds" in anchor and "| PARTIAL; -" in anchor
    assert rows["Accelerate + step engine overhead, resident data"].endswith("| <= 3% | met |")
