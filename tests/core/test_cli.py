"""The command line: python -m shims run / doctor / list."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys

import pytest

import shims
from shims import config, receipt, registry, versions
from tests.conftest import clean_env, write
from tests.core.conftest import REAL_PATCHES, TIMEOUT, shims_cli


def test_cli_help():
    proc = shims_cli("--help")
    assert proc.returncode == 0
    for word in ("run", "doctor", "list", "SHIMS_PATCHES", "SHIMS_MODE"):
        assert word in proc.stdout, word


@pytest.mark.parametrize("command", ["run", "doctor", "list", "help"])
def test_every_subcommand_has_help(command):
    for flag in ("-h", "--help"):
        proc = shims_cli(command, flag)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith("usage: python -m shims " + command), proc.stdout[:200]
    if command in ("run", "doctor"):
        assert "-m MODULE" in proc.stdout and "accelerate launch" in proc.stdout and "--" in proc.stdout
    if command == "doctor":
        assert "--profile N" in proc.stdout
    if command == "list":
        assert "--json" in proc.stdout and "PATCH" in proc.stdout


def test_version():
    proc = shims_cli("--version", check=True)
    assert proc.stdout.startswith(f"torch-shims {shims.__version__} ")


def test_help_lists_every_variable_from_the_one_source():
    text = " ".join(shims_cli("--help", check=True).stdout.split())
    for name, values, default, meaning in config.environment_rows(registry.load()):
        assert name in text
        assert " ".join(meaning.replace("`", "").split()) in text, meaning


def test_output_fits_the_terminal_and_100_columns_in_a_pipe():
    for args in (["--help"], ["run", "--help"], ["doctor", "--help"], ["list"]):
        lines = shims_cli(*args, check=True).stdout.splitlines()
        assert max(len(line) for line in lines) <= 100, (args, max(lines, key=len))
    lines = shims_cli("--help", check=True, COLUMNS="72").stdout.splitlines()
    assert max(len(line) for line in lines) <= 72, max(lines, key=len)


def test_a_closed_pipe_ends_quietly():
    proc = subprocess.run(f"{shlex.quote(sys.executable)} -m shims list | head -1", shell=True, capture_output=True,
                          text=True, env=clean_env(), timeout=TIMEOUT)
    assert proc.stdout.count("\n") == 1
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr


def list_json(*args, **env):
    return json.loads(shims_cli("list", "--json", *args, check=True, **env).stdout)


def test_list_shows_every_patch_with_installed_versions_and_the_engines_verdicts():
    data = list_json()
    by_name = {p["name"]: p for p in data["patches"]}
    assert set(REAL_PATCHES) <= set(by_name)
    assert data["environment"]["parses"] and data["environment"]["mode"] == "fix"
    for patch in registry.load():
        listed = {t["target"]: t for t in by_name[patch.name]["targets"]}
        for target in patch.resolve_targets({o.name: o.default for o in patch.options}):
            fact = listed[str(target)]
            verdict = versions.target_verdict(patch, target)  # what the engine checks before it patches
            assert fact["verdict"] == (None if verdict is None else {"status": verdict[0], "reason": verdict[1]})
            if fact["distribution"]:
                assert fact["installed"] == versions.installed(fact["distribution"])
        assert by_name[patch.name]["docs"].startswith(receipt.DOCS_URL)
    text = shims_cli("list", check=True).stdout
    assert "SHIMS_DOCTR_FUNCTIONS=fit_one_epoch (default" in text and "SHIMS_DDP_OBSERVE=50 (default" in text
    docs = [line.strip() for line in text.splitlines() if line.strip().startswith("docs:")]
    assert len(docs) == len(REAL_PATCHES) and all(line.startswith("docs: " + receipt.DOCS_URL) for line in docs)


def test_list_one_patch_and_an_unknown_one():
    assert [p["name"] for p in list_json("doctr")["patches"]] == ["doctr"]
    assert shims_cli("list", "ddp", check=True).stdout.count("SHIMS_DDP_FIND_UNUSED") == 1
    proc = shims_cli("list", "dotr")
    assert proc.returncode == 2 and "shims list: unknown patch 'dotr'" in proc.stderr and "doctr" in proc.stderr


def test_list_tells_the_truth_about_the_environment_and_the_mode():
    broken = list_json(SHIMS_PATCHES="nope")
    assert not broken["environment"]["parses"] and "SHIMS_PATCHES='nope'" in broken["environment"]["error"]
    assert all(p["would_apply"].startswith("no: the environment does not parse") for p in broken["patches"])
    text = shims_cli("list", check=True, SHIMS_DDP_OBSERVE="-1").stdout
    assert text.startswith("environment: does not parse: SHIMS_DDP_OBSERVE='-1'") and "would apply: yes" not in text
    assert text.count("would apply: no: the environment does not parse") == len(REAL_PATCHES)
    detect = list_json(SHIMS_MODE="detect")
    assert all(p["would_apply"].startswith("no: SHIMS_MODE=detect") for p in detect["patches"])
    off = list_json(SHIMS_DISABLE="ddp")
    assert {p["name"]: p["would_apply"] for p in off["patches"]}["ddp"] == "no: listed in SHIMS_DISABLE"


def test_cli_unknown_command_exits_2_naming_the_valid_ones():
    proc = shims_cli("bogus")
    assert proc.returncode == 2
    assert "bogus" in proc.stderr and all(word in proc.stderr for word in ("run", "doctor", "list"))


def test_cli_run_without_a_script_exits_2():
    proc = shims_cli("run")
    assert proc.returncode == 2 and proc.stderr.startswith("shims run: expected a script")


def test_cli_run_with_a_bad_variable_exits_2_naming_it(tmp_path):
    script = write(tmp_path / "script.py", "print('ran')")
    proc = shims_cli("run", script, SHIMS_MODE="bogus")
    assert proc.returncode == 2 and "ran" not in proc.stdout
    assert "SHIMS_MODE='bogus'" in proc.stderr and "fix, detect, off" in proc.stderr


def test_cli_run_passes_argv_through_and_runs_as_main(tmp_path):
    script = write(tmp_path / "script.py", """
        import json, sys
        import shims
        print(json.dumps({"argv": sys.argv, "name": __name__, "path0": sys.path[0],
                          "mode": shims.status()["mode"]}))
    """)
    proc = shims_cli("run", script, "a", "--b", "c d", check=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["argv"] == [script, "a", "--b", "c d"]
    assert result["name"] == "__main__"
    assert os.path.realpath(result["path0"]) == os.path.realpath(str(tmp_path))  # as `python script.py` would
    assert result["mode"] == "fix"


def test_cli_run_script_exit_status_is_kept(tmp_path):
    script = write(tmp_path / "fails.py", "import sys; sys.exit(3)")
    assert shims_cli("run", script).returncode == 3
