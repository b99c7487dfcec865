#!/usr/bin/env bash
# fasttrain on a lent CUDA machine (torch there; no internet, no ffcv, no wandb), measured side by side with the
# reference airbench94_muon.py, inside the 15 minutes of device time a task has, the machine's start included: one
# call of under 10 minutes, then at once, while the machine is still warm, a second call that carries on.
#
#   bash launch/gpu_check.sh [STEP ...]          (no STEP: all of them, in this order, the most telling first)
#
#   resnet9   the resnet9 recipe end to end, data resident on the GPU, W&B offline and read back
#   airbench  the airbench94 recipe, GPU_CHECK_SEEDS seeds (default 10) in one process (compiled once)
#   anchor    the reference airbench94_muon.py on the same images, the same number of seeds
#   stream    the resnet9 recipe end to end on ffcv's streaming loader
#   step      bench step (resnet9_ffcv, bf16, channels-last, compiled), with a torch.profiler summary
#   overhead  bench overhead (fasttrain's step through Accelerate against a bare loop), with a profile of ours
#   loaders   bench loader, both data modes, 8 and 16 workers
#
# Before the first step, whatever this machine lacks yet: the wheelhouse (into /tmp/site), the archive converted, and
# the anchor's .pt files (made beside the conversion: both on the CPU, before anything is timed).
#
# Budget: GPU_CHECK_BUDGET_S seconds for this call (default 570; give the run a timeout_s of 600). A step starts only
# when its expected seconds (ESTIMATE_S below: guesses for a cold H200 until a sitting measures them) fit in what is
# left, and is stopped when the budget is spent. At the first step that does not fit the call ends, so that the next
# call, with the device time this one did not spend, starts with it; GPU_CHECK_FILL=1 (for the last call) runs the
# later steps that still fit instead. On the same machine a step that finished is never run again, and one that
# failed or was stopped is tried again only when named (rm -r $GPU_CHECK_WORK/results starts over). After every step
# the sitting so far is written to $OUT: results.json, results.md (launch/gpu_report.py), wandb-resnet9.json and
# gpu_check.log.
#
# Prepare here, once (the device machine receives only the repository, and ignored paths only when carried):
#   mkdir -p .gpu && cp -r ../shared/wheels/cp312 .gpu/wheels && .venv/bin/pip wheel --no-deps -w .gpu/wheels .
#   cp ../shared/data/cifar10-jpeg.tar.gz .gpu/ && cp -r ../shared/anchors .gpu/anchors    # .gpu/ is git-ignored
# Then two device calls, the second as soon as the first returns, within the 30 s the machine stays warm (<left>: the
# first reply's lease.budget_left_s less 60 s):
#   command: bash launch/gpu_check.sh                                       carry: [".gpu"]   timeout_s: 600
#   command: GPU_CHECK_FILL=1 GPU_CHECK_BUDGET_S=<left> bash launch/gpu_check.sh   (same carry; timeout_s <left>+20)
# If the first reply's lease says the machine is no longer warm, the second call starts a fresh one (a minute or
# two, the setup again): name only the steps still missing (`... bash launch/gpu_check.sh anchor stream`), keep both
# results.json, and merge them: python launch/gpu_report.py table results-1.json results-2.json.
#
# CPU dry run of the same plumbing with tiny settings (this checkout's .venv; no wheel install; no anchor):
#   GPU_CHECK_DRY_RUN=1 bash launch/gpu_check.sh
#
# Knobs: GPU_CHECK_ARCHIVE (default .gpu/cifar10-jpeg.tar.gz), GPU_CHECK_WHEELHOUSE (.gpu/wheels), GPU_CHECK_ANCHORS
# (.gpu/anchors), GPU_CHECK_SEEDS (10), GPU_CHECK_PYTHON, GPU_CHECK_SITE (where wheels go: /tmp/site; GPU_CHECK_SITE=
# none installs nothing), GPU_CHECK_WORK (scratch kept between calls: /tmp/fasttrain-gpu-check), OUT ($work/out).
set -uo pipefail  # no -e: a failed step is recorded and the next one runs

ALL_STEPS=(resnet9 airbench anchor stream step overhead loaders)
declare -A ESTIMATE_S=([resnet9]=110 [airbench]=200 [anchor]=200 [stream]=90 [step]=45 [overhead]=60 [loaders]=70)

