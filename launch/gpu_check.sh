#!/usr/bin/env bash
# fasttrain on a lent GPU machine (torch present; no internet, no ffcv or wandb), in stages that each fit one device
# call (10 minutes) and share the compile caches under GPU_CHECK_WORK while the machine stays warm:
#   bench    install the wheelhouse, convert CIFAR-10, bench loader (both modes; 8 and 16 workers), step, overhead
#   resnet9  the resnet9 recipe end to end in both data modes (W&B offline)
#   airbench the airbench94 recipe for GPU_CHECK_SEEDS seeds (default 10) through `fasttrain train --run.repeats`
#   anchor   the reference airbench94_muon.py on the same data for the same number of seeds
#   all      the four in order (a CPU dry run fits; a GPU needs one call per stage)
# Each stage installs what it needs if the machine is fresh, writes $OUT/results-<stage>.json and prints a JSON
# summary as its last line. Steps run under `timeout`; steps that no longer fit the budget are skipped and reported.
#
# Prepare here, once (the device machine receives only the repository, and ignored paths only when carried):
#   mkdir -p .gpu && cp -r ../shared/wheels/cp312 .gpu/wheels && .venv/bin/pip wheel --no-deps -w .gpu/wheels .
#   cp ../shared/data/cifar10-jpeg.tar.gz .gpu/ && cp -r ../shared/anchors .gpu/anchors    # .gpu/ is git-ignored
# Then one device call per stage:
#   command: bash launch/gpu_check.sh bench .gpu/cifar10-jpeg.tar.gz      (then resnet9, airbench, anchor)
#   carry:   [".gpu"]                                                      (about 45 MiB of the 64 MiB allowed)
#   timeout_s: 600
#
# CPU dry run of the same plumbing with tiny settings (no wheel install; this checkout's .venv):
#   GPU_CHECK_DRY_RUN=1 bash launch/gpu_check.sh all ../shared/data/cifar10-jpeg.tar.gz
#
# Knobs: GPU_CHECK_BUDGET_S (seconds per invocation, default 540), GPU_CHECK_WHEELHOUSE (default .gpu/wheels),
# GPU_CHECK_ANCHORS (default .gpu/anchors), GPU_CHECK_SEEDS (default 10), GPU_CHECK_PYTHON,
# GPU_CHECK_WORK (scratch kept between stages, default /tmp/fasttrain-gpu-check), OUT (default $GPU_CHECK_WORK/out).
set -uo pipefail  # no -e: a failed step is recorded and the next one runs

dry="${GPU_CHECK_DRY_RUN:-0}"
stage="${1:-all}"
case "$stage" in bench|resnet9|airbench|anchor|all) ;; *) echo "gpu_check: stage must be bench, resnet9, airbench, anchor or all (got '$stage')" >&2; exit 2 ;; esac
archive="${2:-.gpu/cifar10-jpeg.tar.gz}"
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo" || exit 1
work="${GPU_CHECK_WORK:-/tmp/fasttrain-gpu-check}"
out="${OUT:-$work/out}"
budget="${GPU_CHECK_BUDGET_S:-540}"
wheelhouse="${GPU_CHECK_WHEELHOUSE:-.gpu/wheels}"
anchors="$(cd "${GPU_CHECK_ANCHORS:-.gpu/anchors}" 2>/dev/null && pwd)"
seeds="${GPU_CHECK_SEEDS:-10}"
rm -rf "$work/results"
mkdir -p "$out" "$work/results" "$work/runs"
log="$out/gpu_check-$stage.log"
: >"$log"
status="$work/results/status.tsv"
: >"$status"
t0=$SECONDS
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR="$work/inductor" TRITON_CACHE_DIR="$work/triton" WANDB_SILENT=true

say() { printf '[gpu_check %4ds] %s\n' "$((SECONDS - t0))" "$*" | tee -a "$log" >&2; }

