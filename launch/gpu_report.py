"""The GPU check's results (launch/gpu_check.sh): gather a sitting's step files into one JSON, and write the README's
Markdown rows from it, each against its target, saying by how much a missed one misses.

    python launch/gpu_report.py collect RESULTS_DIR [DRY_RUN]   -> results.json on stdout
    python launch/gpu_report.py table results.json [more.json]  -> Markdown on stdout (several: merged, later wins)
    python launch/gpu_report.py summary results.json            -> one JSON line; exit 1 if a step failed
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

# The targets of the throughput and airbench issues (the GPU results issue repeats them).
RESNET9_TTA = 0.91
RESNET9_TRAIN_S = {"H100": 14.0, "H200": 12.0}
RESNET9_IMAGES_PER_SEC = 100_000
AIRBENCH_TTA = 0.9075
AIRBENCH_TIME_RATIO = 1.0
OVERHEAD_PCT = 3.0


# --- collect ------------------------------------------------------------------------------------------------------


def collect(results_dir: Path, dry_run: bool) -> dict[str, Any]:
    """Every step of the sitting (its last row in steps.tsv wins: a step not run in one call may run in the next),
    the calls that made them, and whether one machine made them all (one boot id)."""
    calls = []
    for line in _lines(results_dir / "calls.tsv"):
        n, started, budget, boot_id = (line.split("\t") + [""] * 4)[:4]
        calls.append({"call": int(n), "started": started, "budget_s": int(float(budget)), "boot_id": boot_id})
    steps: dict[str, dict[str, Any]] = {}
    for line in _lines(results_dir / "steps.tsv"):
        name, rc, seconds, estimate, call = line.split("\t")
        if name in steps and steps[name]["status"] == "ok":
            continue  # done in an earlier call; later calls only said so
        cmd = results_dir / f"{name}.cmd"
        steps[name] = {
            "status": _status(rc), "exit_code": None if rc == "not_run" else int(rc), "seconds": int(seconds),
            "estimate_s": int(estimate), "call": int(call), "result": _last_json(results_dir / f"{name}.json"),
            "command": cmd.read_text().strip() if cmd.exists() and rc != "not_run" else None,
        }  # fmt: skip
    readback = results_dir / "wandb-resnet9.json"
    return {
        "dry_run": dry_run,
        "calls": calls,
        "one_machine": _one_machine(calls),
        "steps": steps,
        "wandb_readback": _wandb_digest(_last_json(readback)) if readback.exists() else None,
    }


def _one_machine(calls: list[dict[str, Any]]) -> bool:
    """Whether every call ran on one machine (one boot id): the figures are of one sitting."""
    return len({c["boot_id"] for c in calls}) <= 1


def _lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _status(rc: str) -> str:
    if rc == "not_run":
        return "not_run"
    return {"0": "ok", "124": "stopped", "137": "stopped"}.get(rc, "failed")


def _last_json(path: Path) -> Any:
    """The last line of a step's stdout as JSON (the bench prints one object last), else its tail as text."""
    text = path.read_text().strip() if path.exists() else ""
    if not text:
        return None
    try:
        return json.loads(text.splitlines()[-1])
    except json.JSONDecodeError:
        return {"unparsed_stdout": text[-2000:]}


def _wandb_digest(readback: dict[str, Any] | None) -> dict[str, Any] | None:
    """What the read-back W&B run holds: each series' length and range (the whole series is wandb-resnet9.json)."""
    if not readback or "logged" not in readback:
        return readback

    def digest(points: list) -> dict[str, Any]:
        values = [v for _, v in points if isinstance(v, (int, float))]
        return {"points": len(points), "min": min(values, default=None), "max": max(values, default=None)}

    return {
        "wandb_file": readback["wandb_file"], "history_rows": readback["history_rows"],
        "stats_samples": readback["stats_samples"],
        "logged": {key: digest(points) for key, points in readback["logged"].items()},
        "system": {key: digest(points) for key, points in readback["system"].items() if key.startswith("gpu.")},
    }  # fmt: skip


# --- table --------------------------------------------------------------------------------------------------------