steps=("$@")
retry=1  # steps named: those that failed earlier run again; no names: every step gets one try on this machine
[ "${#steps[@]}" -gt 0 ] || { steps=("${ALL_STEPS[@]}"); retry=0; }
for s in "${steps[@]}"; do
    [ -n "${ESTIMATE_S[$s]:-}" ] || { echo "gpu_check: no step '$s'; the steps are: ${ALL_STEPS[*]}" >&2; exit 2; }
done
dry="${GPU_CHECK_DRY_RUN:-0}"
fill="${GPU_CHECK_FILL:-0}"
deferred=""  # the first step of this call that did not fit (GPU_CHECK_FILL=0)
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo" || exit 1
archive="${GPU_CHECK_ARCHIVE:-.gpu/cifar10-jpeg.tar.gz}"
work="${GPU_CHECK_WORK:-/tmp/fasttrain-gpu-check}"
out="${OUT:-$work/out}"
budget="${GPU_CHECK_BUDGET_S:-570}"
wheelhouse="${GPU_CHECK_WHEELHOUSE:-.gpu/wheels}"
anchors="${GPU_CHECK_ANCHORS:-.gpu/anchors}"
seeds="${GPU_CHECK_SEEDS:-10}"
results="$work/results"  # kept between calls: <step>.json (its stdout), steps.tsv, calls.tsv
mkdir -p "$out" "$results" "$work/runs"
log="$out/gpu_check.log"
touch "$work/gpu_check.log"
call=$(($([ -f "$results/calls.tsv" ] && wc -l <"$results/calls.tsv" || echo 0) + 1))
t0=$SECONDS
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR="$work/inductor" TRITON_CACHE_DIR="$work/triton" WANDB_SILENT=true

say() { printf '[gpu_check call %d %4ds] %s\n' "$call" "$((SECONDS - t0))" "$*" | tee -a "$work/gpu_check.log" >&2; }
left() { echo $((budget - (SECONDS - t0))); }
done_before() { grep -q "^$1"$'\t'"0"$'\t' "$results/steps.tsv" 2>/dev/null; }
tried_before() { grep "^$1"$'\t' "$results/steps.tsv" 2>/dev/null | grep -qv $'\tnot_run\t'; }
to_try() { ! done_before "$1" && { [ "$retry" = 1 ] || ! tried_before "$1"; }; }

# write_out: the sitting so far under $OUT (results.json, results.md, the log, the W&B read-back), after every step,
# so a call stopped from outside still brings back what it measured.
write_out() {
    cp "$work/gpu_check.log" "$log"
    [ -s "$results/wandb-resnet9.json" ] && cp "$results/wandb-resnet9.json" "$out/"
    "$py" launch/gpu_report.py collect "$results" "$dry" >"$out/results.json.tmp" \
        && mv "$out/results.json.tmp" "$out/results.json" \
        && "$py" launch/gpu_report.py table "$out/results.json" >"$out/results.md"
}

