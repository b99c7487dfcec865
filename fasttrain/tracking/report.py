"""Reporting, apart from the loop: the console (banner, epoch table), metrics.jsonl, W&B, summary.json and
curves.png. Only the main process writes; on other ranks every method is a no-op."""

from __future__ import annotations

import functools
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from fasttrain.errors import FasttrainError
from fasttrain.files import os_error_text, read_json, write_json, write_text
from fasttrain.tracking.console import EpochTable, say
from fasttrain.tracking.metrics import MetricsFile, read_metrics
from fasttrain.tracking.plots import epoch_rows, plot_curves
from fasttrain.tracking.wandb_history import holds, recorded_keys
from fasttrain.tracking.wandb_run import local_run_dirs, start_wandb

TABLE = [("epoch", "d"), ("train_loss", ".4f"), ("train_acc", ".4f"), ("val_loss", ".4f"), ("val_acc", ".4f"),
         ("lr", ".4f"), ("time_s", ".1f"), ("img/s", ".0f")]  # fmt: skip


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    """A run's summary.json; None when there is none or it is damaged (not a JSON object)."""
    try:
        summary = read_json(Path(run_dir) / "summary.json")
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None


def run_finished(run_dir: Path) -> bool:
    """Whether the run in `run_dir` ended as finished, by its summary.json."""
    summary = read_summary(run_dir)
    return summary is not None and summary.get("status") == "finished"


class Reporter:
    """Everything a run tells the outside world. `wandb_id` continues the W&B run of a resumed run."""

    def __init__(self, run_dir: Path, cfg, plan, main: bool, resume_step: int | None, wandb_id: str | None):
        self.run_dir, self.main = run_dir, main
        self.table = EpochTable(TABLE)
        self.header_shown = False
        self.metrics = MetricsFile(run_dir / "metrics.jsonl", resume_step=resume_step) if main else None
        self.wandb = None
        if main:
            w = cfg.wandb
            self.wandb = start_wandb(
                w.mode, project=w.project, entity=w.entity, name=w.name, default_name=run_dir.name,
                tags=w.tags or None, group=w.group, job_type=w.job_type,
                config={**cfg.to_dict(), "plan": plan.as_dict()}, run_dir=run_dir, resume_id=wandb_id,
                announce=say,
            )  # fmt: skip
        self.wandb_holds = self._sent_before if resume_step is None else self._wandb_holds_after_resume()

    def _sent_before(self, row: dict[str, Any]) -> bool:
        """Without a readable record of what W&B holds: the rows an interrupted run wrote to metrics.jsonl."""
        return (row["kind"], row["step"]) in self.metrics.previously_logged

    def _wandb_holds_after_resume(self) -> Callable[[dict[str, Any]], bool]:
        """Continuing a W&B run that only ever ran offline: send what its earlier offline runs lack of the rows up
        to the checkpoint now, and later only rows they lack (see wandb_history). Where some of it went online, the
        server holds what it holds: trust metrics.jsonl."""
        w = self.wandb
        if not self.main or w is None or w.mode != "offline" or w.id is None or local_run_dirs(self.run_dir, w.id):
            return self._sent_before
        try:
            recorded = recorded_keys(self.run_dir, w.id, current=w.run_dir_path)
        except (OSError, ValueError, subprocess.SubprocessError) as e:
            self.say(f"W&B: could not read what the interrupted run recorded ({type(e).__name__}); not resending")
            return self._sent_before
        for row in self.metrics.kept_rows:
            if not holds(recorded, row):
                w.log_row(row)
        return functools.partial(holds, recorded)

    @property
    def wandb_id(self) -> str | None:
        return self.wandb.id if self.wandb is not None else None

    def say(self, message: str) -> None:
        if self.main:
            say(message)

    def write_run_files(self, cfg, argv: list[str]) -> None:
        """config.yaml (the resolved configuration) and command.txt (how to run it again)."""
        if self.main:
            write_text(self.run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            write_text(self.run_dir / "command.txt", " ".join([sys.argv[0], *argv]) + "\n")

    def row(self, row: dict[str, Any]) -> None:
        """One metrics row: metrics.jsonl and W&B; epoch rows also go to the console table."""
        if not self.main:
            return
        self.metrics.write(row)
        # A resumed run replays the steps after its checkpoint; rows the interrupted run got into W&B are not sent
        # again (the same values: resumption is exact), so W&B gets each row once.
        if not self.wandb_holds(row):
            self.wandb.log_row(row)
        if row["kind"] == "epoch":
            if not self.header_shown:
                self.say(self.table.header())
                self.header_shown = True
            self.say(self.table.row({**row, "img/s": row["images_per_sec"]}))

    def sync(self) -> None:
        """Rows written so far are on disk (before a checkpoint that claims them)."""
        if self.main:
            self.metrics.sync()

    def finish(self, summary: dict[str, Any], model_file: Path | None, title: str) -> None:
        """summary.json, curves.png, the W&B summary and model artifact, then close W&B."""
        if not self.main:
            return
        write_json(self.run_dir / "summary.json", summary)
        try:
            epochs = epoch_rows(read_metrics(self.run_dir / "metrics.jsonl"))
        except (OSError, FasttrainError) as e:  # moved or damaged while the run went on: only the picture is lost
            self.say(f"curves.png not drawn: {os_error_text(e) if isinstance(e, OSError) else e}")
            epochs = []
        if epochs:
            plot_curves(epochs, self.run_dir / "curves.png", title=title)
        self.metrics.close()
        self.wandb.summary({k: v for k, v in summary.items() if v is not None})
        if model_file is not None and model_file.exists():
            self.wandb.log_model(model_file, name=f"model-{self.run_dir.name}", metadata=summary)
        self.wandb.finish(exit_code=summary["exit_code"])
