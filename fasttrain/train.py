"""Train a CIFAR-10 classifier: `accelerate launch fasttrain/train.py [--config RECIPE] [--section.key value ...]`.

Also `accelerate launch -m fasttrain.train ...`, `fasttrain train ...` or `python fasttrain/train.py ...` (one
process). `train()` reads top to bottom: configuration -> Accelerator and run plan -> data -> model, optimisers and
schedules -> resume -> warm-up -> epochs -> final evaluation -> summary. One training step is
`StepEngine.step` (fasttrain/loop/engine.py); what a run reports is fasttrain/tracking/report.py.
"""

from __future__ import annotations

import copy
import os
import re
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script: put the repository root, not fasttrain/, first on the path, so `fasttrain.*` imports work
    # from a checkout and nothing inside the package can shadow a top-level module.
    sys.path[0] = str(Path(__file__).resolve().parents[1])
    if __name__ == "__main__":  # not when another program loads this file by its path
        from fasttrain.errors import interrupts_end_quietly_until_main

        interrupts_end_quietly_until_main("fasttrain train")  # torch's import takes seconds

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm import tqdm

import fasttrain
from fasttrain import models
from fasttrain.config import Config, help_text, load_config
from fasttrain.data.loaders import build_loaders, build_train_eval_loader
from fasttrain.data.prepare import prepare_data
from fasttrain.errors import (
    EXIT_NONFINITE,
    EXIT_OK,
    ConfigError,
    FasttrainError,
    NonFiniteLoss,
    exit_process,
    python_interrupts_again,
    run_command,
    signal_exit_code,
)
from fasttrain.files import is_write_failure, write_failure_reason, write_json
from fasttrain.loop import checkpoint
from fasttrain.loop.collector import GcCounts, frozen_heap
from fasttrain.loop.distributed import (
    StopSignals,
    from_main,
    inject_fault,
    parameters_agree,
    per_rank,
    sum_across_ranks,
    sync_buffers,
)
from fasttrain.loop.engine import StepEngine, WindowStats, prepare_for_engine, raise_if_nonfinite
from fasttrain.loop.evaluate import evaluate, tta_logits
from fasttrain.loop.optim import (
    assign_params,
    build_optimizers,
    build_schedulers,
    follow_config,
    group_settings,
    peak_lrs,
)
from fasttrain.loop.resolve import RunPlan, configure_backends, make_accelerator, resolve
from fasttrain.profiling import synchronize
from fasttrain.tracking import console
from fasttrain.tracking.report import Reporter, run_finished

DATA_INIT_IMAGES = 5000  # training images a model's data-dependent initialisation sees (airbench's whitening)


# --- setup: each function returns what it builds ----------------------------------------------------------------


def default_recipe() -> str:
    """The recipe a command line without --config trains, said once per machine (before Accelerate starts)."""
    on_cuda = torch.cuda.is_available()
    if os.environ.get("LOCAL_RANK", "0") == "0":
        print(
            "fasttrain: a CUDA device is here, so no --config means the GPU recipe resnet9"
            if on_cuda
            else "fasttrain: no CUDA device found, so no --config means the CPU recipe cpu_quick (a small net, a "
            "few minutes). Pass --config resnet9 for the full GPU recipe (hours on a CPU)."
        )
    return "resnet9" if on_cuda else "cpu_quick"


def timestamped_run_dir(name: str) -> Path:
    """runs/<name>-<UTC time>, the directory of a run (or of a run's repeats) given no run.dir."""
    return Path("runs") / f"{name}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"


def newest_run_dir(name: str) -> Path | None:
    """The newest runs/<name>-<UTC time> of a single run that saved a checkpoint: not another name that starts with
    <name>- (`exp-long-...` for `exp`), nor a directory of repeats, nor one left by a start that failed early."""
    stamped = re.compile(rf"{re.escape(name)}-\d{{8}}-\d{{6}}")
    runs = Path("runs")
    if not runs.is_dir():
        return None
    found = [p for p in runs.iterdir() if stamped.fullmatch(p.name) and checkpoint.checkpoint_dirs(p / "checkpoints")]
    return max(found, default=None)  # the fixed-width stamp sorts by time


RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json")  # what a run writes; a start that failed early, none
WRITTEN = (*RUN_FILES, "command.txt", "curves.png", "model.safetensors")  # every file a run writes at its top


