"""Train a CIFAR-10 classifier: `accelerate launch fasttrain/train.py [--config RECIPE] [--section.key value ...]`.

Also `python fasttrain/train.py ...` (one process) or the `fasttrain-train` console script. Read top to bottom:
configuration -> Accelerator -> data -> model and optimiser -> resume -> compile warm-up -> epochs -> summary.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script: put the repository root, not fasttrain/, first on the path, so `fasttrain.*` imports work
    # from a checkout and nothing inside the package can shadow a top-level module.
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs
from tqdm import tqdm

import fasttrain
from fasttrain import models
from fasttrain.config import Config, help_text, load_config
from fasttrain.data import prepare as data_prepare
from fasttrain.data.loaders import build_loaders
from fasttrain.errors import ConfigError, FasttrainError
from fasttrain.files import replacing
from fasttrain.loop import checkpoint
from fasttrain.loop.distributed import StopSignals, any_rank, from_main, inject_fault, sum_across_ranks, sync_buffers
from fasttrain.loop.evaluate import evaluate
from fasttrain.loop.optim import build_optimizer, build_scheduler, scaled_lr
from fasttrain.tracking import EpochTable, MetricsFile, plot_curves, read_metrics, start_wandb
from fasttrain.tracking.metrics import to_json_safe

EXIT_BAD_INPUT = 2
EXIT_NONFINITE = 3


class NonFiniteLoss(FasttrainError):
    pass


# --- setup ---------------------------------------------------------------------------------------------------


def default_recipe() -> str:
    if torch.cuda.is_available():
        return "resnet9"
    print(
        "fasttrain: no CUDA device found, so no --config means the CPU recipe cpu_quick "
        "(a small net, a few minutes). Pass --config resnet9 for the full GPU recipe (hours on a CPU)."
    )
    return "cpu_quick"


def make_accelerator(cfg: Config) -> Accelerator:
    on_cuda = torch.cuda.is_available()
    precision = cfg.train.mixed_precision
    if precision == "auto":
        precision = "bf16" if on_cuda and torch.cuda.is_bf16_supported() else "no"
    if precision == "fp16" and not on_cuda:
        raise ConfigError(
            "train.mixed_precision: fp16 needs a CUDA device (on CPU it would silently run fp32); use bf16 or no"
        )
    return Accelerator(
        mixed_precision=precision,
        cpu=not on_cuda,
        # Our schedule counts optimizer steps of the global batch: step it exactly once per step.
        step_scheduler_with_optimizer=False,
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(minutes=10))],
    )


def check_world(cfg: Config, world: int) -> int:
    if cfg.train.batch_size % world:
        raise ConfigError(
            f"train.batch_size: the global batch {cfg.train.batch_size} does not divide across "
            f"{world} processes; use a multiple of {world}"
        )
    return cfg.train.batch_size // world


def data_dir_for(cfg: Config) -> Path:
    return data_prepare.data_dir_for(cfg.data)


def prepare_data(cfg: Config, accelerator: Accelerator) -> dict:
    """Convert the source on each node (fasttrain.data.prepare), verify it; returns the manifest."""
    return data_prepare.prepare_data(cfg.data, accelerator)[1]


def make_run_dir(cfg: Config, accelerator: Accelerator) -> Path:
    """`run.dir`, or runs/<name>-<time>; with --resume auto and no run.dir, the newest run of that name."""
    if cfg.run.dir:
        run_dir = Path(cfg.run.dir)
    elif cfg.run.resume in ("auto", "force") and (earlier := sorted(Path("runs").glob(f"{cfg.run.name}-*"))):
        run_dir = earlier[-1]
    else:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        run_dir = Path("runs") / f"{cfg.run.name}-{stamp}"
    run_dir = Path(from_main(accelerator, str(run_dir)))
    if accelerator.is_main_process:
        try:
            (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
            probe = run_dir / ".write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            raise ConfigError(
                f"run.dir: cannot write to {run_dir} ({e.strerror}); choose a writable --run.dir"
            ) from None
    accelerator.wait_for_everyone()
    return run_dir


def find_resume_checkpoint(cfg: Config, run_dir: Path) -> Path | None:
    resume = cfg.run.resume
    if resume == "no":
        return None
    if resume in ("auto", "force"):
        found = checkpoint.list_checkpoints(run_dir / "checkpoints")
        return found[-1] if found else None
    path = Path(resume)
    if checkpoint.read_meta(path) is None:
        raise ConfigError(f"run.resume: {path} is not a complete fasttrain checkpoint (no valid meta.json)")
    return path


# --- the loop ---------------------------------------------------------------------------------------------------


class Trainer:
    """Holds what one training run needs between steps; `fit()` runs the epochs."""

    def __init__(self, cfg: Config, accelerator: Accelerator, run_dir: Path, argv: list[str]):
        self.cfg, self.acc, self.run_dir = cfg, accelerator, run_dir
        self.t_start = time.perf_counter()
        t, acc = cfg.train, accelerator
        self.world = acc.num_processes
        self.per_device_batch = check_world(cfg, self.world)
        self.main = acc.is_main_process
        self.log = print if self.main else (lambda *a, **k: None)

        torch.manual_seed(cfg.run.seed)
        manifest = prepare_data(cfg, acc)
        mode = cfg.data.mode if cfg.data.mode != "auto" else ("gpu" if acc.device.type == "cuda" else "ffcv")
        self.data_mode = mode
        self.train_loader, self.eval_loader = build_loaders(
            data_dir_for(cfg),
            mode=mode,
            batch_size=self.per_device_batch,
            eval_batch_size=cfg.data.eval_batch_size,
            workers=cfg.data.workers,
            device=acc.device,
            flip=cfg.data.flip,
            translate=cfg.data.translate,
            cutout=cfg.data.cutout,
            seed=cfg.run.seed,
            distributed=self.world > 1,
            rank=acc.process_index,
            world_size=self.world,
            channels_last=t.channels_last,
        )
        self.steps_per_epoch = len(self.train_loader)
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"train.batch_size: {self.per_device_batch} per process is larger than this rank's "
                f"{self.train_loader.num_samples} training images; lower it or use more data"
            )

        model_kwargs = {k: v for k, v in cfg.model.items() if k != "name"}
        model = models.create(cfg.model["name"], **model_kwargs)
        self.params = models.count_params(model)
        self.flops = models.flops_per_image(model)
        if t.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.lr_peak = scaled_lr(t, cfg.train.batch_size)
        optimizer = build_optimizer(model, t, self.lr_peak)
        scheduler = build_scheduler(optimizer, t, self.steps_per_epoch)
        self.model, self.optimizer, self.scheduler = acc.prepare(model, optimizer, scheduler)
        self.progress = checkpoint.Progress()
        acc.register_for_checkpointing(self.progress)

        self.log(
            f"fasttrain {fasttrain.__version__} | torch {torch.__version__} | device {acc.device} x{self.world} "
            f"| {acc.mixed_precision} | data {mode} ({manifest['splits']['train']['count']} train, "
            f"{manifest['splits']['test']['count']} test)"
        )
        self.log(
            f"model {cfg.model['name']}: {self.params / 1e6:.3f} M params, {self.flops / 1e6:.1f} MFLOPs/image "
            f"| batch {cfg.train.batch_size} global = {self.per_device_batch} x {self.world} | peak lr "
            f"{self.lr_peak:.4g} ({t.lr_scaling} scaling from {t.lr} at {t.lr_ref_batch})"
        )

        self.ckpt_root = run_dir / "checkpoints"
        resume_from = find_resume_checkpoint(cfg, run_dir)
        if resume_from is not None:
            checkpoint.check_compatible(resume_from, cfg.to_dict(), self.world, force=cfg.run.resume == "force")
            acc.load_state(str(resume_from))
            # The schedule's shape comes from this run's config; so must its peak (differs only under --resume force).
            self.scheduler.scheduler.base_lrs = [self.lr_peak for _ in self.optimizer.param_groups]
            self.log(f"resumed from {resume_from}: epoch {self.progress.epoch}, step {self.progress.step}")
        elif cfg.run.resume in ("auto", "force"):
            self.log(f"--resume {cfg.run.resume}: no checkpoint in {self.ckpt_root}, starting from scratch")
        if self.main:
            checkpoint.remove_partial(self.ckpt_root)
            (run_dir / "config.yaml").write_text(_yaml(cfg.to_dict()))
            (run_dir / "command.txt").write_text(" ".join([sys.argv[0], *argv]) + "\n")
        self.metrics = (
            MetricsFile(run_dir / "metrics.jsonl", resume_step=self.progress.step if resume_from else None)
            if self.main
            else None
        )
        self.wandb = None
        if self.main:
            self.wandb = start_wandb(
                cfg.wandb.mode,
                project=cfg.wandb.project,
                entity=cfg.wandb.entity,
                name=cfg.wandb.name or run_dir.name,
                tags=cfg.wandb.tags,
                config=self._wandb_config(),
                run_dir=run_dir,
                resume_id=self.progress.wandb_id,
            )
            self.progress.wandb_id = self.wandb.id

        compile_on = t.compile == "on" or (t.compile == "auto" and acc.device.type == "cuda")
        self.compiled = compile_on
        # Evaluate with the plain module, not the DDP wrapper: evaluation must not take part in DDP's collectives.
        eval_module = acc.unwrap_model(self.model)
        if compile_on:
            # Under DDP Dynamo splits the graph at gradient buckets, so fullgraph must stay off.
            self.train_forward = torch.compile(self.model, mode=t.compile_mode)
            self.eval_forward = torch.compile(eval_module, mode=t.compile_mode)
        else:
            self.train_forward, self.eval_forward = self.model, eval_module
        self.last_eval: dict | None = None
        self.pending_loss: tuple[torch.Tensor, int] | None = None  # the last step's loss, checked one step later

    def _wandb_config(self) -> dict:
        return {
            **self.cfg.to_dict(),
            "world_size": self.world,
            "batch_size_per_device": self.per_device_batch,
            "batch_size_global": self.cfg.train.batch_size,
            "lr_peak": self.lr_peak,
            "params": self.params,
            "flops_per_image": self.flops,
            "data_mode": self.data_mode,
        }

    # One optimizer step. Returns the loss and the number of correct predictions as device tensors (no sync).
    def train_step(self, images, labels):
        t = self.cfg.train
        with self.acc.autocast():
            logits = self.train_forward(images)
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=t.label_smoothing)
        self.acc.backward(loss)
        if t.grad_clip is not None:
            self.acc.clip_grad_norm_(self.model.parameters(), t.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach(), (logits.detach().argmax(dim=1) == labels).sum()

    def synchronize(self) -> None:
        if self.acc.device.type == "cuda":
            torch.cuda.synchronize(self.acc.device)

    def warm_up_loader(self) -> float:
        """ffcv compiles its pipeline with numba on the first batch: do that now, outside the timed epochs."""
        if self.data_mode != "ffcv":
            return 0.0
        t0 = time.perf_counter()
        epoch = self.train_loader.epoch
        batches = iter(self.train_loader)
        next(batches)
        batches.close()
        self.train_loader.epoch = epoch
        return time.perf_counter() - t0

    def warm_up(self) -> float:
        """Compile every graph the run will use (train step, eval on both batch sizes) on synthetic data, then put
        model, optimiser, scaler and RNG back as they were: the run itself is untouched and its timing excludes
        compilation."""
        if not self.compiled:
            return 0.0
        t0 = time.perf_counter()
        saved = (
            copy.deepcopy(self.model.state_dict()),
            copy.deepcopy(self.optimizer.state_dict()),
            torch.get_rng_state(),
            torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            copy.deepcopy(self.acc.scaler.state_dict()) if self.acc.scaler is not None else None,
        )
        fmt = torch.channels_last if self.cfg.train.channels_last else torch.contiguous_format
        dev = self.acc.device

        def images(n):
            return torch.randn(n, 3, 32, 32, device=dev).contiguous(memory_format=fmt)

        self.model.train()
        for _ in range(3):
            self.train_step(images(self.per_device_batch), torch.randint(0, 10, (self.per_device_batch,), device=dev))
        self.model.eval()
        yielded = self.eval_loader.num_yielded  # ffcv pads a rank's shard: its batches have the padded sizes
        eval_sizes = {min(self.cfg.data.eval_batch_size, yielded), yielded % self.cfg.data.eval_batch_size}
        with torch.no_grad(), self.acc.autocast():
            for n in sorted(s for s in eval_sizes if s > 0):
                self.eval_forward(images(n))
                self.eval_forward(torch.flip(images(n), dims=[3]))
        self.synchronize()
        model_state, opt_state, rng, cuda_rng, scaler_state = saved
        self.model.load_state_dict(model_state)
        self.optimizer.load_state_dict(opt_state)
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        if scaler_state is not None:
            self.acc.scaler.load_state_dict(scaler_state)
        return time.perf_counter() - t0

    def fit(self) -> int:
        t, p = self.cfg.train, self.progress
        self.loader_warmup_s = self.warm_up_loader()
        self.compile_time_s = self.warm_up()
        if self.compiled or self.loader_warmup_s:
            self.log(
                f"warm-up, not counted in train time: compile {self.compile_time_s:.1f} s, "
                f"ffcv pipeline JIT {self.loader_warmup_s:.1f} s"
            )
        table = EpochTable(
            [
                ("epoch", "d"),
                ("train_loss", ".4f"),
                ("train_acc", ".4f"),
                ("val_loss", ".4f"),
                ("val_acc", ".4f"),
                ("lr", ".4f"),
                ("time_s", ".1f"),
                ("img/s", ".0f"),
            ]
        )
        self.log(table.header())
        exit_code = 0
        with StopSignals() as signals:
            while p.epoch < t.epochs:
                status = self.run_epoch(signals)
                if status is not None:
                    exit_code = status
                    break
                row = self.end_epoch()
                self.log(table.row({**row, "img/s": row["images_per_sec"]}))
                if t.target_acc is not None and row["val_acc"] is not None and row["val_acc"] >= t.target_acc:
                    self.log(
                        f"target accuracy {t.target_acc} reached at {p.time_to_target_s:.2f} s of training; "
                        "stopping early"
                    )
                    break
        return exit_code

    def run_epoch(self, signals: StopSignals) -> int | None:
        """Train one epoch (or its remainder after a resume). Returns an exit code if the run must stop."""
        t, p, acc = self.cfg.train, self.progress, self.acc
        self.model.train()
        self.train_loader.epoch = p.epoch
        batches = iter(self.train_loader)
        for _ in range(p.step_in_epoch):  # resuming mid-epoch: replay the order, skip what was trained
            next(batches)
        sums = torch.zeros(3, dtype=torch.float64, device=acc.device)  # loss, correct, images (this epoch)
        window = torch.zeros(3, dtype=torch.float64, device=acc.device)  # the same since the last log line
        self.synchronize()
        acc.wait_for_everyone()  # start every rank's clock together, so per-rank rates measure the same interval
        t_epoch = t_window = time.perf_counter()
        # The bar is for people at a terminal; logs (CI, SLURM) get the epoch table and metrics.jsonl instead.
        bar = tqdm(
            total=self.steps_per_epoch,
            initial=p.step_in_epoch,
            leave=False,
            disable=not (self.main and sys.stderr.isatty()),
            desc=f"epoch {p.epoch + 1}/{t.epochs}",
            mininterval=1.0,
            dynamic_ncols=True,
        )
        for images, labels in batches:
            stats = self.optimizer_step(images, labels)
            if stats is None:
                continue  # a skipped non-finite step
            sums += stats
            window += stats
            inject_fault(acc.process_index, p.step)
            p.step += 1
            p.step_in_epoch += 1
            bar.update(1)
            if p.step % t.log_every == 0:
                self.synchronize()
                now = time.perf_counter()
                self.log_step(window, now - t_window, p.train_time_s + (now - t_epoch))
                bar.set_postfix(loss=f"{window[0].item() / max(window[2].item(), 1):.3f}")
                window.zero_()
                t_window = now  # logging's own cost lands in the next window, on every rank alike
            # One process checks its flag every step; several agree on it (a collective) only at log steps.
            if (self.world == 1 or p.step % t.log_every == 0) and any_rank(acc, signals.received is not None):
                bar.close()
                return self.interrupted(signals, time.perf_counter() - t_epoch)
        bar.close()
        self.check_last_loss()
        self.synchronize()
        epoch_train_s = time.perf_counter() - t_epoch
        p.train_time_s += epoch_train_s
        self.epoch_sums = sums
        self.epoch_train_s = epoch_train_s
        return None

    def optimizer_step(self, images, labels) -> torch.Tensor | None:
        """One step of the loop: train, check the previous step's loss, advance the schedule. Returns this step's
        [loss x images, correct, images] as a device tensor (no sync), or None for a skipped non-finite step."""
        loss, correct = self.train_step_checked(images, labels)
        if loss is None:
            return None
        # Check the previous step's loss now: reading it forces no stall, as that step has finished.
        self.check_last_loss()
        self.pending_loss = (loss, self.progress.step)
        self.scheduler.step()
        n = torch.tensor(labels.shape[0], dtype=torch.float64, device=labels.device)
        return torch.stack([loss.double() * n, correct.double(), n])

    def check_last_loss(self) -> None:
        if self.pending_loss is not None:
            self.raise_if_nonfinite(*self.pending_loss)
            self.pending_loss = None

    def train_step_checked(self, images, labels):
        """A train step; with train.nonfinite=skip, a step whose loss is NaN/Inf on any rank is dropped."""
        t, p = self.cfg.train, self.progress
        if t.nonfinite != "skip":
            return self.train_step(images, labels)
        with torch.no_grad(), self.acc.autocast():
            probe = F.cross_entropy(self.train_forward(images).float(), labels)
        if any_rank(self.acc, not bool(torch.isfinite(probe))):
            p.skipped_steps += 1
            self.log(f"\nstep {p.step}: non-finite loss, step skipped ({p.skipped_steps}/{t.max_skips})")
            if p.skipped_steps > t.max_skips:
                raise NonFiniteLoss(
                    f"more than train.max_skips={t.max_skips} steps had a non-finite loss; "
                    f"lower train.lr (now {self.lr_peak:.4g}) or use train.mixed_precision bf16/no"
                )
            return None, None
        return self.train_step(images, labels)

    def raise_if_nonfinite(self, loss: torch.Tensor, step: int) -> None:
        if not bool(torch.isfinite(loss)):
            raise NonFiniteLoss(
                f"loss became {loss.item()} at optimizer step {step + 1} (epoch {self.progress.epoch + 1}). Likely "
                f"causes: a learning rate too high for this batch (peak lr {self.lr_peak:.4g}; try --train.lr lower), "
                f"fp16 overflow (use --train.mixed_precision bf16), or bad input data. Training stopped; the last "
                f"good checkpoint in {self.ckpt_root} is kept (resume with --resume auto). "
                f"--train.nonfinite skip skips such steps instead."
            )

    def log_step(self, window: torch.Tensor, seconds: float, time_s: float) -> None:
        loss_sum, correct, n = window.tolist()
        steps = n / self.per_device_batch
        own_ips = n / seconds
        global_ips = sum_across_ranks(self.acc, [own_ips])[0]  # each rank's own rate, summed
        row = {
            "kind": "step",
            "epoch": self.progress.epoch + self.progress.step_in_epoch / self.steps_per_epoch,
            "step": self.progress.step,
            "time_s": time_s,
            "wall_s": time.perf_counter() - self.t_start,
            "lr": self.scheduler.get_last_lr()[0],
            "train_loss": loss_sum / n,
            "train_acc": correct / n,
            "val_acc": None,
            "images_per_sec": global_ips,
            "images_per_sec_per_device": global_ips / self.world,
            "images_per_sec_main": own_ips,
            "step_time_ms": 1000 * seconds / steps,
        }
        self.record(row)

    def end_epoch(self) -> dict:
        cfg, p, acc = self.cfg, self.progress, self.acc
        loss_sum, correct, n = sum_across_ranks(acc, self.epoch_sums)
        p.epoch += 1
        p.step_in_epoch = 0
        val = None
        if p.epoch % cfg.train.eval_every == 0 or p.epoch == cfg.train.epochs:
            sync_buffers(self.model)
            self.model.eval()
            val = evaluate(self.eval_forward, self.eval_loader, acc)
            self.last_eval = val
            if p.best_val_acc is None or val["acc"] > p.best_val_acc:
                p.best_val_acc = val["acc"]
            target = cfg.train.target_acc
            if target is not None and p.time_to_target_s is None and val["acc"] >= target:
                p.time_to_target_s = p.train_time_s
        ips = n / self.epoch_train_s if self.epoch_train_s > 0 else 0.0
        row = {
            "kind": "epoch",
            "epoch": p.epoch,
            "step": p.step,
            "time_s": p.train_time_s,
            "wall_s": time.perf_counter() - self.t_start,
            "lr": self.scheduler.get_last_lr()[0],
            "train_loss": loss_sum / n,
            "train_acc": correct / n,
            "val_loss": val["loss"] if val else None,
            "val_acc": val["acc"] if val else None,
            "val_count": val["count"] if val else None,
            "images_per_sec": ips,
            "images_per_sec_per_device": ips / self.world,
            "step_time_ms": 1000 * self.epoch_train_s * self.world * self.per_device_batch / n,
        }
        if acc.device.type == "cuda":
            row["gpu_mem_gb"] = torch.cuda.max_memory_allocated(acc.device) / 2**30
        self.record(row)
        if cfg.checkpoint.every and (p.epoch % cfg.checkpoint.every == 0 or p.epoch == cfg.train.epochs):
            self.save_checkpoint()
        return row

    def record(self, row: dict) -> None:
        if self.main:
            self.metrics.write(row)
            self.wandb.log({k: v for k, v in row.items() if v is not None and k != "kind"}, step=row["step"])

    def save_checkpoint(self) -> None:
        path = checkpoint.save(self.acc, self.ckpt_root, self.progress, self.cfg.to_dict(), self.cfg.checkpoint.keep)
        if self.main:
            self.metrics.sync()
            self.log(f"checkpoint {path}") if self.progress.step_in_epoch else None

    def interrupted(self, signals: StopSignals, epoch_train_s: float) -> int:
        import signal as signal_module

        p = self.progress
        p.train_time_s += epoch_train_s
        signum = signals.received or signal_module.SIGTERM
        self.log(
            f"\n{signal_module.Signals(signum).name} received: writing a checkpoint at step {p.step} "
            f"(epoch {p.epoch + 1}, step {p.step_in_epoch} of {self.steps_per_epoch}) and exiting. "
            f"Continue with --resume auto --run.dir {self.run_dir}"
        )
        self.save_checkpoint()
        return 128 + signum

    def finish(self, exit_code: int) -> dict:
        """Final evaluation with flip TTA, summary.json, curves.png, W&B summary."""
        cfg, p, acc = self.cfg, self.progress, self.acc
        summary = {
            "status": {0: "finished", EXIT_NONFINITE: "nonfinite_loss"}.get(exit_code, "interrupted"),
            "exit_code": exit_code,
            "val_acc": self.last_eval["acc"] if self.last_eval else None,
            "val_loss": self.last_eval["loss"] if self.last_eval else None,
            "tta_acc": None,
            "best_val_acc": p.best_val_acc,
            "train_time_s": p.train_time_s,
            "compile_time_s": getattr(self, "compile_time_s", 0.0),
            "loader_warmup_s": getattr(self, "loader_warmup_s", 0.0),
            "wall_time_s": time.perf_counter() - self.t_start,
            "time_to_target_s": p.time_to_target_s,
            "target_acc": cfg.train.target_acc,
            "epochs": p.epoch,
            "steps": p.step,
            "skipped_steps": p.skipped_steps,
            "images_per_sec": (p.step * cfg.train.batch_size / p.train_time_s) if p.train_time_s else None,
            "world_size": self.world,
            "batch_size_global": cfg.train.batch_size,
            "batch_size_per_device": self.per_device_batch,
            "lr_peak": self.lr_peak,
            "mixed_precision": acc.mixed_precision,
            "compiled": self.compiled,
            "data_mode": self.data_mode,
            "device": torch.cuda.get_device_name(acc.device) if acc.device.type == "cuda" else "cpu",
            "model": cfg.model["name"],
            "params": self.params,
            "flops_per_image": self.flops,
            "fasttrain_version": fasttrain.__version__,
            "torch_version": torch.__version__,
            "run_dir": str(self.run_dir),
        }
        if exit_code == 0 and cfg.train.tta and p.step > 0:
            sync_buffers(self.model)
            self.model.eval()
            summary["tta_acc"] = evaluate(self.eval_forward, self.eval_loader, acc, tta=True)["acc"]
            self.log(
                f"final: val_acc {summary['val_acc']:.4f}, with flip TTA {summary['tta_acc']:.4f}, "
                f"{summary['train_time_s']:.1f} s training, {summary['images_per_sec'] or 0:.0f} images/s"
            )
        if self.main:
            _write_json_atomic(self.run_dir / "summary.json", summary)
            rows = [r for r in read_metrics(self.run_dir / "metrics.jsonl") if r.get("kind") == "epoch"]
            if rows:
                plot_curves(rows, self.run_dir / "curves.png", title=f"{cfg.model['name']} - {self.run_dir.name}")
            self.metrics.close()
            self.wandb.summary({k: v for k, v in summary.items() if v is not None})
            self.wandb.finish(exit_code=exit_code)
            self.log(f"outputs in {self.run_dir}: metrics.jsonl summary.json curves.png checkpoints/")
        return summary


def _yaml(data: dict) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)


def _write_json_atomic(path: Path, data: dict) -> None:
    with replacing(path) as tmp:
        tmp.write_text(json.dumps(to_json_safe(data), indent=1, allow_nan=False) + "\n")


def run(argv: list[str]) -> int:
    cfg = load_config(argv, default_recipe=None if "--config" in " ".join(argv) else default_recipe())
    accelerator = make_accelerator(cfg)
    run_dir = make_run_dir(cfg, accelerator)
    trainer = Trainer(cfg, accelerator, run_dir, argv)
    try:
        exit_code = trainer.fit()
    except NonFiniteLoss as e:
        print(f"fasttrain: error: {e}", file=sys.stderr, flush=True)
        exit_code = EXIT_NONFINITE
    trainer.finish(exit_code)
    accelerator.end_training()
    return exit_code


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(__doc__.strip() + "\n\n" + help_text())
        return 0
    try:
        return run(argv)
    except FasttrainError as e:
        print(f"fasttrain: error: {e}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
