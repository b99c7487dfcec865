"""Weights & Biases runs that never block training: choose a mode, start, log, finish.

Mode resolution (`resolve_mode`):
  - "online" / "offline" / "disabled" are used as asked.
  - "auto" (the default) follows WANDB_MODE when it is set in the environment (users who exported
    WANDB_MODE=offline or disabled keep their habit), else goes online when a W&B credential is found locally
    (WANDB_API_KEY, `wandb login`'s .netrc entry, the settings file), else offline.

Without a network nothing waits long: an online start first checks that the server accepts a TCP connection,
then gives `wandb.init` a short timeout; if either fails the run is logged offline instead (one console line
says so and how to upload it later with `wandb sync`). `finish()` is bounded by wandb's `finish_timeout`;
whatever did not upload stays on disk for `wandb sync`. A W&B call that fails (at the start too) prints one
warning line and turns W&B off for the rest of the run; training goes on.

Where the configuration leaves the project, name, tags, group, job type or id unset, W&B's environment
variables decide (WANDB_PROJECT, WANDB_NAME, ..., and the WANDB_RUN_ID a `wandb agent` sweep sets). Rows are
logged under namespaced keys (`wandb_keys`); the console output is captured for the run's Logs tab.

Start W&B on the main process only; other ranks use mode "disabled".
"""

import os
import re
import secrets
import string
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fasttrain.errors import ConfigError
from fasttrain.tracking.server_probe import server_unreachable
from fasttrain.tracking.wandb_credentials import find_api_key_source, wandb_base_url
from fasttrain.tracking.wandb_keys import metric_definitions, to_wandb

MODES = ("auto", "online", "offline", "disabled")

# WANDB_MODE values wandb accepts that we understand, and what they mean here.
_ENV_MODE_MEANINGS = {
    "online": "online",
    "run": "online",
    "offline": "offline",
    "dryrun": "offline",
    "disabled": "disabled",
}

# A healthy online start takes a few seconds; a server that accepts connections but never answers costs this
# plus ~2 s of wandb teardown before the offline fallback begins.
DEFAULT_INIT_TIMEOUT_S = 20.0
DEFAULT_FINISH_TIMEOUT_S = 60.0
DEFAULT_PROJECT = "fasttrain"  # when neither the config nor WANDB_PROJECT names one


def resolve_mode(requested: str = "auto") -> tuple[str, str]:
    """("online" | "offline" | "disabled", why) for a requested mode; makes no network call."""
    if requested not in MODES:
        raise ConfigError(f"unknown W&B mode {requested!r}: choose one of {', '.join(MODES)}")
    if requested != "auto":
        return requested, "requested"
    env_mode = _env_mode()
    if env_mode is not None:
        return env_mode, f"WANDB_MODE={env_mode} in the environment"
    source = find_api_key_source()
    if source is not None:
        return "online", f"W&B credentials found in {source}"
    return "offline", "not logged in to W&B; run `wandb login` or set WANDB_API_KEY to log online"


def _env_mode() -> str | None:
    value = os.environ.get("WANDB_MODE", "").strip().lower()
    if not value:
        return None
    if value not in _ENV_MODE_MEANINGS:
        raise ConfigError(
            f"WANDB_MODE={value!r} in the environment is not one of {', '.join(sorted(_ENV_MODE_MEANINGS))}: "
            "fix or unset it, or pass an explicit W&B mode"
        )
    return _ENV_MODE_MEANINGS[value]