def run_dir_problem(run_dir: Path, resume: str) -> str | None:
    """Why this run cannot write into `run_dir`, or None once run_dir/checkpoints exists and takes a file. Refused:
    a checkpoint or a folder of them; a folder with files of a run's names but no run (they would be overwritten);
    a run, unless --resume auto/force continues it (or --resume DIR names its newest checkpoint); a finished run with
    nothing to go on from. Other files (a recipe, a log, lost+found) may stay beside a run."""
    try:
        if (run_dir / checkpoint.META).exists():
            return f"run.dir {run_dir} is a checkpoint; to go on from it, pass it to --resume with another --run.dir"
        if checkpoint.checkpoint_dirs(run_dir):
            return f"run.dir {run_dir} is a folder of checkpoints; pass one to --resume with another --run.dir"
        present = sorted(p.name for p in run_dir.iterdir()) if run_dir.is_dir() else []
        clashing = [name for name in present if name in WRITTEN]
        if clashing and not any(name in RUN_FILES for name in clashing):
            return (
                f"run.dir {run_dir} holds {', '.join(clashing)} but no run; a run would overwrite them: choose another "
                "--run.dir"
            )
        saved = checkpoint.checkpoint_dirs(run_dir / "checkpoints")
        found = next((name for name in RUN_FILES if name in present), "checkpoints" if saved else None)
        continued = resume in ("auto", "force")
        if found and saved and resume not in ("no", "auto", "force"):
            newest = checkpoint.newest_intact(run_dir / "checkpoints")
            continued = newest is not None and Path(resume).resolve() == newest.resolve()
        if found and not continued:
            how = "continue it with --resume auto" if saved else "it saved no checkpoint: --resume auto starts it over"
            if resume != "no":  # an explicit checkpoint, of this run or another
                how = "--resume DIR goes on from a checkpoint into a new --run.dir (leave it out for one), or " + how
            return f"run.dir {run_dir} already holds a run ({found}); {how}, or choose another --run.dir"
        if found and not saved and resume in ("auto", "force") and run_finished(run_dir):
            return (
                f"run.dir {run_dir} holds a finished run and no checkpoint to continue from; --resume "
                f"{resume} would train it again over its outputs: choose another --run.dir"
            )
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        return f"run.dir: cannot write to {run_dir} ({e.strerror}); choose a writable --run.dir"
    return None


def make_run_dir(cfg: Config, accelerator: Accelerator) -> tuple[Path, Path | None]:
    """`run.dir`, or runs/<name>-<time>; with --resume auto and no run.dir, the newest run of that name. A run
    directory that holds a run already is refused unless resumed: a second run would overwrite the first's files.
    Also returns the run directory again if the main process made it (None elsewhere, or if it was there)."""
    if cfg.run.dir:
        run_dir = Path(cfg.run.dir)
    elif cfg.run.resume in ("auto", "force") and (earlier := newest_run_dir(cfg.run.name)):
        run_dir = earlier
    else:
        run_dir = timestamped_run_dir(cfg.run.name)
    run_dir = Path(from_main(accelerator, str(run_dir)))
    created = run_dir if accelerator.is_main_process and not run_dir.exists() else None
    # The main process decides for every rank, so that all stop together.
    problem = from_main(accelerator, run_dir_problem(run_dir, cfg.run.resume) if accelerator.is_main_process else None)
    if problem:
        raise ConfigError(problem)
    return run_dir, created


@contextmanager
def removed_unless_written(created: Path | None) -> Iterator[None]:
    """A start that fails before the run writes a file (a bad data source, a model that does not fit the images)
    removes the run directory it made and its checkpoints/ folder, while they are empty, so neither is left to look
    like a run. Only empty folders are removed (os.rmdir), never a parent such as runs/ that another run may share."""
    try:
        yield
    except BaseException:
        if created is not None:
            for folder in (created / "checkpoints", created):
                try:
                    os.rmdir(folder)
                except OSError:  # holds something, or is gone: leave it and what is above it
                    break
        raise


def build_model(cfg: Config, plan: RunPlan, manifest: dict | None = None) -> tuple[torch.nn.Module, dict]:
    """The configured model (channels-last if asked) and its size: params, FLOPs per image. With the data set's
    manifest, a model that does not fit its images or classes is refused first (check_model_fits_data)."""
    model = models.create(cfg.model["name"], **{k: v for k, v in cfg.model.items() if k != "name"})
    image_size = (3, 32, 32)
    if manifest is not None:
        height, width, channels = manifest["image_shape"]
        image_size = (channels, height, width)
        check_model_fits_data(model, cfg.model["name"], image_size, len(manifest["classes"]))
    info = {"params": models.count_params(model), "flops_per_image": models.flops_per_image(model, image_size)}
    if plan.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, info


def check_model_fits_data(model: torch.nn.Module, name: str, image_size: tuple[int, int, int], classes: int) -> None:
    """One blank image (channels, height, width) through the model (eval mode, no gradient: nothing changes) before
    any work, so that model settings which do not fit the data (model.in_channels, model.num_classes) are one line,
    not a crash mid-run."""
    channels, height, width = image_size
    try:
        with models.evaluating(model):
            logits = model(torch.zeros(1, *image_size))
    except RuntimeError as e:
        reason = str(e).strip().splitlines()[0]
        raise ConfigError(
            f"model {name} cannot read the data's {channels}-channel {height}x{width} images ({reason}); "
            f"check its model.* settings"
        ) from None
    if tuple(logits.shape) != (1, classes):
        outputs = logits.shape[1] if logits.ndim == 2 else f"{tuple(logits.shape[1:])}-shaped"
        raise ConfigError(
            f"model {name} gives {outputs} outputs per image, but the data set has {classes} classes; "
            f"set --model.num_classes {classes}"
        )


