#!/usr/bin/env bash
# One check of fasttrain on a lent GPU machine (torch present; no internet, no ffcv or wandb): install the wheelhouse,
# convert CIFAR-10, benchmark the loaders, the training step and the loop's overhead, and train ResNet-9 end to end
# through both data modes. Every result lands in $OUT/results.json (log: $OUT/gpu_check.log); a JSON summary is the
# last line printed. Each step runs under `timeout`, and steps that no longer fit the overall budget are skipped and
# reported, so one hang cannot eat the device session.
#
# Prepare here, once (the device machine receives only the repository, and ignored paths only when carried):
#   bash launch/wheelhouse.sh 3.12 .wheelhouse                        # ffcv, wandb, fasttrain... (~7 min the first time)
#   mkdir -p data && cp ../shared/data/cifar10-jpeg.tar.gz data/     # data/ is git-ignored: carry the file
# Then one device call:
#   command: bash launch/gpu_check.sh data/cifar10-jpeg.tar.gz
#   carry:   [".wheelhouse", "data/cifar10-jpeg.tar.gz"]            (about 45 MiB of the 64 MiB allowed)
#   timeout_s: 600
#
# CPU dry run of the same plumbing with tiny settings (no wheel install; this checkout's .venv):
#   GPU_CHECK_DRY_RUN=1 bash launch/gpu_check.sh ../shared/data/cifar10-jpeg.tar.gz     # or: --cpu-smoke ARCHIVE
#
# Knobs: GPU_CHECK_BUDGET_S (overall seconds, default 450), GPU_CHECK_WHEELHOUSE (default .wheelhouse),
# GPU_CHECK_PYTHON, GPU_CHECK_WORK (scratch, default /tmp/fasttrain-gpu-check), OUT (default $GPU_CHECK_WORK/out).
set -uo pipefail  # no -e: a failed step is recorded and the next one runs

dry="${GPU_CHECK_DRY_RUN:-0}"
if [ "${1:-}" = "--cpu-smoke" ]; then dry=1; shift; fi
archive="${1:-data/cifar10-jpeg.tar.gz}"
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo" || exit 1
work="${GPU_CHECK_WORK:-/tmp/fasttrain-gpu-check}"
out="${OUT:-$work/out}"
budget="${GPU_CHECK_BUDGET_S:-450}"
wheelhouse="${GPU_CHECK_WHEELHOUSE:-.wheelhouse}"
rm -rf "$work/results" "$work/runs"
mkdir -p "$out" "$work/results" "$work/runs"
log="$out/gpu_check.log"
: >"$log"
status="$work/results/status.tsv"
: >"$status"
t0=$SECONDS
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR="$work/inductor" WANDB_SILENT=true

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
    device=cpu
    # Tiny settings: every step's plumbing, none of its cost.
    loader_common=(--batch-size 64 --epochs 2 --device cpu)
    workers_a=1 workers_b=2
    model=(--model deepcnn --model-arg widths=8,16 --model-arg blocks=1,1 --batch-size 32 --precision bf16
           --no-compile --steps 3 --repeats 2 --device cpu)
    e2e_config=deepcnn
    e2e=(--model.widths 8,16 --model.blocks 1,1 --train.epochs 1 --train.batch_size 100 --train.lr_peak_epoch 0.5
         --train.mixed_precision no --train.compile off --data.workers 1)
    subset=(--subset 500)
    target=0.05
else
    py="${GPU_CHECK_PYTHON:-python3}"
    device=cuda
    loader_common=(--batch-size 512 --epochs 3 --device cuda)
    workers_a=8 workers_b=16
    model=(--model resnet9 --batch-size 512 --precision bf16 --channels-last --compile --steps 50 --repeats 5)
    e2e_config=resnet9
    e2e=()
    subset=()
    target=0.91
fi
export PYTHON="$py"
say "mode $([ "$dry" = 1 ] && echo 'CPU dry run' || echo GPU), python $py, archive $archive, budget ${budget}s, OUT $out"