class WandbRun:
    """One W&B run, or a no-op stand-in when W&B is off (`mode == "disabled"`, `id` is None).

    W&B errors never stop training: the first one is reported on one line and W&B is off for the rest of the
    run (the local metrics file stays complete).
    """

    def __init__(self, run: Any | None, mode: str, announce: Callable[[str], None] = print) -> None:
        self._run = run
        self.mode = mode
        self._announce = announce
        self._broken = False
        self._finished = run is None

    @property
    def id(self) -> str | None:
        """The W&B run id; pass it back as `resume_id` to continue this run after a restart."""
        return self._run.id if self._run is not None else None

    @property
    def run_dir_path(self) -> Path | None:
        """The local run directory (`.../wandb/[offline-]run-<time>-<id>`), the argument for `wandb sync`."""
        return Path(self._run.dir).parent if self._run is not None else None

    @property
    def url(self) -> str | None:
        return self._run.url if self._run is not None and self.mode == "online" else None

    def log_row(self, row: dict[str, Any]) -> None:
        """Record one metrics.jsonl row under its namespaced W&B keys (see `wandb_keys`), at the row's step.

        Steps must not decrease: W&B drops values logged at an earlier step than the last one.
        """
        if self._active():
            values, step = to_wandb(row)
            self._guarded("log", lambda: self._run.log(values, step=step))

    def summary(self, values: dict[str, Any]) -> None:
        """Put summary.json's figures, under the same flat keys, in the run summary (the runs table's columns).

        None values are left out: W&B records nothing for them either.
        """
        if self._active():
            present = {key: value for key, value in values.items() if value is not None}
            self._guarded("summary", lambda: self._run.summary.update(present))

    def log_model(self, path: Path, name: str, metadata: dict[str, Any]) -> None:
        """Log the file at `path` as a W&B artifact of type "model" named `name` (offline too: `wandb sync`
        uploads it). The file is referenced, not copied: it must stay where it is until the run is synced."""
        if self._active():
            self._guarded("log_model", lambda: self._run.log_artifact(_model_artifact(Path(path), name, metadata)))

    def finish(self, exit_code: int = 0) -> None:
        """Close the run; safe to call twice. A non-zero `exit_code` marks the run failed."""
        if self._finished:
            return
        self._finished = True
        self._guarded("finish", lambda: self._run.finish(exit_code=exit_code))

    def __enter__(self) -> "WandbRun":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        self.finish(exit_code=0 if exc_type is None else 1)

    def _define_metrics(self) -> None:
        def define() -> None:
            for key in metric_definitions():
                options = {"step_metric": key.x_axis, "summary": key.summary}
                self._run.define_metric(key.name, **{k: v for k, v in options.items() if v is not None})

        self._guarded("define_metric", define)

    def _active(self) -> bool:
        return self._run is not None and not self._broken and not self._finished

    def _guarded(self, action: str, call: Callable[[], object]) -> None:
        try:
            call()
        except Exception as error:  # noqa: BLE001 - a tracking failure must not end a training run
            self._broken = True
            self._announce(f"W&B {action} failed, W&B is off for the rest of this run: {_first_line(error)}")


def start_wandb(
    mode: str,
    *,
    project: str | None = None,
    entity: str | None = None,
    name: str | None = None,
    default_name: str | None = None,
    tags: Iterable[str] | None = None,
    group: str | None = None,
    job_type: str | None = None,
    config: dict[str, Any],
    run_dir: Path,
    resume_id: str | None = None,
    init_timeout_s: float = DEFAULT_INIT_TIMEOUT_S,
    finish_timeout_s: float = DEFAULT_FINISH_TIMEOUT_S,
    system_stats: bool = True,
    announce: Callable[[str], None] = print,
) -> WandbRun:
    """Start a W&B run writing under `run_dir/wandb/`, announcing the mode and file location in one line.

    `mode` is any of `MODES` ("auto" is resolved here). Identity settings left None (or empty tags) come from
    the environment, as W&B users and `wandb agent` sweeps expect: WANDB_PROJECT (else "fasttrain"),
    WANDB_ENTITY, WANDB_NAME (else `default_name`), WANDB_TAGS, WANDB_RUN_GROUP, WANDB_JOB_TYPE, WANDB_RUN_ID.
    `resume_id` continues that W&B run (resume="allow") and wins over WANDB_RUN_ID.
    `system_stats` samples CPU/GPU utilisation in wandb's background process. An online start that fails
    or times out falls back to offline; an offline start that fails turns W&B off for the run, with a warning.
    """
    resolved, reason = resolve_mode(mode)
    if resolved == "disabled":
        announce(f"W&B disabled ({reason})")
        return WandbRun(None, "disabled", announce)

    init_args = dict(
        project=project or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT,
        entity=entity,
        name=name or (default_name if not os.environ.get("WANDB_NAME") else None),
        tags=list(tags) if tags else None,
        group=group,
        job_type=job_type,
        config=config,
        dir=str(run_dir),
        # A fixed id lets the offline fallback (and a later resume) keep the id the online attempt had.
        id=resume_id or os.environ.get("WANDB_RUN_ID") or _new_run_id(),
        resume="allow" if resume_id else None,
    )
    settings = dict(
        console="wrap",  # the console output goes to the run's Logs tab
        silent=True,
        x_disable_stats=not system_stats,
        init_timeout=init_timeout_s,
        finish_timeout=finish_timeout_s,
    )
    try:
        with _wandb_mode_env(resolved):
            run, resolved, reason = _init(resolved, reason, Path(run_dir), init_args, settings)
    except Exception as error:  # noqa: BLE001 - a W&B that cannot start must not stop training
        announce(f"W&B start failed, W&B is off for this run: {_first_line(error)}")
        return WandbRun(None, "disabled", announce)

    local = Path(run.dir).parent
    if resolved == "online":
        announce(f"W&B online: {run.url} (local files in {local})")
    else:
        announce(f"W&B offline ({reason}): files in {local}; upload later with `wandb sync {local}`")
    wandb_run = WandbRun(run, resolved, announce)
    wandb_run._define_metrics()
    return wandb_run