def initialise_from_data(model: torch.nn.Module, train_loader) -> float:
    """A model's data-dependent initialisation (airbench's whitening), if it has one: seconds it took. It sees the
    same images on every rank, and runs before `prepare`, so all ranks start from the same weights."""
    if not hasattr(model, "data_init"):
        return 0.0
    t0 = time.perf_counter()
    images = train_loader.sample_images(min(DATA_INIT_IMAGES, train_loader.dataset_size))
    models.data_init(model.to(images.device), images)
    synchronize(images.device)
    return time.perf_counter() - t0


def find_resume_checkpoint(cfg: Config, run_dir: Path, say) -> Path | None:
    """The checkpoint `run.resume` names: auto/force take the newest intact one of the run (damaged ones are named
    and skipped, never deleted); a path must be an intact checkpoint."""
    resume = cfg.run.resume
    if resume == "no":
        return None
    if resume in ("auto", "force"):
        return checkpoint.find_resume(run_dir / "checkpoints", say)
    checkpoint.check_explicit(Path(resume))
    return Path(resume)


def used_groups(cfg: Config, model: torch.nn.Module) -> list:
    """The parameter groups that hold parameters, with their resolved settings (for the banner)."""
    assigned = assign_params(model, cfg.param_groups)
    settings = group_settings(cfg.train, cfg.param_groups, cfg.train.batch_size)
    return [s for s in settings if assigned[s.name]]


# --- the run's state between steps --------------------------------------------------------------------------------


@dataclass
class Run:
    """What the loop needs between steps; built once by `train()`."""

    cfg: Config
    plan: RunPlan
    accelerator: Accelerator
    run_dir: Path
    train_loader: object
    eval_loader: object
    engine: StepEngine
    eval_forward: object
    progress: checkpoint.Progress
    report: Reporter
    checkpoint_step: int | None = None  # the step of the newest checkpoint this run wrote or resumed from
    train_eval_loader: object | None = None  # the first train.eval_train_images training images, unaugmented
    gc_counts: GcCounts = field(default_factory=GcCounts)  # Python's collections inside the timed epochs

    @property
    def ckpt_root(self) -> Path:
        return self.run_dir / "checkpoints"


def build_run_loaders(cfg: Config, plan: RunPlan, data_dir: Path, rank: int = 0) -> tuple:
    """The (training, evaluation) loaders of `cfg` as `plan` decided them: mode, per-device batch, workers, device,
    this rank's shard."""
    d = cfg.data
    return build_loaders(
        data_dir, mode=plan.data_mode, batch_size=plan.batch_size_per_device, eval_batch_size=d.eval_batch_size,
        workers=plan.workers, device=plan.device, flip=d.flip, flip_mode=d.flip_mode, translate=d.translate,
        translate_fill=d.translate_fill, cutout=d.cutout, cutout_fill=d.cutout_fill, seed=cfg.run.seed,
        distributed=plan.world_size > 1, rank=rank, world_size=plan.world_size, channels_last=plan.channels_last,
    )  # fmt: skip


def build_run_optimizers(model: torch.nn.Module, cfg: Config, plan: RunPlan) -> list[torch.optim.Optimizer]:
    """One optimiser per optimiser type of the recipe's parameter groups, fused and compiled as `plan` says."""
    return build_optimizers(
        model, cfg.train, cfg.param_groups, cfg.train.batch_size, fused=plan.fused_optimizer, compiled=plan.compile
    )