# --- 1. what this machine is, and the wheelhouse ------------------------------------------------------------
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >>"$log" 2>&1
if [ "$dry" = 1 ]; then
    say "dry run: wheelhouse not installed ($(ls "$wheelhouse"/*.whl 2>/dev/null | wc -l) wheels in $wheelhouse)"
    printf 'install\tskipped\t0\n' >>"$status"
else
    [ -d "$wheelhouse" ] && ls "$wheelhouse"/*.whl >/dev/null 2>&1 \
        || { say "ERROR: no wheels in $wheelhouse: build them (launch/wheelhouse.sh) and carry the folder"; exit 1; }
    run_step install 120 "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "$wheelhouse"/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
run_step imports 60 "$py" -c 'import json, torch, ffcv, accelerate, numba, numpy, fasttrain
try:
    import wandb; wandb_version = wandb.__version__
except ImportError as e:
    wandb_version = f"missing: {e}"
print(json.dumps({"torch": torch.__version__, "cuda": torch.cuda.is_available(),
                  "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                  "accelerate": accelerate.__version__, "numba": numba.__version__, "numpy": numpy.__version__,
                  "ffcv": ffcv.__file__, "wandb": wandb_version, "fasttrain": fasttrain.__file__}))'

# --- 2. data ------------------------------------------------------------------------------------------------------
data="$work/cifar10$([ "$dry" = 1 ] && echo -subset500)"
[ -f "$archive" ] || say "ERROR: no archive at $archive (copy it into a carried folder: see the top of this script)"
# convert prints progress on stdout: keep it out of the JSON slot.
run_step convert 240 bash -c '"$PYTHON" -m fasttrain.data.convert --source "$1" --out "$2" "${@:3}" >&2 && echo "{}"' \
    _ "$archive" "$data" "${subset[@]}"

# --- 3. benchmarks ------------------------------------------------------------------------------------------------
bench=("$py" -m fasttrain.bench)
run_step "loader_ffcv_w$workers_a" 120 "${bench[@]}" loader --data "$data" --mode ffcv --workers "$workers_a" "${loader_common[@]}"
run_step "loader_ffcv_w$workers_b" 120 "${bench[@]}" loader --data "$data" --mode ffcv --workers "$workers_b" "${loader_common[@]}"
run_step loader_gpu 120 "${bench[@]}" loader --data "$data" --mode gpu --workers "$workers_a" "${loader_common[@]}"
run_step step 240 "${bench[@]}" step "${model[@]}"
run_step overhead 240 "${bench[@]}" overhead "${model[@]}"
wandb_mode=offline
"$py" -c 'import wandb' 2>/dev/null || { wandb_mode=disabled; say "wandb does not import: e2e runs without it"; }
for mode in gpu ffcv; do
    run_step "e2e_$mode" 240 "${bench[@]}" e2e --config "$e2e_config" --target-acc "$target" --launcher accelerate \
        --run-dir "$work/runs/$mode" -- --data.dir "$data" --data.mode "$mode" --wandb.mode "$wandb_mode" "${e2e[@]}"
done

# --- 4. one results.json, and a summary on stdout -----------------------------------------------------------------
"$py" - "$work/results" "$out/results.json" "$((SECONDS - t0))" "$dry" <<'EOF'
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
    if name.startswith("loader"):
        summary[name] = pick(name, "images_per_sec", "warmup_s", "setup_s")
summary["step"] = pick("step", "images_per_sec", "step_time_ms", "compile_time_s", "train_tflops_est")
summary["overhead"] = pick("overhead", "fasttrain_images_per_sec", "bare_images_per_sec", "overhead_pct")
for mode in ("gpu", "ffcv"):
    summary[f"e2e_{mode}"] = pick(f"e2e_{mode}", "time_to_target_s", "val_acc", "tta_acc", "images_per_sec",
                                  "train_time_s", "compile_time_s", "process_wall_s", "epochs")
target.write_text(json.dumps({"summary": summary, "steps": steps}, indent=1) + "\n")
print(json.dumps(summary))
sys.exit(0 if summary["ok"] else 1)
EOF
