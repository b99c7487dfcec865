"""The one `fasttrain` command: its usage, each subcommand's --help, and a bad input per entry point answered with
one `fasttrain <sub>: error: ...` line on stderr and exit code 2 (fasttrain/errors.py), never a traceback.

Cheap commands run as the installed console script; the others in this process (a subprocess would import torch
again for each), through the same `fasttrain.cli.main` the console script calls."""

import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, env_for_tests

import fasttrain
from fasttrain import cli
from fasttrain.errors import EXIT_BAD_INPUT, EXIT_OK, run_command
from fasttrain.loop.distributed import StopSignals

FASTTRAIN = Path(sys.executable).with_name("fasttrain")
W_AND_B_SETTINGS = ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL", "WANDB_CONFIG_DIR", "NETRC")


def run(cmd: list, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=tmp_path, env=env_for_tests(tmp_path), capture_output=True, text=True, timeout=120)


def assert_one_error_line(rc: int, stderr: str, prog: str) -> str:
    assert rc == EXIT_BAD_INPUT, stderr
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), stderr
    return lines[0]


def test_console_script_prints_its_usage_and_refuses_an_unknown_command(tmp_path):
    usage = run([FASTTRAIN, "--help"], tmp_path)
    assert usage.returncode == EXIT_OK and usage.stderr == ""
    assert all(f"fasttrain {name}" in usage.stdout for name in cli.COMMANDS), usage.stdout

    unknown = run([FASTTRAIN, "trian"], tmp_path)
    line = assert_one_error_line(unknown.returncode, unknown.stderr, "fasttrain")
    assert "unknown command 'trian'" in line and "train" in line
    assert unknown.stdout == ""

    bare = run([FASTTRAIN], tmp_path)
    assert bare.returncode == EXIT_BAD_INPUT and "fasttrain COMMAND" in bare.stderr and bare.stdout == ""

    version = run([FASTTRAIN, "--version"], tmp_path)
    assert version.returncode == EXIT_OK and version.stdout == f"fasttrain {fasttrain.__version__}\n"


def test_console_script_reports_a_bad_input_in_one_line(tmp_path):
    missing = tmp_path / "missing.tar.gz"
    result = run([FASTTRAIN, "convert", "--source", str(missing), "--out", str(tmp_path / "out")], tmp_path)
    assert str(missing) in assert_one_error_line(result.returncode, result.stderr, "fasttrain convert")
    assert not (tmp_path / "out").exists()


def test_a_commands_process_ends_with_its_code_its_exit_handlers_run_and_its_objects_frozen(tmp_path):
    # Python 3.12 starts with a few hundred objects frozen; what exit_process freezes is the whole heap.
    script = (
        "import atexit, gc, sys\n"
        "from fasttrain.errors import exit_process\n"
        "at_start = gc.get_freeze_count()\n"
        "atexit.register(lambda: print('frozen', gc.get_freeze_count() > at_start + 5_000, flush=True))\n"
        "sys.stdout.write('unflushed ')\n"
        "exit_process(3)\n"
    )
    result = run([sys.executable, "-c", script], tmp_path)
    assert (result.returncode, result.stdout, result.stderr) == (3, "unflushed frozen True\n", "")


def test_ctrl_c_while_the_trainer_script_imports_torch_is_one_line(tmp_path):
    """`python fasttrain/train.py`: its imports run before main() and run_command's handling. The SIGINT is sent
    once torch's shared library is mapped, with most of torch's import (seconds) still to come."""
    import time

    proc = subprocess.Popen(
        [sys.executable, str(REPO / "fasttrain" / "train.py"), "--help"], cwd=tmp_path, env=env_for_tests(tmp_path),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    maps = Path(f"/proc/{proc.pid}/maps")
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline and "libtorch" not in maps.read_text():
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert (proc.returncode, err, out) == (130, "fasttrain train: interrupted by SIGINT\n", "")


@pytest.mark.parametrize("argv", [["--help"], ["convert", "--help"]])  # printed by fasttrain, and by argparse
def test_output_to_a_reader_that_went_away_ends_quietly_with_sigpipes_code(tmp_path, argv):
    env = {key: value for key, value in env_for_tests(tmp_path).items() if key != "PYTHONUNBUFFERED"}  # as users run
    proc = subprocess.Popen([FASTTRAIN, *argv], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # `fasttrain --help | head -0`: nobody reads
    _, stderr = proc.communicate(timeout=120)
    assert (proc.returncode, stderr) == (128 + signal.SIGPIPE, b"")


def test_a_broken_pipe_that_is_not_stdout_is_not_taken_for_a_closed_output():
    def writes_to_a_dead_pipe(argv):
        raise BrokenPipeError(32, "Broken pipe")  # a child's or a socket's: stdout is fine

    with pytest.raises(BrokenPipeError):
        run_command("fasttrain test", writes_to_a_dead_pipe, [])


def test_train_module_prints_its_help(tmp_path):
    result = run([sys.executable, "-m", "fasttrain.train", "--help"], REPO)
    assert result.returncode == EXIT_OK, result.stderr[-2000:]
    assert "fasttrain train" in result.stdout and "--train.lr" in result.stdout


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_each_subcommand_help_names_it(name, capsys):
    try:
        rc = cli.main([name, "--help"])
    except SystemExit as done:  # argparse's --help
        rc = done.code
    assert rc == EXIT_OK
    assert f"fasttrain {name}" in capsys.readouterr().out


@pytest.fixture
def without_wandb_login(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for name in W_AND_B_SETTINGS:
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["convert", "--source", "{tmp}/missing", "--out", "{tmp}/out"], "{tmp}/missing"),
        (["eval", "{tmp}/not-a-run"], "neither a run directory"),
        (["compare", "--out", "{tmp}/out"], "--grid NAME|PATH is required"),
        (["dashboard", "--project", "p"], "wandb login"),
        (["train", "--train.bogus", "1"], "train.bogus"),
    ],
    ids=lambda value: value[0] if isinstance(value, list) else "",
)
def test_bad_input_is_one_line_and_exit_2(argv, expected, tmp_path, capfd, without_wandb_login):
    rc = cli.main([arg.format(tmp=tmp_path) for arg in argv])
    captured = capfd.readouterr()
    line = assert_one_error_line(rc, captured.err, f"fasttrain {argv[0]}")
    assert expected.format(tmp=tmp_path) in line
    assert not (tmp_path / "out").exists()


def test_ctrl_c_outside_the_training_loop_is_one_line_and_exit_130(capfd):
    def converting(argv):
        raise KeyboardInterrupt  # as Ctrl-C during a conversion or the start-up would

    try:
        code = run_command("fasttrain convert", converting, [])
    except KeyboardInterrupt:
        pytest.fail("the interruption reached the caller (here pytest, for a user a traceback)")
    assert code == 128 + signal.SIGINT
    assert capfd.readouterr().err == "fasttrain convert: interrupted by SIGINT\n"


def test_a_second_signal_during_training_stops_at_once_with_its_exit_code(capfd):
    def training(argv):
        with StopSignals() as signals:
            signals._handle(signal.SIGTERM, None)  # the first asks the loop for a checkpoint, then a stop
            assert signals.received == signal.SIGTERM
            signals._handle(signal.SIGTERM, None)  # the second will not wait for it
        return 0

    try:
        code = run_command("fasttrain train", training, [])
    except KeyboardInterrupt:
        pytest.fail("the second signal reached the caller (here pytest, for a user a traceback)")
    assert code == 128 + signal.SIGTERM
    message = "fasttrain train: stopped at once by a second SIGTERM, without the checkpoint the first asked for\n"
    assert capfd.readouterr().err == message