def train(cfg: Config, argv: list[str]) -> dict:
    """One training run, start to finish; returns its summary (also written to summary.json)."""
    t_start = time.perf_counter()
    accelerator, notes = make_accelerator(cfg)
    plan = resolve(cfg, accelerator, notes)
    configure_backends(plan)
    if accelerator.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(accelerator.device)  # gpu_mem_gb is this run's peak, not a repeat's before
    set_seed(cfg.run.seed)
    run_dir, created = make_run_dir(cfg, accelerator)

    with removed_unless_written(created):
        data_dir, manifest = prepare_data(cfg.data, accelerator)
        d = cfg.data
        train_loader, eval_loader = build_run_loaders(cfg, plan, data_dir, rank=accelerator.process_index)
        steps_per_epoch = len(train_loader)

        model, model_info = build_model(cfg, plan, manifest)
        data_init_s = initialise_from_data(model, train_loader)
        t = cfg.train
        optimizers = build_run_optimizers(model, cfg, plan)
        schedulers = build_schedulers(optimizers, t, cfg.param_groups, steps_per_epoch)
        model, optimizers, schedulers = prepare_for_engine(accelerator, model, optimizers, schedulers)
        progress = checkpoint.Progress()
        accelerator.register_for_checkpointing(progress)

        say = console.say if accelerator.is_main_process else (lambda *_: None)
        resume_from = find_resume_checkpoint(cfg, run_dir, say)
        if resume_from is not None:
            # --resume DIR of another run cannot be forced; this run's own newest checkpoint is what force takes.
            own = resume_from.resolve().parent == (run_dir / "checkpoints").resolve()
            forced = checkpoint.check_compatible(
                resume_from, cfg.to_dict(), plan.world_size, force=cfg.run.resume == "force",
                explicit=cfg.run.resume not in ("auto", "force") and not own,
            )  # fmt: skip
            if forced:
                say(f"--resume force: the checkpoint's settings differ, this run's apply: {'; '.join(forced)}")
            checkpoint.load(accelerator, resume_from)
            # Schedules follow this run's config (they differ from the checkpoint's only under --resume force).
            raw_schedulers = [s.scheduler for s in schedulers]
            follow_config(raw_schedulers, optimizers, peak_lrs(optimizers, t, cfg.param_groups, t.batch_size))

        report = Reporter(
            run_dir, cfg, plan, main=accelerator.is_main_process,
            resume_step=progress.step if resume_from else None, wandb_id=progress.wandb_id,
        )  # fmt: skip
        progress.wandb_id = report.wandb_id
        inject_fault(accelerator.process_index, progress.step, at="wandb")
        for note in plan.notes:
            say(f"fasttrain: note: {note}")
        say(
            f"fasttrain {fasttrain.__version__} | torch {torch.__version__} | {plan.device_name} x{plan.world_size} "
            f"| {plan.mixed_precision} | data {plan.data_mode} ({manifest['splits']['train']['count']} train, "
            f"{manifest['splits']['test']['count']} test)"
        )
        say(
            f"model {cfg.model['name']}: {model_info['params'] / 1e6:.3f} M params, "
            f"{model_info['flops_per_image'] / 1e6:.1f} MFLOPs/image | batch {plan.batch_size_global} global = "
            f"{plan.batch_size_per_device} x {plan.world_size} | peak lr "
            + ", ".join(f"{g.name} {g.optimizer} {g.lr:.4g}" for g in used_groups(cfg, accelerator.unwrap_model(model)))
        )
        if resume_from is not None:
            say(f"resumed from {resume_from}: epoch {progress.epoch}, step {progress.step}")
        elif cfg.run.resume in ("auto", "force"):
            say(f"--resume {cfg.run.resume}: no checkpoint in {run_dir / 'checkpoints'}, starting from scratch")
        if accelerator.is_main_process:
            checkpoint.remove_partial(run_dir / "checkpoints")
        report.write_run_files(cfg, argv)

    # Evaluate with the plain module, not the DDP wrapper: evaluation must not take part in DDP's collectives.
    eval_module = accelerator.unwrap_model(model)
    train_forward, eval_forward = model, eval_module
    if plan.compile:
        # Under DDP Dynamo splits the graph at gradient buckets, so fullgraph must stay off. dynamic=False: the
        # train and eval forwards share Dynamo's cache, and a second batch size would otherwise turn their graphs
        # into dynamic-shape ones; every shape the run uses is compiled statically in the warm-up instead.
        train_forward = torch.compile(model, mode=plan.compile_mode, dynamic=False)
        eval_forward = torch.compile(eval_module, mode=plan.compile_mode, dynamic=False)
    engine = StepEngine(
        model, optimizers, schedulers, accelerator, forward=train_forward, label_smoothing=t.label_smoothing,
        loss_reduction=t.loss_reduction, grad_clip=t.grad_clip, nonfinite=t.nonfinite,
    )  # fmt: skip
    run = Run(cfg, plan, accelerator, run_dir, train_loader, eval_loader, engine, eval_forward, progress, report)
    if t.eval_train_images:
        run.train_eval_loader = build_train_eval_loader(
            train_loader, t.eval_train_images, batch_size=d.eval_batch_size, rank=accelerator.process_index,
            world_size=plan.world_size, channels_last=plan.channels_last,
        )  # fmt: skip
    run.checkpoint_step = progress.step if resume_from else None

    loader_warmup_s = train_loader.warm_up()
    graphs_before = compiled_graphs()
    compile_time_s = warm_up_compiled(run) if plan.compile else 0.0
    new_graphs = compiled_graphs() - graphs_before  # 0 from a repeat's second run on: its graphs are reused
    if plan.compile or loader_warmup_s >= 0.05:
        say(
            f"warm-up, not counted in train time: compile {compile_time_s:.1f} s ({new_graphs} new graphs), "
            f"loader {loader_warmup_s:.1f} s ({'ffcv JIT' if plan.data_mode == 'stream' else 'one batch'})"
        )

    with frozen_heap():  # what setup built is skipped by every collection until the summary
        try:
            exit_code = fit(run)
        except NonFiniteLoss as e:
            print(f"fasttrain train: error: {e}", file=sys.stderr, flush=True)
            exit_code = EXIT_NONFINITE
        summary = finish(run, exit_code, model_info)
    summary.update(
        compile_time_s=compile_time_s, compiled_graphs=new_graphs, loader_warmup_s=loader_warmup_s,
        data_init_s=data_init_s, gc_collections=run.gc_counts.collections,
        total_time_s=data_init_s + progress.train_time_s + summary["final_eval_s"],
        wall_time_s=time.perf_counter() - t_start,
    )  # fmt: skip
    if exit_code == 0:
        say(
            f"final: val_acc {summary['val_acc']:.4f}, TTA level {t.tta_level} {summary['tta_acc']:.4f}, "
            f"{summary['train_time_s']:.2f} s training, {summary['images_per_sec'] or 0:.0f} images/s"
        )
    write_outputs(run, summary, exit_code)
    say(f"outputs in {run_dir}: metrics.jsonl summary.json curves.png model.safetensors checkpoints/")
    # Every rank leaves together: a launcher stops the other processes as soon as one exits non-zero (exit 3, 143),
    # which would cut the main process's summary short. Safe: every way out of `fit` is agreed across ranks.
    accelerator.wait_for_everyone()
    return summary


