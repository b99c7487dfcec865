"""The W&B workspace fasttrain runs are watched with: accuracy and loss per epoch (train against validation),
accuracy against training time, throughput, step time, learning rate, GPU memory, and a runs table with the
summary's key figures.

    fasttrain dashboard --project P [--entity E] [--name NAME] [--print]

saves it as a view of project P (needs a W&B login and a network); `--print` prints its spec as JSON instead,
offline. Every key comes from `wandb_keys`, the table the runs are logged with.
"""

import argparse
import os
from typing import Any

from fasttrain.errors import EXIT_OK, FasttrainError, exit_process, run_command
from fasttrain.files import dumps
from fasttrain.tracking.wandb_keys import EPOCH, LR, ROW_KEYS, SUMMARY_COLUMNS, TRAIN_TIME
from fasttrain.tracking.wandb_run import DEFAULT_PROJECT

DEFAULT_VIEW_NAME = "fasttrain"
STEP_ROW, EPOCH_ROW = ROW_KEYS["step"], ROW_KEYS["epoch"]


def build_workspace(project: str, entity: str | None = None, name: str = DEFAULT_VIEW_NAME) -> Any:
    """A `wandb_workspaces.workspaces.Workspace` for `project` (entity: WANDB_ENTITY when None). Builds offline."""
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws

    def line(title: str, x: str, *ys: str) -> Any:
        return wr.LinePlot(title=title, x=x, y=list(ys))

    step = "Step"  # the optimiser step each row is logged at
    epoch, train_s = EPOCH.name, TRAIN_TIME.name
    sections = [
        ws.Section(
            name="Accuracy and loss per epoch",
            is_open=True,
            panels=[
                line("accuracy: train vs validation", epoch, EPOCH_ROW["train_acc"].name, EPOCH_ROW["val_acc"].name),
                line("loss: train vs validation", epoch, EPOCH_ROW["train_loss"].name, EPOCH_ROW["val_loss"].name),
                line("validation accuracy vs training time (s)", train_s, EPOCH_ROW["val_acc"].name),
            ],
        ),
        ws.Section(
            name="Throughput",
            is_open=True,
            panels=[
                line("images/s (global, per window)", step, STEP_ROW["images_per_sec"].name),
                line("images/s (global, per epoch)", epoch, EPOCH_ROW["images_per_sec"].name),
                line("images/s per device (per window)", step, STEP_ROW["images_per_sec_per_device"].name),
                line("step time (ms)", step, STEP_ROW["step_time_ms"].name),
            ],
        ),
        ws.Section(
            name="Optimiser and device",
            is_open=True,
            panels=[
                line("learning rate", step, LR.name),
                line("training loss (per window)", step, STEP_ROW["train_loss"].name),
                line("peak GPU memory (GB)", epoch, EPOCH_ROW["gpu_mem_gb"].name),
            ],
        ),
    ]
    return ws.Workspace(
        entity=entity or os.environ.get("WANDB_ENTITY", ""),
        project=project,
        name=name,
        sections=sections,
        runset_settings=ws.RunsetSettings(pinned_columns=[f"summary:{key}" for key in SUMMARY_COLUMNS]),
    )


def workspace_spec(workspace: Any) -> dict[str, Any]:
    """The workspace as the JSON W&B stores (what `--print` shows)."""
    return workspace._to_model().model_dump(by_alias=True, exclude_none=True, mode="json")


def save_workspace(project: str, entity: str | None, name: str) -> str:
    """Save the dashboard as a view of `project`; its URL. FasttrainError, one line, when W&B cannot be reached."""
    from fasttrain.tracking.server_probe import server_unreachable
    from fasttrain.tracking.wandb_credentials import find_api_key_source, wandb_base_url

    if find_api_key_source() is None:
        raise FasttrainError(
            "saving a dashboard needs a W&B login: run `wandb login` or set WANDB_API_KEY (or use --print)"
        )
    problem = server_unreachable(wandb_base_url())
    if problem is not None:
        raise FasttrainError(f"cannot reach W&B to save the dashboard ({problem}); use --print to see it offline")
    try:
        entity = entity or os.environ.get("WANDB_ENTITY") or _default_entity()
        workspace = build_workspace(project, entity, name).save()
        return workspace.url
    except FasttrainError:
        raise
    except Exception as error:  # noqa: BLE001 - whatever W&B says, the user gets one line
        message = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise FasttrainError(f"saving the dashboard to W&B failed: {message}") from None


def _default_entity() -> str:
    import wandb

    entity = wandb.Api(timeout=20).default_entity
    if not entity:
        raise FasttrainError("W&B names no default entity for this login: pass --entity")
    return entity


def command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="fasttrain dashboard", description="Save fasttrain's W&B workspace (dashboard) to a project."
    )
    parser.add_argument("--project", default=None, help="W&B project (default: WANDB_PROJECT, else fasttrain)")
    parser.add_argument("--entity", default=None, help="W&B entity (default: WANDB_ENTITY, else your default)")
    parser.add_argument("--name", default=DEFAULT_VIEW_NAME, help="the saved view's name")
    parser.add_argument("--print", action="store_true", help="print the workspace spec as JSON, save nothing")
    args = parser.parse_args(argv)
    project = args.project or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT
    if args.print:
        print(dumps(workspace_spec(build_workspace(project, args.entity, args.name)), indent=2))
    else:
        print(f"dashboard saved: {save_workspace(project, args.entity, args.name)}")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    return run_command("fasttrain dashboard", command, argv)


if __name__ == "__main__":
    exit_process(main())