@contextmanager
def _wandb_mode_env(mode: str) -> Iterator[None]:
    """A WANDB_MODE in the environment reads as `mode` while W&B starts: W&B's settings read the variable too, and
    refuse spellings fasttrain takes (`OFFLINE`, an empty value). The user's value is back afterwards, for the next
    run of the process (repeats decide their mode again)."""
    saved = os.environ.get("WANDB_MODE")
    if saved is None:
        yield
        return
    os.environ["WANDB_MODE"] = mode
    try:
        yield
    finally:
        os.environ["WANDB_MODE"] = saved


def _init(mode: str, reason: str, run_dir: Path, init_args: dict, settings: dict) -> tuple[Any, str, str]:
    """(wandb run, "online" | "offline", why offline) for a resolved mode, falling back from online to offline."""
    import wandb

    run_dir.mkdir(parents=True, exist_ok=True)
    _quiet(wandb)
    if mode == "online":
        problem = server_unreachable(wandb_base_url())
        if problem is None:
            existing = set(local_run_dirs(run_dir, init_args["id"]))
            try:
                return wandb.init(mode="online", settings=wandb.Settings(**settings), **init_args), "online", reason
            except Exception as error:  # noqa: BLE001 - any failure to reach W&B means "log offline"
                problem = _first_line(error)
                _discard_failed_start(wandb, run_dir, init_args["id"], keep=existing)
        reason = f"online start failed: {problem}"
    return wandb.init(mode="offline", settings=wandb.Settings(**settings), **init_args), "offline", reason


def _model_artifact(path: Path, name: str, metadata: dict[str, Any]) -> Any:
    import wandb

    artifact = wandb.Artifact(_artifact_name(name), type="model", metadata=metadata)
    # "immutable": W&B references the file instead of staging a copy of the weights in the user's cache.
    artifact.add_file(str(path), name=path.name, policy="immutable")
    return artifact


def _artifact_name(name: str) -> str:
    # W&B artifact names allow letters, digits, "-", "_" and "."; run names may hold anything.
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "model"


def _quiet(wandb: Any) -> None:
    # Console verbosity is process-wide in wandb, set by wandb.setup (init's `silent` alone lets the
    # "Loaded credentials" banner through).
    wandb.setup(settings=wandb.Settings(silent=True))


def _new_run_id() -> str:
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def local_run_dirs(run_dir: Path, run_id: str, kind: str = "run") -> list[Path]:
    """W&B's local directories of run `run_id` under `run_dir`/wandb, oldest first: `<kind>-<time>-<id>`, and
    `<kind>-<time>-<id>-<n>` when a run with that id started within the same second. `kind`: "run" (online) or
    "offline-run"."""
    pattern = re.compile(rf"{re.escape(kind)}-\d{{8}}_\d{{6}}-{re.escape(run_id)}(-\d+)?")
    return sorted(p for p in (Path(run_dir) / "wandb").glob(f"{kind}-*") if pattern.fullmatch(p.name))


def _discard_failed_start(wandb: Any, run_dir: Path, run_id: str, keep: set[Path]) -> None:
    """Forget a failed online attempt so the offline fallback can reuse its id.

    wandb's background service keeps a failed run's id reserved ("run ID ... is in use") until teardown.
    The attempt's empty local directory is removed; directories of earlier sessions are kept.
    """
    import shutil

    wandb.teardown()
    _quiet(wandb)
    for leftover in set(local_run_dirs(run_dir, run_id)) - keep:
        shutil.rmtree(leftover, ignore_errors=True)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    message = text[0] if text else type(error).__name__
    return message if len(message) <= 200 else message[:197] + "..."