def merged(paths: list[Path]) -> dict[str, Any]:
    """Several results.json (say, two machines when the first went back between calls): later steps win."""
    sitting: dict[str, Any] = {"calls": [], "steps": {}, "one_machine": True, "wandb_readback": None}
    for path in paths:
        one = json.loads(path.read_text())
        sitting["calls"] += one["calls"]
        sitting["steps"] |= {k: v for k, v in one["steps"].items() if v["status"] == "ok" or k not in sitting["steps"]}
        sitting["wandb_readback"] = one.get("wandb_readback") or sitting["wandb_readback"]
        sitting["dry_run"] = one.get("dry_run", False)
    sitting["one_machine"] = _one_machine(sitting["calls"])
    return sitting


def table(sitting: dict[str, Any]) -> str:
    steps = sitting["steps"]
    env = (steps.get("imports") or {}).get("result") or {}
    device = env.get("device", "?")
    started = min((c["started"] for c in sitting["calls"]), default="?")
    lines = [
        f"**GPU rows** ({device}; torch {env.get('torch', '?')}, CUDA {env.get('cuda', '?')}, accelerate "
        f"{env.get('accelerate', '?')}; {started[:10]}; `bash launch/gpu_check.sh` in {len(sitting['calls'])} "
        f"call(s) on {'one machine' if sitting['one_machine'] else 'MORE THAN ONE machine'}"
        f"{'; a CPU DRY RUN, not GPU figures' if sitting.get('dry_run') else ''}):",
        "",
        "| what | result | target | verdict |",
        "|---|---|---|---|",
    ]
    anchor = _usable(steps.get("anchor"))
    rows = [
        ("resnet9 recipe, data resident on the GPU", "resnet9", lambda r: _resnet9(r, device)),
        ("resnet9 recipe, ffcv stream", "stream", lambda r: _resnet9(r, device)),
        ("airbench94 recipe (fasttrain), TTA level 2", "airbench", lambda r: _airbench(r, anchor)),
        ("reference airbench94_muon.py, same images", "anchor", lambda r: _anchor(r, steps["anchor"])),
        ("bench step", "step", _step),
        ("Accelerate + step engine overhead, resident data", "overhead", _overhead),
    ]
    rows += [(f"bench loader, {n.removeprefix('loader_w')} workers asked", n, _loader) for n in sorted(steps)
             if n.startswith("loader_w")]  # fmt: skip
    lines += [_row(label, steps.get(name), build) for label, name, build in rows]
    lines.append(_wandb_row(sitting.get("wandb_readback")))
    lines += ["", "Commands, as each step ran them:", ""]
    lines += [f"- {name}: `{s['command']}`" for name, s in steps.items() if s.get("command")]
    return "\n".join(lines) + "\n"


class Unreadable(Exception):
    """A step's result lacks a figure its row needs: the row says so rather than guess."""


def _usable(step: dict | None) -> dict | None:
    """A step's result if it finished, or was stopped at the budget with figures of what it finished."""
    if step is None or step["status"] not in ("ok", "stopped"):
        return None
    result = step["result"]
    return result if isinstance(result, dict) and "unparsed_stdout" not in result else None


def _row(label: str, step: dict | None, build) -> str:
    """One table row: the builder's (label suffix, result, target, misses or None for no target), or why not."""
    r = _usable(step)
    if step is None:
        return f"| {label} | not run in this sitting | | not measured |"
    if step["status"] == "not_run":
        return f"| {label} | not run: the budget ran out (needs about {step['estimate_s']} s) | | not measured |"
    if r is None:
        what = "unreadable output" if step["status"] == "ok" else f"{step['status']} (exit {step['exit_code']})"
        return f"| {label} | {what} after {step['seconds']} s; the log says why | | not measured |"
    try:
        suffix, result, target, misses = build(r)
    except (Unreadable, KeyError, TypeError, ValueError) as e:
        return f"| {label} | result unreadable ({type(e).__name__}: {e}); results.json has it | | not measured |"
    verdict = "-" if misses is None else ("met" if not misses else "MISSED: " + "; ".join(misses))
    if step["status"] == "stopped":
        result, verdict = f"stopped at the budget, partial: {result}", f"PARTIAL; {verdict}"
    return f"| {label}{suffix} | {result} | {target} | {verdict} |"


def _need(r: dict, *keys: str) -> list:
    """The values of `keys` in `r`; Unreadable if one is missing or null."""
    missing = [k for k in keys if r.get(k) is None]
    if missing:
        raise Unreadable(f"no {', '.join(missing)}")
    return [r[k] for k in keys]