def compiled_graphs() -> int:
    """Graphs torch.compile has made in this process so far (Dynamo's count)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def warm_up_compiled(run: Run) -> float:
    """Compile every graph the run will use (the train step, evaluation at its batch shapes with its TTA) on
    synthetic data, then put model, optimisers, schedules, scaler and RNG back: the run is untouched and its timing
    excludes compilation."""
    acc, engine = run.accelerator, run.engine
    t0 = time.perf_counter()
    saved = copy.deepcopy(
        [engine.model.state_dict(), [o.state_dict() for o in engine.optimizers],
         [s.state_dict() for s in engine.schedulers], acc.scaler.state_dict() if acc.scaler else None]
    )  # fmt: skip
    rng = torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    fmt = torch.channels_last if run.plan.channels_last else torch.contiguous_format

    def images(n: int) -> torch.Tensor:
        return torch.randn(n, 3, 32, 32, device=acc.device).contiguous(memory_format=fmt)

    n = run.plan.batch_size_per_device
    engine.model.train()
    for _ in range(3):
        engine.step(images(n), torch.randint(0, 10, (n,), device=acc.device))
    engine.take_window()
    engine.model.eval()
    shapes = {(run.eval_loader.batch_size, level) for level in (0, run.cfg.train.tta_level)}
    if run.train_eval_loader is not None:  # the training images' evaluation: its own batch size, no TTA
        shapes.add((run.train_eval_loader.batch_size, 0))
    with torch.no_grad(), acc.autocast():
        for batch_size, level in sorted(shapes):
            tta_logits(run.eval_forward, images(batch_size), level)
    synchronize(run.accelerator.device)
    model_state, optimizer_states, scheduler_states, scaler_state = saved
    engine.model.load_state_dict(model_state)
    for optimizer, state in zip(engine.optimizers, optimizer_states):
        optimizer.load_state_dict(state)
    for scheduler, state in zip(engine.schedulers, scheduler_states):
        scheduler.load_state_dict(state)
    if scaler_state is not None:
        acc.scaler.load_state_dict(scaler_state)
    torch.set_rng_state(rng[0])
    if rng[1] is not None:
        torch.cuda.set_rng_state_all(rng[1])
    return time.perf_counter() - t0


# --- the loop -----------------------------------------------------------------------------------------------------


def fit(run: Run) -> int:
    """Epochs until the last one, the target accuracy, or a stop signal. Returns the exit code."""
    t, p = run.cfg.train, run.progress
    with StopSignals() as signals:
        while p.epoch < t.epochs:
            with run.gc_counts:
                epoch = train_epoch(run, signals)
            if isinstance(epoch, int):
                return epoch  # interrupted
            ends = end_epoch(run, *epoch, stop_requested=signals.received is not None)
            if ends == "stop":
                return interrupted(run, signals)
            if ends == "target":
                run.report.say(f"target accuracy {t.target_acc} reached at {p.time_to_target_s:.2f} s of training")
                break
    # Decided from memory, the same on every rank (a look at the directory would race the main process's rename).
    if run.cfg.checkpoint.final and run.checkpoint_step != p.step:
        save_checkpoint(run)
    return EXIT_OK


def train_epoch(run: Run, signals: StopSignals) -> tuple[WindowStats, float, int] | int:
    """Train one epoch (or its remainder after a resume): (this rank's statistics, seconds, the first step of its
    last log window), or an exit code if a stop signal arrived. Between log steps nothing here waits for the
    device; at a log step the ranks agree on what they saw in one collective (`log_window`)."""
    cfg, p, acc, engine = run.cfg, run.progress, run.accelerator, run.engine
    t = cfg.train
    engine.model.train()
    run.train_loader.epoch = p.epoch
    windows: list[WindowStats] = []
    synchronize(run.accelerator.device)
    acc.wait_for_everyone()  # start every rank's clock together, so per-rank rates measure the same interval
    t_epoch = time.perf_counter()
    # iter() is timed: the resident loader augments the whole epoch there, and airbench counts that in its epochs.
    batches = iter(run.train_loader)
    t_epoch += replay_trained(batches, p.step_in_epoch)
    t_window = t_epoch
    window_first_step = p.step
    # The bar is for people at a terminal; logs (CI, SLURM) get the epoch table and metrics.jsonl instead.
    bar = tqdm(
        total=len(run.train_loader), initial=p.step_in_epoch, leave=False, desc=f"epoch {p.epoch + 1}/{t.epochs}",
        disable=not (acc.is_main_process and sys.stderr.isatty()), mininterval=1.0, dynamic_ncols=True,
    )  # fmt: skip
    for images, labels in batches:
        p.step_in_epoch += 1
        if inject_fault(acc.process_index, p.step + 1, at="batch"):  # the reliability tests' NaN on one rank
            images = torch.full_like(images, float("nan"))
        stepped = engine.step(images, labels)
        if stepped:
            p.step += 1
        else:
            note_skipped_step(run)
        inject_fault(acc.process_index, p.step)
        bar.update(1)
        stop_requested = signals.received is not None
        if stepped and p.step % t.log_every == 0:  # (a skipped step leaves p.step on the step already logged)
            windows.append(engine.take_window())
            now = time.perf_counter()
            stop = log_window(run, windows[-1], now - t_window, now - t_epoch, window_first_step, stop_requested)
            bar.set_postfix(loss=f"{windows[-1].loss:.3f}")
            t_window, window_first_step = now, p.step  # logging's own cost lands in the next window
        else:
            # One process checks its flag every step; several agree on it at log steps and the epoch's end only.
            stop = run.plan.world_size == 1 and stop_requested
        if stop and p.step_in_epoch < len(run.train_loader):  # at the last batch, the epoch's end stops instead
            bar.close()
            windows.append(engine.take_window())
            p.train_time_s += time.perf_counter() - t_epoch
            return interrupted(run, signals)
    bar.close()
    windows.append(engine.take_window())  # its non-finite steps are agreed on in end_epoch's collective
    return WindowStats.combine(windows), time.perf_counter() - t_epoch, window_first_step


def replay_trained(batches, count: int) -> float:
    """Resuming mid-epoch: take the `count` batches already trained (the order replays exactly). Returns the
    seconds it took, which are not training time."""
    t0 = time.perf_counter()
    for _ in range(count):
        next(batches)
    return time.perf_counter() - t0


def log_window(
    run: Run, stats: WindowStats, seconds: float, epoch_s: float, first_step: int, stop_requested: bool
) -> bool:
    """A log step's one collective: the ranks' summed rate, each rank's count of non-finite steps and whether any
    rank was asked to stop. A non-finite loss on any rank raises the same NonFiniteLoss on every rank; otherwise the
    step row is written. Returns whether the ranks stop (agreed)."""
    acc = run.accelerator
    own_ips = stats.images / seconds
    global_ips, stops, *nonfinite = sum_across_ranks(
        acc, [own_ips, float(stop_requested), *per_rank(acc, stats.nonfinite_steps)]
    )
    raise_if_nonfinite(nonfinite, first_step, run.progress.step, nonfinite_hint(run))
    run.report.row(step_row(run, stats, seconds, run.progress.train_time_s + epoch_s, own_ips, global_ips))
    return stops > 0


def note_skipped_step(run: Run) -> None:
    p, t = run.progress, run.cfg.train
    p.skipped_steps += 1
    run.report.say(f"\nstep {p.step + 1}: non-finite loss, step skipped ({p.skipped_steps}/{t.max_skips})")
    if p.skipped_steps > t.max_skips:
        raise NonFiniteLoss(
            f"more than train.max_skips={t.max_skips} steps had a non-finite loss; lower train.lr "
            f"(now {run.plan.lr_peak:.4g}) or use train.mixed_precision bf16/no"
        )


def nonfinite_hint(run: Run) -> str:
    return (
        f"Likely causes: a learning rate too high for this batch (peak lr {run.plan.lr_peak:.4g}; try --train.lr "
        f"lower), fp16 overflow (use --train.mixed_precision bf16), or bad input data. Training stopped; the last "
        f"good checkpoint in {run.ckpt_root} is kept (resume with --resume auto). --train.nonfinite skip skips "
        f"such steps instead."
    )


def step_row(run: Run, stats: WindowStats, seconds: float, time_s: float, own_ips: float, global_ips: float) -> dict:
    """`global_ips`: each rank's own rate, summed over ranks."""
    p = run.progress
    return {
        "kind": "step", "epoch": p.epoch + p.step_in_epoch / len(run.train_loader), "step": p.step,
        "time_s": time_s, "lr": run.engine.lr(), "train_loss": stats.loss,
        "train_loss_smoothed": stats.loss_smoothed, "train_acc": stats.acc, "val_acc": None,
        "images_per_sec": global_ips, "images_per_sec_per_device": global_ips / run.plan.world_size,
        "images_per_sec_main": own_ips, "step_time_ms": 1000 * seconds / max(stats.steps, 1),
    }  # fmt: skip