# run_step NAME LIMIT_S COMMAND...: stdout (the bench's JSON) to results/NAME.json, stderr to the log and the screen.
run_step() {
    local name="$1" limit="$2" left rc start
    shift 2
    left=$((budget - (SECONDS - t0)))
    if [ "$left" -lt 30 ]; then
        say "skip $name: ${left}s of the ${budget}s budget left"
        printf '%s\tskipped\t0\n' "$name" >>"$status"
        return 0
    fi
    [ "$limit" -le "$left" ] || limit="$left"
    say "$name (limit ${limit}s): $*"
    start=$SECONDS
    timeout -k 15 "$limit" "$@" 2> >(tee -a "$log" >&2) >"$work/results/$name.json"
    rc=$?
    [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && say "$name: timed out after ${limit}s"
    printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" >>"$status"
    say "$name: exit $rc in $((SECONDS - start))s"
}

if [ "$dry" = 1 ]; then
    py="${GPU_CHECK_PYTHON:-$repo/.venv/bin/python}"
    [ -x "$py" ] || py=python3
    # Tiny settings: every step's plumbing, none of its cost.
    loader_common=(--batch-size 64 --epochs 2 --device cpu)
    workers_a=1 workers_b=2
    model=(--model deepcnn --model-arg widths=8,16 --model-arg blocks=1,1 --batch-size 32 --precision bf16
           --no-compile --steps 3 --repeats 2 --device cpu)
    e2e_config=deepcnn
    e2e=(--model.widths 8,16 --model.blocks 1,1 --train.epochs 1 --train.batch_size 100 --train.lr_peak_epoch 0.5
         --train.mixed_precision no --train.compile off --data.workers 1)
    airbench=(--model.widths 16,32,32 --train.epochs 1 --train.batch_size 100 --train.compile off
              --train.mixed_precision no --data.eval_batch_size 250)
    seeds=2
    subset=(--subset 500)
    target=0.05
else
    py="${GPU_CHECK_PYTHON:-python3}"
    loader_common=(--batch-size 512 --epochs 3 --device cuda)
    workers_a=8 workers_b=16
    model=(--model resnet9_ffcv --batch-size 512 --precision bf16 --channels-last --compile --steps 50 --repeats 5)
    e2e_config=resnet9
    e2e=()
    airbench=()
    subset=()
    target=0.91
fi
export PYTHON="$py"
say "stage $stage, $([ "$dry" = 1 ] && echo 'CPU dry run' || echo GPU), python $py, archive $archive, budget ${budget}s, OUT $out"
wants() { [ "$stage" = all ] || [ "$stage" = "$1" ]; }

# --- 1. what this machine is, and the wheelhouse (installed once per machine, kept in /tmp/site) ------------------
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >>"$log" 2>&1
if [ "$dry" = 1 ]; then
    say "dry run: wheelhouse not installed ($(ls "$wheelhouse"/*.whl 2>/dev/null | wc -l) wheels in $wheelhouse)"
elif [ ! -f /tmp/site/.installed ]; then
    [ -d "$wheelhouse" ] && ls "$wheelhouse"/*.whl >/dev/null 2>&1 \
        || { say "ERROR: no wheels in $wheelhouse: copy them (see the top of this script) and carry the folder"; exit 1; }
    run_step install 180 "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "$wheelhouse"/*.whl
    PYTHONPATH=/tmp/site "$py" -c 'import ffcv, wandb, fasttrain' 2>/dev/null && touch /tmp/site/.installed
fi
[ "$dry" = 1 ] || export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
run_step imports 60 "$py" -c 'import json, torch, ffcv, accelerate, numba, numpy, fasttrain
try:
    import wandb; wandb_version = wandb.__version__
except ImportError as e:
    wandb_version = f"missing: {e}"
print(json.dumps({"torch": torch.__version__, "cuda": torch.cuda.is_available(),
                  "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                  "accelerate": accelerate.__version__, "numba": numba.__version__, "numpy": numpy.__version__,
                  "ffcv": ffcv.__file__, "wandb": wandb_version, "fasttrain": fasttrain.__file__}))'

# --- 2. data (converted once per machine) -------------------------------------------------------------------------
data="$work/cifar10$([ "$dry" = 1 ] && echo -subset500)"
[ -f "$archive" ] || say "ERROR: no archive at $archive (copy it into a carried folder: see the top of this script)"
if [ ! -f "$data/manifest.json" ]; then
    # convert prints progress on stdout: keep it out of the JSON slot.
    run_step convert 240 bash -c '"$PYTHON" -m fasttrain.data.convert --source "$1" --out "$2" "${@:3}" >&2 && echo "{}"' \
        _ "$archive" "$data" "${subset[@]}"
fi
bench=("$py" -m fasttrain.bench)
wandb_mode=offline
"$py" -c 'import wandb' 2>/dev/null || { wandb_mode=disabled; say "wandb does not import: runs go without it"; }

# --- 3. stages ----------------------------------------------------------------------------------------------------
if wants bench; then
    run_step "loader_w$workers_a" 150 "${bench[@]}" loader --data "$data" --mode both --workers "$workers_a" "${loader_common[@]}"
    run_step "loader_w$workers_b" 150 "${bench[@]}" loader --data "$data" --mode both --workers "$workers_b" "${loader_common[@]}"
    run_step step 240 "${bench[@]}" step "${model[@]}"
    run_step overhead 240 "${bench[@]}" overhead --data "$data" "${model[@]}"
fi
if wants resnet9; then
    for mode in resident stream; do
        run_step "e2e_$mode" 270 "${bench[@]}" e2e --config "$e2e_config" --target-acc "$target" --launcher accelerate \
            --run-dir "$work/runs/resnet9-$mode" -- --data.dir "$data" --data.mode "$mode" --wandb.mode "$wandb_mode" \
            "${e2e[@]}"
    done
fi
if wants airbench; then
    rm -rf "$work/runs/airbench94"
    # repeats.json holds each seed's TTA accuracy and airbench's time (whitening init + training + final TTA eval).
    run_step airbench 500 bash -c '"$PYTHON" -m fasttrain train --config airbench94 --run.repeats "$1" --data.dir "$2" \
        --run.dir "$3" --wandb.mode "$4" "${@:5}" >&2 && "$PYTHON" -c "import json, sys; print(json.dumps(json.load(open(sys.argv[1]))))" "$3/repeats.json"' \
        _ "$seeds" "$data" "$work/runs/airbench94" "$wandb_mode" "${airbench[@]}"
fi
if wants anchor; then
    if [ "$dry" = 1 ]; then
        say "dry run: the anchor needs CUDA; skipped"
    elif [ -z "$anchors" ] || [ ! -f "$anchors/airbench94_muon.py" ]; then
        say "ERROR: no airbench94_muon.py under ${GPU_CHECK_ANCHORS:-.gpu/anchors}: copy ../shared/anchors and carry it"
        printf 'anchor\t1\t0\n' >>"$status"
    else
        mkdir -p "$work/anchor"
        [ -f "$work/anchor/cifar10/test.pt" ] || "$py" "$anchors/prep_cifar_pt_from_archive.py" "$archive" "$work/anchor/cifar10" >>"$log" 2>&1
        sed "s/for run in range(200)/for run in range($seeds)/" "$anchors/airbench94_muon.py" >"$work/anchor/airbench94_muon.py"
        # Its own table and "Mean: ... Std: ..." go to the log; the JSON slot gets each run's figures.
        run_step anchor 540 bash -c 'cd "$1" && "$PYTHON" airbench94_muon.py >anchor.txt 2>&1; rc=$?; cat anchor.txt >&2;
            "$PYTHON" "$2/launch/anchor_table.py" anchor.txt; exit $rc' _ "$work/anchor" "$repo"
    fi
fi

# --- 4. results-<stage>.json, and a summary on stdout -----------------------------------------------------------------
"$py" - "$work/results" "$out/results-$stage.json" "$((SECONDS - t0))" "$dry" <<'EOF'
import json, sys
from pathlib import Path

results_dir, target, total_s, dry = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
steps = {}
for line in (results_dir / "status.tsv").read_text().splitlines():
    name, rc, seconds = line.split("\t")
    text = (results_dir / f"{name}.json").read_text().strip() if (results_dir / f"{name}.json").exists() else ""
    try:
        result = json.loads(text.splitlines()[-1]) if text else None
    except json.JSONDecodeError:
        result = {"unparsed_stdout": text[-2000:]}
    steps[name] = {"exit_code": None if rc == "skipped" else int(rc), "skipped": rc == "skipped",
                   "seconds": int(seconds), "result": result}

def pick(name, *keys):
    result = (steps.get(name) or {}).get("result") or {}
    return {k: result.get(k) for k in keys} if result else None

summary = {
    "dry_run": dry, "total_s": total_s,
    "ok": all(s["exit_code"] == 0 for s in steps.values() if not s["skipped"]),
    "failed": [n for n, s in steps.items() if not s["skipped"] and s["exit_code"] != 0],
    "skipped": [n for n, s in steps.items() if s["skipped"]],
    "env": next((s["result"]["env"] for s in steps.values() if isinstance(s["result"], dict) and "env" in s["result"]), None),
}
for name in steps:
    if name.startswith("loader"):  # `bench loader --mode both`: one entry per data mode
        modes = ((steps[name].get("result") or {}).get("modes")) or {}
        summary[name] = {mode: {k: r.get(k) for k in ("images_per_sec", "warmup_s", "setup_s")}
                         for mode, r in modes.items()} or None
summary["step"] = pick("step", "images_per_sec", "step_time_ms", "compile_time_s", "train_tflops_est")
summary["overhead"] = pick("overhead", "fasttrain_images_per_sec", "bare_images_per_sec", "overhead_pct")
for mode in ("resident", "stream"):
    summary[f"e2e_{mode}"] = pick(f"e2e_{mode}", "time_to_target_s", "val_acc", "tta_acc", "images_per_sec",
                                  "train_time_s", "compile_time_s", "process_wall_s", "epochs")
ours, anchor = (steps.get("airbench") or {}).get("result"), (steps.get("anchor") or {}).get("result")
if ours:
    summary["airbench"] = {"runs": ours.get("runs"), "tta_acc_mean": ours["tta_acc"]["mean"],
                           "tta_acc_std": ours["tta_acc"]["std"], "time_s_median": ours["total_time_s"]["median"],
                           "compile_time_s": ours["compile_time_s"]["values"][:1],
                           "compiled_graphs": ours.get("compiled_graphs")}
if anchor:
    summary["anchor"] = {k: anchor.get(k) for k in ("n", "tta_acc_mean", "tta_acc_std", "time_s_median")}
target.write_text(json.dumps({"summary": summary, "steps": steps}, indent=1) + "\n")
print(json.dumps(summary))
sys.exit(0 if summary["ok"] else 1)
EOF