def _resnet9(r: dict, device: str) -> tuple:
    tta, train_s, rate = _need(r, "tta_acc", "train_time_s", "images_per_sec")
    limit_s = RESNET9_TRAIN_S["H100"] if "H100" in device else RESNET9_TRAIN_S["H200"]
    misses = []
    if tta < RESNET9_TTA:
        misses.append(f"{100 * (RESNET9_TTA - tta):.2f} pp short of {100 * RESNET9_TTA:.1f}%")
    if train_s > limit_s:
        misses.append(f"{train_s - limit_s:.1f} s over {limit_s:.0f} s")
    if rate < RESNET9_IMAGES_PER_SEC:
        misses.append(f"{rate:,.0f} images/s is {100 * (1 - rate / RESNET9_IMAGES_PER_SEC):.0f}% under 100k")
    to_target, target_acc = r.get("time_to_target_s"), r.get("target_acc")
    reached = f" (val {_pct(target_acc)} reached at {to_target:.1f} s)" if to_target and target_acc else ""
    result = (
        f"{_pct(tta)} flip-TTA (val {_pct(r.get('val_acc'))}) after {r.get('epochs')} epochs; "
        f"`train_time_s` {train_s:.1f} s{reached}; compile {_num(r.get('compile_time_s'), '.1f')} s; "
        f"{rate:,.0f} images/s; {_num(r.get('process_wall_s'))} s wall{_gc(r.get('gc_collections'))}"
    )
    return "", result, f">= {100 * RESNET9_TTA:.1f}% flip-TTA, <= {limit_s:.0f} s, >= 100k images/s", misses


def _airbench(r: dict, anchor: dict | None) -> tuple:
    runs, acc, secs = _need(r, "runs", "tta_acc", "total_time_s")
    mean, std, median = _need(acc, "mean", "std") + _need(secs, "median")
    misses = []
    if mean < AIRBENCH_TTA:
        misses.append(f"mean {100 * (AIRBENCH_TTA - mean):.2f} pp short of {100 * AIRBENCH_TTA:.2f}%")
    if runs < 10:
        misses.append(f"{runs} seeds, not 10")
    ratio = None
    if anchor and anchor.get("time_s_median"):
        ratio = median / anchor["time_s_median"]
        if ratio > AIRBENCH_TIME_RATIO:
            misses.append(f"{ratio:.2f}x the reference's median time ({100 * (ratio - 1):.0f}% slower)")
    else:
        misses.append("no reference time from this sitting to compare with")
    compile_s = ((r.get("compile_time_s") or {}).get("values") or [None])[0]
    result = (
        f"{_pct(mean)} +- {100 * std:.2f} over {runs} seeds; median {median:.2f} s (whitening init + training + "
        f"TTA eval), train {_num((r.get('train_time_s') or {}).get('median'), '.2f')} s; compile "
        f"{_num(compile_s, '.1f')} s once; graphs compiled per run {r.get('compiled_graphs')}"
        f"{_gc(r.get('gc_collections'))}{f'; {ratio:.2f}x the reference' if ratio else ''}"
    )
    target = f"mean >= {100 * AIRBENCH_TTA:.2f}% over 10 seeds, <= {AIRBENCH_TIME_RATIO:.1f}x the reference's median"
    return "", result, target, misses


def _gc(collections: list | None) -> str:
    """Python's garbage collections inside the timed part of a run, or of each repeat (absent from older results)."""
    if not collections:
        return ""
    runs = collections if isinstance(collections[0], list) else [collections]
    full, younger = sum(c[2] for c in runs), sum(c[0] + c[1] for c in runs)
    return f"; GC in the timed part: {full} full, {younger} younger collections" + (
        f" over {len(runs)} runs" if len(runs) > 1 else ""
    )


def _anchor(r: dict, step: dict) -> tuple:
    if not r.get("n"):
        raise Unreadable("no finished run in its output")
    mean, std, median = _need(r, "tta_acc_mean", "tta_acc_std", "time_s_median")
    result = (
        f"{_pct(mean)} +- {100 * std:.2f} over {r['n']} seeds; median {median:.2f} s; {step['seconds']} s in all "
        "(compile, warm-up run, runs)"
    )
    return "", result, "the yardstick", None