def end_epoch(
    run: Run, stats: WindowStats, seconds: float, last_window_first_step: int, stop_requested: bool
) -> str | None:
    """Count the epoch, evaluate if due, write its metrics row, checkpoint if due. Returns "target" when this epoch
    reached train.target_acc, "stop" when a rank was asked to stop and the run would otherwise go on (the caller
    then checkpoints; a run that ends here anyway just ends), else None. The epoch's last window (after its last
    log step) is checked for a non-finite loss, and any rank's stop signal is agreed on, in the epoch's one
    collective: with several processes the loop agrees on signals only here and at log steps, and an epoch may have
    fewer steps than train.log_every."""
    cfg, p, acc = run.cfg, run.progress, run.accelerator
    images, loss_sum, smoothed_sum, correct, stops, *nonfinite = sum_across_ranks(
        acc,
        [stats.images, stats.loss * stats.images, stats.loss_smoothed * stats.images, stats.acc * stats.images,
         float(stop_requested), *per_rank(acc, stats.nonfinite_steps)],
    )  # fmt: skip
    raise_if_nonfinite(nonfinite, last_window_first_step, p.step, nonfinite_hint(run))
    p.epoch += 1
    p.step_in_epoch = 0
    p.train_time_s += seconds
    target, val, train_eval, reached = cfg.train.target_acc, None, None, False
    if p.epoch % cfg.train.eval_every == 0 or p.epoch == cfg.train.epochs:
        val = validate(run, tta_level=0)
        if run.train_eval_loader is not None:
            train_eval = evaluate(run.eval_forward, run.train_eval_loader, acc)
        p.last_val = val
        if p.best_val_acc is None or val["acc"] > p.best_val_acc:
            p.best_val_acc = val["acc"]
        reached = target is not None and val["acc"] >= target
        if reached and p.time_to_target_s is None:
            p.time_to_target_s = p.train_time_s
    ips = images / seconds if seconds > 0 else 0.0

    def per_image(total: float) -> float:  # no images: resumed from a checkpoint at an epoch's last batch
        return total / images if images else float("nan")

    row = {
        "kind": "epoch", "epoch": p.epoch, "step": p.step, "time_s": p.train_time_s, "lr": run.engine.lr(),
        "train_loss": per_image(loss_sum), "train_loss_smoothed": per_image(smoothed_sum),
        "train_acc": per_image(correct),
        "val_loss": val["loss"] if val else None, "val_acc": val["acc"] if val else None,
        "val_count": val["count"] if val else None, "images_per_sec": ips,
        "images_per_sec_per_device": ips / run.plan.world_size, "step_time_ms": 1000 * seconds / max(stats.steps, 1),
    }  # fmt: skip
    if train_eval is not None:
        row["train_eval_loss"], row["train_eval_acc"] = train_eval["loss"], train_eval["acc"]
    if acc.device.type == "cuda":
        row["gpu_mem_gb"] = torch.cuda.max_memory_allocated(acc.device) / 2**30
    run.report.row(row)
    if reached:
        ends = "target"
    else:
        ends = "stop" if stops > 0 and p.epoch < cfg.train.epochs else None
    every = cfg.checkpoint.every
    if every and p.epoch % every == 0 and ends != "stop":  # a stop writes its own checkpoint
        save_checkpoint(run)
    return ends