# run_step NAME ESTIMATE_S COMMAND...: its stdout (one JSON object) to results/NAME.json, stderr to the log, the
# command to NAME.cmd; a row "NAME rc seconds estimate call" in steps.tsv. Skipped when it finished in an earlier
# call (or failed there, unless named), or when it cannot fit in what is left of the budget.
run_step() {
    local name="$1" estimate="$2" rc start
    shift 2
    if done_before "$name"; then
        say "$name: done in an earlier call on this machine"
        return 0
    fi
    if ! to_try "$name"; then
        say "$name: tried in an earlier call on this machine and did not finish; not tried again (name it to retry)"
        return 0
    fi
    if [ -n "$deferred" ] || [ "$estimate" -gt "$(left)" ]; then
        # Without GPU_CHECK_FILL the call ends at the first step that does not fit, so the next call (with the
        # device time this one did not spend) starts with it; with it, later steps that fit still run.
        [ "$fill" = 1 ] || [ -n "$deferred" ] || deferred="$name"
        say "not run: $name (needs about ${estimate}s, $(left)s of the ${budget}s budget left${deferred:+; \
from $deferred on, every step waits}): for the next call"
        printf '%s\tnot_run\t0\t%s\t%s\n' "$name" "$estimate" "$call" >>"$results/steps.tsv"
        return 0
    fi
    say "$name (about ${estimate}s, stopped after $(($(left) - 10))s): $*"
    start=$SECONDS
    printf '%q ' "$@" >"$results/$name.cmd"
    # Stopped 10 s before the budget ends (killed 5 s later): what it measured is still written out in time.
    timeout -k 5 $(($(left) - 10)) "$@" 2> >(tee -a "$work/gpu_check.log" >&2) >"$results/$name.json"
    rc=$?
    { [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; } && say "$name: stopped: the budget was spent"
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" "$estimate" "$call" >>"$results/steps.tsv"
    say "$name: exit $rc in $((SECONDS - start))s"
    write_out
}

if [ "$dry" = 1 ]; then
    py="${GPU_CHECK_PYTHON:-$repo/.venv/bin/python}"
    [ -x "$py" ] || py=python3
    site="${GPU_CHECK_SITE:-none}"
    budget="${GPU_CHECK_BUDGET_S:-1800}"
    # Tiny settings: every step's plumbing, none of its cost.
    loader=(--batch-size 64 --epochs 2 --device cpu)
    workers=(1 2)
    model=(--model deepcnn --model-arg widths=8,16 --model-arg blocks=1,1 --batch-size 32 --precision bf16
           --no-compile --steps 3 --repeats 2 --profile-steps 2 --device cpu)
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
    site="${GPU_CHECK_SITE:-/tmp/site}"
    loader=(--batch-size 512 --epochs 3 --device cuda)
    workers=(8 16)
    model=(--model resnet9_ffcv --batch-size 512 --precision bf16 --channels-last --compile --steps 50 --repeats 5
           --profile-steps 10)
    e2e_config=resnet9
    e2e=()
    airbench=()
    subset=()
    target=0.91
fi
export PYTHON="$py"
budget="${budget%%.*}"  # the lease reports seconds with a fraction
[[ "$budget" =~ ^[0-9]+$ ]] || { echo "gpu_check: GPU_CHECK_BUDGET_S must be a number of seconds (got '$budget')" >&2; exit 2; }
printf '%s\t%s\t%s\t%s\n' "$call" "$(date -u +%FT%TZ)" "$budget" "$(cat /proc/sys/kernel/random/boot_id 2>/dev/null)" \
    >>"$results/calls.tsv"
say "$([ "$dry" = 1 ] && echo 'CPU dry run' || echo GPU), steps ${steps[*]}, python $py, budget ${budget}s, OUT $out"
command -v nvidia-smi >/dev/null &&
    nvidia-smi --query-gpu=name,uuid,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>&1 | tee -a "$work/gpu_check.log" >&2

# --- what this machine lacks: the wheelhouse, the converted data, the anchor's .pt files --------------------------
if [ "$site" != none ] && [ ! -f "$site/.installed" ]; then
    ls "$wheelhouse"/*.whl >/dev/null 2>&1 \
        || { say "ERROR: no wheels in $wheelhouse: copy them (see the top of this script) and carry the folder"; exit 1; }
    run_step install 20 "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$site" "$wheelhouse"/*.whl
    PYTHONPATH="$site" "$py" -c 'import ffcv, wandb, fasttrain' && touch "$site/.installed"
fi
# The checkout comes first: its fasttrain is the one measured, in this process and in every trainer it starts.
[ "$site" = none ] || export PYTHONPATH="$repo:$site${PYTHONPATH:+:$PYTHONPATH}"
run_step imports 15 "$py" -c 'import json, torch, ffcv, accelerate, numba, numpy, fasttrain, wandb
print(json.dumps({"torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
                  "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                  "accelerate": accelerate.__version__, "numba": numba.__version__, "numpy": numpy.__version__,
                  "wandb": wandb.__version__, "ffcv": ffcv.__file__, "fasttrain": fasttrain.__file__}))'

data="$work/cifar10$([ "$dry" = 1 ] && echo -subset500)"
anchor_dir="$work/anchor"
wants_anchor=0
[[ " ${steps[*]} " == *" anchor "* ]] && [ "$dry" != 1 ] && to_try anchor && wants_anchor=1
anchor_prep=""
if [ "$wants_anchor" = 1 ] && [ ! -f "$anchor_dir/cifar10/test.pt" ]; then
    mkdir -p "$anchor_dir"
    say "anchor data: $anchors/prep_cifar_pt_from_archive.py, beside the conversion"
    "$py" "$anchors/prep_cifar_pt_from_archive.py" "$archive" "$anchor_dir/cifar10" >>"$work/gpu_check.log" 2>&1 &
    anchor_prep=$!
fi
if [ ! -f "$data/manifest.json" ]; then
    [ -f "$archive" ] || { say "ERROR: no archive at $archive (copy it into a carried folder: see the top)"; exit 1; }
    # convert prints its progress on stdout: keep it out of the JSON slot.
    run_step convert 30 bash -c '"$PYTHON" -m fasttrain.data.convert --source "$1" --out "$2" "${@:3}" >&2 && echo "{}"' \
        _ "$archive" "$data" "${subset[@]}"
fi
[ -z "$anchor_prep" ] || wait "$anchor_prep" || say "anchor data: the .pt files were not made (the log says why)"
bench=("$py" -m fasttrain.bench)

# --- the steps ----------------------------------------------------------------------------------------------------
e2e_run() {  # e2e_run STEP MODE; a retried step starts in an empty run directory (the trainer refuses a used one)
    run_step "$1" "${ESTIMATE_S[$1]}" bash -c 'rm -rf "$1" && shift && exec "$@"' _ "$work/runs/resnet9-$2" \
        "${bench[@]}" e2e --config "$e2e_config" --target-acc "$target" --launcher accelerate \
        --run-dir "$work/runs/resnet9-$2" -- --data.dir "$data" --data.mode "$2" --wandb.mode offline "${e2e[@]}"
}
step_resnet9() {
    # W&B samples the GPU (memory, utilisation) every second rather than every 15: a 20-second run gets a series.
    WANDB__STATS_SAMPLING_INTERVAL=1 e2e_run resnet9 resident
    if done_before resnet9 && [ ! -s "$results/wandb-resnet9.json" ]; then
        "$py" launch/wandb_readback.py "$work/runs/resnet9-resident" >"$results/wandb-resnet9.json" 2>>"$work/gpu_check.log" \
            || say "wandb read-back failed (the log says why)"
    fi
}
step_airbench() {
    # repeats.json: each seed's TTA accuracy and airbench's time (whitening init + training + final TTA evaluation).
    # W&B is off: ten W&B starts would cost the budget more than they show.
    run_step airbench "${ESTIMATE_S[airbench]}" bash -c 'rm -rf "$3" && "$PYTHON" -m fasttrain train --config airbench94 \
        --run.repeats "$1" --data.dir "$2" --run.dir "$3" --wandb.mode disabled "${@:4}" >&2 \
        && "$PYTHON" -c "import json, sys; print(json.dumps(json.load(open(sys.argv[1]))))" "$3/repeats.json"' \
        _ "$seeds" "$data" "$work/runs/airbench94" "${airbench[@]}"
}
step_anchor() {
    if [ "$dry" = 1 ]; then
        say "dry run: the anchor needs CUDA; not run"
    elif [ ! -f "$anchors/airbench94_muon.py" ] || [ ! -f "$anchor_dir/cifar10/test.pt" ]; then
        say "ERROR: no $anchors/airbench94_muon.py or its data: copy ../shared/anchors and carry it"
        printf 'anchor\t1\t0\t%s\t%s\n' "${ESTIMATE_S[anchor]}" "$call" >>"$results/steps.tsv"
    else
        sed "s/for run in range(200)/for run in range($seeds)/" "$anchors/airbench94_muon.py" >"$anchor_dir/airbench94_muon.py"
        # Its console table goes to the log and anchor.txt; anchor_table.py then reads each finished run from it
        # (also when the budget stopped it: the seeds it finished still count, and the report says how many).
        run_step anchor "${ESTIMATE_S[anchor]}" bash -c 'set -o pipefail; cd "$1" && "$PYTHON" airbench94_muon.py 2>&1 | tee anchor.txt >&2' \
            _ "$anchor_dir"
        [ -f "$anchor_dir/anchor.txt" ] && "$py" launch/anchor_table.py "$anchor_dir/anchor.txt" >"$results/anchor.json"
        write_out
    fi
}
step_stream() { e2e_run stream stream; }
step_step() { run_step step "${ESTIMATE_S[step]}" "${bench[@]}" step "${model[@]}"; }
step_overhead() { run_step overhead "${ESTIMATE_S[overhead]}" "${bench[@]}" overhead --data "$data" "${model[@]}"; }
step_loaders() {
    for w in "${workers[@]}"; do
        run_step "loader_w$w" $((ESTIMATE_S[loaders] / 2)) "${bench[@]}" loader --data "$data" --mode both \
            --workers "$w" "${loader[@]}"
    done
}
for s in "${steps[@]}"; do "step_$s"; done

# --- the sitting so far: results.json and results.md under $OUT, and a one-line summary last ----------------------
write_out && "$py" launch/gpu_report.py summary "$out/results.json"
