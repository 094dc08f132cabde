"""The shape of the code that the rest relies on: errors that carry what went wrong and name settings in
Python, one table of the command line's words for them, one registry of methods whose names are spelled
in their own modules, one source of the version. (The layers are checked by lint-imports, make test.)"""

from __future__ import annotations

import ast
import re
from importlib.metadata import version
from pathlib import Path

import pytest
import tomllib
from typer.testing import CliRunner

from apecli.checks import check_at_least, check_k
from apecli.cli import app
from apecli.cli.errors import COMMANDS, FLAGS, in_flags
from apecli.errors import ApecliError, InputError, Placeholder, Setting, SettingError, Step
from apecli.methods.registry import BUILT_IN

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = sorted(path for path in (ROOT / "src" / "apecli").rglob("*.py") if "cli" not in path.parts)


def test_the_command_line_says_a_setting_as_its_flag():
    assert in_flags(f"give {Setting('val_shots', 5)} or fewer") == "give --val-shots 5 or fewer"
    assert in_flags(f"pass {Setting('skip_bad', True)} to go on") == "pass --skip-bad to go on"
    assert in_flags(f"use {Setting('device', 'cpu')}") == "use --device cpu"
    assert in_flags(f"then {Setting('model', Placeholder('local-dir:DIR'))}") == "then --model local-dir:DIR"
    assert in_flags(f"fewer {Setting('steps')}") == "fewer --search-step"
    assert in_flags(f"run {Step('evaluate_artifact', mode='proker')} again") == "run apecli eval --mode proker again"
    assert in_flags(f"with {Step('transfer')}") == "with apecli transfer"
    assert in_flags("`not_a_setting` and `some_call()` and a `path` with a `tick") == \
        "`not_a_setting` and `some_call()` and a `path` with a `tick"  # what the table does not know, as written


def test_errors_carry_what_went_wrong():
    with pytest.raises(SettingError) as caught:
        check_at_least("val_shots", 0)
    assert (caught.value.option, caught.value.value) == ("val_shots", 0)
    assert str(caught.value) == "`val_shots` must be at least 1, got 0" and isinstance(caught.value, ApecliError)
    with pytest.raises(SettingError) as caught:
        check_k(65, 64)
    assert (caught.value.option, caught.value.value) == ("k", 65)
    error = InputError(Path("/x/y.h5"), "no such file")
    assert (error.path, str(error), str(error.within("eval: "))) == (Path("/x/y.h5"), "/x/y.h5: no such file",
                                                                     "eval: /x/y.h5: no such file")
    assert error.within("eval: ").path == Path("/x/y.h5")


def _strings_in_raises(tree: ast.AST):
    """The literal text of every message a ``raise`` builds (f-strings' literal parts included)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Raise) and node.exc is not None:
            for part in ast.walk(node.exc):
                if isinstance(part, ast.Constant) and isinstance(part.value, str):
                    yield part.value


@pytest.mark.parametrize("path", LIBRARY, ids=lambda path: str(path.relative_to(ROOT / "src")))
def test_no_library_message_names_a_flag_or_a_command(path):
    """The library names settings in Python (Setting, Step); only the command line names its flags."""
    flag_or_command = re.compile(r"(?<![\w-])--[a-z][a-z-]*|apecli (eval|fit|extract|transfer|refine|predict|bench|"
                                 r"classes|models|gc|ls|verify|info|import|export)\b")
    others = {"--local-dir"}  # the Hugging Face tool's own flag, in the command that downloads a model
    found = [text for text in _strings_in_raises(ast.parse(path.read_text()))
             for match in flag_or_command.finditer(text) if match.group(0) not in others]
    assert found == []


def _named(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("Setting", "Step") \
                and node.args and isinstance(node.args[0], ast.Constant):
            yield node.func.id, node.args[0].value, [keyword.arg for keyword in node.keywords]


def test_every_setting_and_call_the_library_names_has_the_command_lines_word():
    named = {entry for path in LIBRARY for kind, name, arguments in _named(ast.parse(path.read_text()))
             for entry in [(kind, name), *(("Setting", argument) for argument in arguments)]}
    assert len(named) > 20  # the scan finds them
    missing = sorted(name for kind, name in named if name not in (FLAGS if kind == "Setting" else COMMANDS))
    assert missing == []


def test_a_modes_name_is_spelled_in_its_own_module_only():
    own = {method.name: Path(method.__module__.replace(".", "/") + ".py").name for method in BUILT_IN}
    assert len(own) == len(BUILT_IN) == 13
    elsewhere = []
    for path in sorted((ROOT / "src" / "apecli").rglob("*.py")):
        tree = ast.parse(path.read_text())
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)) and node.body
                      and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and node.value in own and id(node) not in docstrings \
                    and path.name != own[node.value]:
                elsewhere.append((path.name, node.value))
    # "tip-adapter" there is the Tip-Adapter cache format that `apecli import tip-adapter` reads, not the mode;
    # "auto" elsewhere is the device choice (--device auto), a word of its own
    assert sorted(entry for entry in elsewhere if entry[1] != "auto") == [("commands.py", "tip-adapter"),
                                                                          ("importers.py", "tip-adapter")]
    assert {name for name, word in elsewhere if word == "auto"} == {"commands.py", "devices.py", "encoder.py",
                                                                    "predict.py"}


def test_the_version_has_one_source():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert version("apecli") == declared
    result = CliRunner().invoke(app, ["--version"])
    assert result.stdout.strip() == f"apecli {declared}"
    assert not re.search(r"__version__\s*=\s*[\"']", (ROOT / "src" / "apecli" / "__init__.py").read_text())