def validate(run: Run, tta_level: int) -> dict:
    inject_fault(run.accelerator.process_index, run.progress.step, at="eval")
    sync_buffers(run.engine.model)  # every rank evaluates rank 0's BatchNorm statistics
    run.engine.model.eval()
    return evaluate(run.eval_forward, run.eval_loader, run.accelerator, tta_level=tta_level)


def save_checkpoint(run: Run) -> None:
    run.report.sync()  # rows up to this step are on disk before a checkpoint claims them
    path = checkpoint.save(run.accelerator, run.ckpt_root, run.progress, run.cfg.to_dict(), run.cfg.checkpoint.keep)
    run.checkpoint_step = run.progress.step
    if run.progress.step_in_epoch:
        run.report.say(f"checkpoint {path}")


def interrupted(run: Run, signals: StopSignals) -> int:
    p = run.progress
    signum = signals.received or signal.SIGTERM
    where = (
        f"epoch {p.epoch + 1}, step {p.step_in_epoch} of {len(run.train_loader)}"
        if p.step_in_epoch
        else f"the end of epoch {p.epoch}"
    )
    run.report.say(
        f"\n{signal.Signals(signum).name} received: writing a checkpoint at step {p.step} ({where}) and exiting. "
        f"Continue with --resume auto --run.dir {run.run_dir}"
    )
    save_checkpoint(run)
    return signal_exit_code(signum)


def save_final_model(run: Run) -> Path | None:
    """model.safetensors in the run directory: the final weights, loadable without fasttrain's checkpoint."""
    run.accelerator.wait_for_everyone()
    run.accelerator.save_model(run.engine.model, run.run_dir, safe_serialization=True)
    return run.run_dir / "model.safetensors"


def write_outputs(run: Run, summary: dict, exit_code: int) -> None:
    """model.safetensors (of a finished run), summary.json and curves.png; a failed write is named in one line."""
    try:
        model_file = save_final_model(run) if exit_code == 0 else None
        run.report.finish(summary, model_file, title=f"{run.cfg.model['name']} - {run.run_dir.name}")
    except Exception as e:
        if not is_write_failure(e):
            raise
        raise FasttrainError(
            f"could not write the run's outputs in {run.run_dir}: {write_failure_reason(e)}; free disk space or "
            f"choose another --run.dir, then run again (--resume auto continues from the newest checkpoint)"
        ) from None


