"""The README's promises, checked on the installed ``apecli`` command in processes of its own: one
whole line for an error, exit status 2 for a mistyped command line (a value outside an option's
choices included), reports on stdout, help that reads right, and OpenMP threads that share the machine."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from apecli import store
from apecli.errors import first_line
from apecli.kinds.features import save_features
from apecli.synthetic import image_folder, synthetic_features

APECLI = Path(sys.executable).with_name("apecli")
pytestmark = pytest.mark.skipif(not APECLI.is_file(), reason=f"no installed apecli command beside {sys.executable}")


def quiet_environment(**extra: str) -> dict[str, str]:
    """This environment for a child apecli: offline, a wide terminal, no OpenMP setting of the parent's."""
    env = {name: value for name, value in os.environ.items() if not name.startswith(("OMP_", "GOMP_", "KMP_"))}
    return {**env, "HF_HUB_OFFLINE": "1", "COLUMNS": "120", **extra}


def apecli(*args: str, cwd: Path, env: dict[str, str] | None = None, shell: str | None = None):
    command = ["bash", "-c", shell] if shell else [str(APECLI), *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=env or quiet_environment(),
                          timeout=300, stdin=subprocess.DEVNULL)


def one_error_line(done: subprocess.CompletedProcess, status: int, *fragments: str) -> str:
    """The failure's last stderr line, the only error line, whole; nothing on stdout."""
    assert done.returncode == status, (done.returncode, done.stderr)
    lines = done.stderr.rstrip("\n").splitlines()
    errors = [line for line in lines if line.startswith("apecli: error: ")]
    assert errors == lines[-1:], done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


@pytest.fixture(scope="module")
def features(tmp_path_factory) -> Path:
    data = synthetic_features(num_classes=4, dim=16, shots=(2,), val_per_class=4, test_per_class=4, views=2,
                              dataset="caltech101")
    folder = tmp_path_factory.mktemp("store")
    return save_features(data, store.in_store(folder, "caltech101", "features")).artifact.path


def test_a_value_outside_the_choices_is_a_mistyped_command_line(tmp_path, features):
    one_error_line(apecli("eval", str(features), "--mode", "ape-t", cwd=tmp_path), 2, "unknown mode 'ape-t'; choose one of",
                   "training-free", "training-required")
    one_error_line(apecli("ls", str(tmp_path), "--kind", "features2", cwd=tmp_path), 2, "choose one of features, refinement")
    one_error_line(apecli("extract", "--dataset", "pets", "--root", str(tmp_path), "--model", "x", "--pretrained", "none",
                          cwd=tmp_path), 2, "unknown dataset 'pets'; did you mean oxford_pets?", "known: caltech101")
    one_error_line(apecli("eval", str(features), "--device", "tpu", cwd=tmp_path), 2, "unknown device 'tpu'")
    one_error_line(apecli("eval", str(tmp_path / "missing.h5"), cwd=tmp_path), 1, "missing.h5")  # not a typing slip


def test_an_error_is_one_whole_line(tmp_path):
    image_folder(tmp_path / "images", classes=2, per_class=4)
    line = one_error_line(apecli("extract", "--images", str(tmp_path / "images"), "--model", "RN50", "--pretrained",
                                 "openai", "--store", str(tmp_path / "s"), cwd=tmp_path), 1,
                          "cannot get pretrained weights 'openai' for RN50 (offline?)")
    reason = line.rsplit(" (", 1)[-1]
    assert line.endswith(")") and (len(reason) < 190 or reason.endswith(" …)"))  # cut at a word, and said
    long = ValueError("An error happened while trying to locate the file on the Hub and we cannot find it")
    assert first_line(long, 48) == "An error happened while trying to locate the …"
    assert first_line(long, 200) == str(long) and first_line(ValueError("x" * 60), 10) == "x" * 10 + " …"


def test_reports_go_to_stdout(tmp_path, features):
    env = quiet_environment(APECLI_STORE=str(features.parent.parent))
    found = apecli(shell=f"'{APECLI}' info '{features}' | grep -c '^dim'", cwd=tmp_path, env=env)
    assert found.returncode == 0 and found.stdout.strip() == "1", found.stderr
    listed = apecli("ls", cwd=tmp_path, env=env)
    assert listed.returncode == 0 and str(features) in listed.stdout
    verified = apecli("verify", str(features), cwd=tmp_path, env=env)
    assert verified.returncode == 0 and f"{features}\tfeatures\tok" in verified.stdout
    piped = apecli(shell=f"'{APECLI}' refine '{features}' --k 8 | '{APECLI}' eval --mode tip-adapter", cwd=tmp_path,
                   env=env)
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout.strip().endswith(".h5") and len(piped.stdout.strip().splitlines()) == 1  # the path alone
    assert "Tip-Adapter" in piped.stderr  # the result table beside it


def test_help_reads_right(tmp_path):
    top = apecli("--help", cwd=tmp_path)
    assert top.returncode == 0
    lines = top.stdout.splitlines()
    at = next(index for index, line in enumerate(lines) if line.startswith("│ classes "))
    assert lines[at + 1].startswith("│ fit "), lines[at:at + 2]  # the classes line whole, on one line
    for command in ("ls", "info", "eval", "extract", "bench"):
        shown = apecli(command, "--help", cwd=tmp_path).stdout
        assert "<bool>" not in shown and "Env: APECLI" not in shown, command
        assert shown.count("[env var: APECLI_STORE]") == 1, command
    assert "instead of the artifact path" not in apecli("ls", "--help", cwd=tmp_path).stdout  # ls prints none
    assert "instead of the artifact path" in apecli("eval", "--help", cwd=tmp_path).stdout


SHOW_WAITING = ("import os, sys; from apecli.cli import main; sys.argv = ['apecli', '--version']\n"
                "try:\n    main()\nexcept SystemExit:\n    pass\n"
                "print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)")


@pytest.fixture
def competing():
    """Another process keeping a core busy."""
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    time.sleep(0.3)
    yield spinner
    spinner.kill()
    spinner.wait()


@pytest.mark.parametrize("given, expected", [({}, "PASSIVE"), ({"OMP_WAIT_POLICY": "ACTIVE"}, "ACTIVE"),
                                             ({"GOMP_SPINCOUNT": "300000"}, "None")])
def test_on_a_busy_machine_threads_sleep_while_they_wait_unless_told_otherwise(tmp_path, competing, given, expected):
    done = subprocess.run([sys.executable, "-c", SHOW_WAITING], capture_output=True, text=True, cwd=tmp_path,
                          env=quiet_environment(**given), timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[-2] == f"{expected} False"  # decided before torch was imported


def test_on_a_quiet_machine_or_once_torch_runs_waiting_is_left_alone(competing):
    from apecli.cli.sharing import others_running, share_cores

    assert others_running()  # the competing process, seen
    environ: dict[str, str] = {}
    assert share_cores(environ, busy=lambda: False) == {} and environ == {}  # a quiet machine: OpenMP's default
    with pytest.MonkeyPatch.context() as patch:
        patch.delitem(sys.modules, "torch", raising=False)
        assert share_cores(environ, busy=lambda: True) == {"OMP_WAIT_POLICY": "PASSIVE"} == environ
    import torch  # noqa: F401 - its threads started

    assert share_cores({}, busy=lambda: True) == {}  # too late to matter here