def _step(r: dict) -> tuple:
    m = r["settings"]
    suffix = (
        f": {m['model']}, batch {m['batch_size']}, {m['precision']}{', channels-last' if m['channels_last'] else ''}"
        f"{', compiled (' + str(m['compile_mode']) + ')' if m['compile'] else ''}"
    )
    rate, step_ms = _need(r, "images_per_sec", "step_time_ms")
    profile = r.get("profile") or {}
    top = (profile.get("top") or [{}])[0]
    busy = profile.get("device_busy_fraction")
    result = (
        f"{rate:,.0f} images/s, {step_ms:.2f} ms a step, about {_num(r.get('train_tflops_est'))} TFLOP/s; "
        f"compile {_num(r.get('compile_time_s'), '.1f')} s"
        + (f"; GPU busy {100 * busy:.0f}% of the step, {profile.get('kernels_per_step', 0):.0f} kernels a step, "
           f"top kernel {top.get('name', '?')[:60]} ({100 * top.get('share', 0):.0f}%)" if busy is not None else "")
    )  # fmt: skip
    return suffix, result, "the model's ceiling for the loop", None


def _overhead(r: dict) -> tuple:
    pct, repeats, ours, bare = _need(
        r, "overhead_pct", "overhead_pct_repeats", "fasttrain_images_per_sec", "bare_images_per_sec"
    )
    result = (
        f"{pct:+.2f}% step time (median of {len(repeats)}: {min(repeats):+.1f}% to {max(repeats):+.1f}%); "
        f"fasttrain {ours:,.0f} vs bare {bare:,.0f} images/s"
    )
    return "", result, f"<= {OVERHEAD_PCT:.0f}%", [f"{pct - OVERHEAD_PCT:.2f} pp over"] if pct > OVERHEAD_PCT else []


def _loader(r: dict) -> tuple:
    (modes,) = _need(r, "modes")
    result = "; ".join(
        f"{mode} {m['images_per_sec']:,.0f} images/s (warm-up {m['warmup_s']:.1f} s, set-up {m['setup_s']:.1f} s)"
        for mode, m in modes.items()
    )
    return "", f"{(r.get('settings') or {}).get('workers', '?')} workers: {result}", "reported", None


def _wandb_row(readback: dict | None) -> str:
    label = "W&B offline run of the resnet9 run, read back"
    if not readback or "logged" not in readback:
        return f"| {label} | {'not read: ' + json.dumps(readback)[:200] if readback else 'not read'} | | not measured |"
    logged, system = readback["logged"], readback["system"]
    memory = logged.get("sys/gpu_mem_gb", {})
    rate = logged.get("perf/images_per_sec", {})
    gpu_keys = ", ".join(f"{k} ({v['points']})" for k, v in list(system.items())[:4]) or "none"
    result = (
        f"{readback['history_rows']} history rows: `perf/images_per_sec` {rate.get('points', 0)} points "
        f"({_num(rate.get('min'))} to {_num(rate.get('max'))}), `sys/gpu_mem_gb` {memory.get('points', 0)} points "
        f"(peak {_num(memory.get('max'), '.2f')} GB); W&B's own GPU samples: {gpu_keys}"
    )
    verdict = "met" if memory.get("points") and rate.get("points") else "MISSED"
    return f"| {label} | {result} | GPU memory and throughput series | {verdict} |"


def _pct(value: float | None) -> str:
    return "?" if value is None else f"{100 * value:.2f}%"


def _num(value: float | None, spec: str = ",.0f") -> str:
    return "?" if value is None else format(value, spec)


# --- summary ------------------------------------------------------------------------------------------------------


def summary(sitting: dict[str, Any]) -> dict[str, Any]:
    steps = sitting["steps"]
    return {
        "dry_run": sitting.get("dry_run"), "calls": len(sitting["calls"]), "one_machine": sitting["one_machine"],
        "ok": [n for n, s in steps.items() if s["status"] == "ok"],
        "failed": [n for n, s in steps.items() if s["status"] in ("failed", "stopped")],
        "not_run": [n for n, s in steps.items() if s["status"] == "not_run"],
        "seconds": {n: s["seconds"] for n, s in steps.items() if s["status"] != "not_run"},
    }  # fmt: skip


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "collect":
        dry = len(argv) > 2 and argv[2] == "1"
        print(json.dumps(collect(Path(argv[1]), dry), indent=1))
        return 0
    if len(argv) >= 2 and argv[0] == "table":
        print(table(merged([Path(p) for p in argv[1:]])), end="")
        return 0
    if len(argv) == 2 and argv[0] == "summary":
        result = summary(merged([Path(argv[1])]))
        print(json.dumps(result))
        return 1 if result["failed"] else 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