def finish(run: Run, exit_code: int, model_info: dict) -> dict:
    """The final evaluation at the recipe's TTA level (timed: airbench counts it) and the run's summary."""
    cfg, p, plan = run.cfg, run.progress, run.plan
    last = p.last_val
    tta_acc, final_eval_s, agree = None, 0.0, None
    if exit_code == 0 and p.step > 0:
        synchronize(run.accelerator.device)
        t0 = time.perf_counter()
        with run.gc_counts:
            tta_acc = validate(run, tta_level=cfg.train.tta_level)["acc"]
        final_eval_s = time.perf_counter() - t0
        agree = parameters_agree(run.accelerator, run.engine.model)
    status = {0: "finished", EXIT_NONFINITE: "nonfinite_loss"}.get(exit_code, "interrupted")
    return {
        "status": status, "exit_code": exit_code,
        "val_acc": last["acc"] if last else None, "val_loss": last["loss"] if last else None,
        "tta_acc": tta_acc, "tta_level": cfg.train.tta_level, "best_val_acc": p.best_val_acc,
        "train_time_s": p.train_time_s, "final_eval_s": final_eval_s, "time_to_target_s": p.time_to_target_s,
        "target_acc": cfg.train.target_acc, "epochs": p.epoch, "steps": p.step, "skipped_steps": p.skipped_steps,
        "parameters_agree_across_ranks": agree,
        "images_per_sec": (p.step * plan.batch_size_global / p.train_time_s) if p.train_time_s else None,
        "model": cfg.model["name"], **model_info, **plan.as_dict(), "seed": cfg.run.seed,
        "fasttrain_version": fasttrain.__version__, "torch_version": torch.__version__, "run_dir": str(run.run_dir),
    }  # fmt: skip


# --- repeats and the entry point ----------------------------------------------------------------------------------


def train_repeats(cfg: Config, argv: list[str]) -> dict:
    """`run.repeats` runs with seeds seed, seed+1, ... in one process (compiled code is reused from the second run
    on), each a normal run directory `<run.dir>/repeat-<i>` and a W&B run of one group; repeats.json holds the mean
    and standard deviation of accuracy and time, as airbench reports them. With several processes every rank runs
    every repeat; the process group lives until all are done (`end_process_group`)."""
    import statistics

    accelerator, _ = make_accelerator(cfg)  # each run makes its own; this one names the directory and who writes
    root = Path(cfg.run.dir) if cfg.run.dir else timestamped_run_dir(cfg.run.name)
    root = Path(from_main(accelerator, str(root)))  # the main process's clock names it for every rank
    group = cfg.wandb.group or root.name
    summaries = []
    for i in range(cfg.run.repeats):
        one = copy.deepcopy(cfg)
        one.run = replace(cfg.run, dir=str(root / f"repeat-{i}"), seed=cfg.run.seed + i, repeats=1)
        one.wandb = replace(cfg.wandb, group=group)
        summaries.append(train(one, argv))
        if summaries[-1]["exit_code"] != 0:
            break

    def spread(key: str) -> dict:
        values = [s[key] for s in summaries if s.get(key) is not None]
        if not values:
            return {"mean": None, "std": None, "median": None, "values": []}
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return {"mean": statistics.fmean(values), "std": std, "median": statistics.median(values), "values": values}

    result = {
        "runs": len(summaries), "seeds": [s["seed"] for s in summaries], "tta_level": cfg.train.tta_level,
        "tta_acc": spread("tta_acc"), "val_acc": spread("val_acc"), "total_time_s": spread("total_time_s"),
        "train_time_s": spread("train_time_s"), "compile_time_s": spread("compile_time_s"),
        "gc_collections": [s["gc_collections"] for s in summaries],
        "compiled_graphs": [s["compiled_graphs"] for s in summaries],
        "exit_code": max(s["exit_code"] for s in summaries),
    }  # fmt: skip
    if accelerator.is_main_process:
        write_json(root / "repeats.json", result)
        acc, secs = result["tta_acc"], result["total_time_s"]
        if acc["mean"] is not None:
            print(
                f"repeats: {len(summaries)} runs, TTA accuracy {acc['mean']:.4f} +- {acc['std']:.4f}, time "
                f"median {secs['median']:.2f} s (mean {secs['mean']:.2f} +- {secs['std']:.2f}); {root}/repeats.json"
            )
    return result


def command(argv: list[str]) -> int:
    if "-h" in argv or "--help" in argv:
        print(__doc__.strip() + "\n\n" + help_text())
        return EXIT_OK
    cfg = load_config(argv, default_recipe=None if "--config" in " ".join(argv) else default_recipe())
    try:
        result = train_repeats(cfg, argv) if cfg.run.repeats > 1 else train(cfg, argv)
    finally:
        end_process_group()
    return result["exit_code"]


def end_process_group() -> None:
    """Once, after the process's last run: repeated runs share the process group Accelerate started with the first
    (Accelerator.end_training would destroy it, and the next run's collectives would fail)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    python_interrupts_again()  # after a script's imports: Ctrl-C is KeyboardInterrupt, for run_command, again
    return run_command("fasttrain train", command, argv)


if __name__ == "__main__":
    exit_process(main())
