"""`import shims.auto` is free on every Python (shims/startup/takeover.py, docs/startup.md).

On 3.9-3.11 the first-line import runs the rest of the script compiled, with no tracer, and ends the script's original
execution as the script's own end would. The main check runs each script twice, with `import shims.auto` on line 1
and with `pass` there, and compares exit status, stdout and stderr exactly: tracebacks, line numbers, sys.exit,
uncaught exceptions, KeyboardInterrupt, atexit, threads, warnings. Then each fallback, pdb and coverage.
Subprocesses run this interpreter and, where installed, pyenv's 3.9, 3.10 and 3.12 with the source checkout on
PYTHONPATH (no torch needed: the doctr patch rewrites a stand-in loop).
"""

from __future__ import annotations

import json
import os
import sys
import textwrap

import pytest

from tests.conftest import write
from tests.startup.conftest import ALL, FIRST_LINES, PROBE, SCRIPT, run, side, write_case

ENDINGS = {
    "normal end": 'print("last line")',
    "main guard": 'if __name__ == "__main__":\n    print("main guard", __name__, __file__ == sys.argv[0])',
    "sys.exit(3)": 'print("before exit")\nsys.exit(3)',
    "sys.exit(message)": 'sys.exit("stopping here")',
    "SystemExit(0)": "raise SystemExit(0)",
    "exception at module level": 'x = 1\nraise ValueError("at module level")',
    "exception in nested calls": "def outer():\n    inner()\n\n\ndef inner():\n    {}['missing']\n\n\nouter()",
    "chained exception": "try:\n    1 / 0\nexcept ZeroDivisionError as exc:\n    raise RuntimeError('wrapped') from exc",
    "exception in the loop": "fit_one_epoch(len, (1 / 0 for _ in 'x'))",
    "KeyboardInterrupt": "raise KeyboardInterrupt",
    "atexit and threads": (
        "import time\n"
        "atexit.register(lambda: print('atexit', '__file__' in globals(), flush=True))\n"
        "threading.Thread(target=lambda: (time.sleep(0.3), print('thread done', flush=True))).start()\n"
        "print('end of script')"),
    "atexit after an exception": "atexit.register(print, 'atexit ran')\nraise OSError(5, 'boom')",
    "custom excepthook": (
        "import traceback\n"
        "def hook(kind, value, tb):\n"
        "    print('hook', kind.__name__, [(os.path.basename(f), n, name) for f, n, name, _ in "
        "traceback.extract_tb(tb)])\n"
        "    print('value tb', [n for _, n, _, _ in traceback.extract_tb(value.__traceback__)])\n"
        "sys.excepthook = hook\n"
        "raise LookupError('to the hook')"),
    "warning": "import warnings\nwarnings.warn('careful', UserWarning)\nprint('warned')",
    "compile-time warning": "if len(sys.argv) is 1:\n    print('one argument')",
    "inspect": (
        "import inspect\n"
        "def helper():\n    return 1\n"
        "print(inspect.getsourcelines(helper)[1], inspect.getsource(helper).strip())\n"
        "print(os.path.basename(inspect.getsourcefile(fit_one_epoch)), inspect.getsourcelines(fit_one_epoch)[1], "
        "fit_one_epoch.__code__.co_firstlineno)\n"
        "print(inspect.getsource(sys.modules['__main__']).count('def fit_one_epoch'))"),
}



@pytest.mark.parametrize("ending", list(ENDINGS))
@pytest.mark.parametrize("which", ALL)
def test_the_script_behaves_exactly_as_without_shims_and_runs_with_no_tracer(which, ending, tmp_path):
    results = {}
    for variant, first in FIRST_LINES.items():
        folder = tmp_path / variant
        folder.mkdir()
        script = write_case(tmp_path / variant, first, ENDINGS[ending])
        proc = run(which, [script], folder, STARTUP_SIDE=folder / "side.json")
        stderr = proc.stderr.replace(str(folder), "<dir>")
        results[variant] = (proc.returncode, proc.stdout.replace(str(folder), "<dir>"), stderr)
        results[variant + " side"] = side(folder)
    assert results["shims"] == results["bare"], f"with shims: {results['shims']}\nwithout: {results['bare']}"
    assert results["bare side"]["forwards"] == 6
    if ending != "exception in the loop":
        assert results["shims side"]["forwards"] == 3  # the dead forward was removed: shims reached the script
    assert results["shims side"]["traced"] is False and results["shims side"]["tracer_after"] is False
    python_is_before_312 = "3.12" not in which and (which != "this" or sys.version_info < (3, 12))
    assert results["shims side"]["compiled"] is python_is_before_312  # 3.12+: sys.monitoring instead


@pytest.mark.parametrize("which", ALL)
def test_breakpoint_in_the_script_stops_there_and_the_script_ends_as_without_shims(which, tmp_path):
    outputs = {}
    for variant, first in FIRST_LINES.items():
        folder = tmp_path / variant
        folder.mkdir()
        script = write_case(folder, first, "breakpoint()\nprint('after the breakpoint')")
        proc = run(which, [script], folder, stdin="p 'in pdb', __name__, len(calls) > 0\ncontinue\n",
                   STARTUP_SIDE=folder / "side.json")
        outputs[variant] = (proc.returncode, proc.stdout.replace(str(folder), "<dir>"), proc.stderr)
    assert outputs["shims"] == outputs["bare"]
    assert "('in pdb', '__main__', True)" in outputs["shims"][1] and outputs["shims"][0] == 0


def test_python_dash_m_behaves_as_without_shims(tmp_path):
    outputs = {}
    for variant, first in FIRST_LINES.items():
        folder = tmp_path / variant
        folder.mkdir()
        script = write_case(folder, first, "print(__name__, __spec__.name)\nraise ValueError('from -m')")
        proc = run("this", ["-m", "train"], folder, STARTUP_SIDE=folder / "side.json")
        outputs[variant] = (proc.returncode, proc.stdout, proc.stderr.replace(str(folder), "<dir>"))
    assert outputs["shims"] == outputs["bare"]
    assert side(tmp_path / "shims")["compiled"] is (sys.version_info < (3, 12))
    with open(script) as f:
        line = f.read().splitlines().index("raise ValueError('from -m')") + 1
    assert f'File "<dir>/train.py", line {line}, in <module>' in outputs["shims"][2]


@pytest.mark.parametrize("first", [
    "import shims.auto as sa\nassert sa is sys.modules['shims.auto'] and sa.__name__ == 'shims.auto'",
    "from shims import auto\nassert auto is sys.modules['shims.auto'] and shims_not_bound()",
    "import json, shims.auto, textwrap\nassert shims.auto and textwrap.dedent and json.dumps",
    "import os; import shims.auto; ONCE.append(1)",
    "from __future__ import annotations\nimport shims.auto\ndef f(x: NotDefinedAnywhere) -> AlsoNot: ...",
])
def test_the_forms_of_the_import_bind_their_names_and_run_each_statement_once(first, tmp_path):
    head = "import sys\nONCE = []\nshims_not_bound = lambda: 'shims' not in globals()\nprint('head ran')\n"
    if first.startswith("from __future__"):
        head = ""
    script = write_case(tmp_path, head + first, "print('once', ONCE) if 'ONCE' in globals() else None")
    proc = run("this", [script], tmp_path, STARTUP_SIDE=tmp_path / "side.json")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("head ran") == (1 if head else 0)
    if "ONCE.append" in first:
        assert "once [1]" in proc.stdout
    assert side(tmp_path) == {"traced": False, "tracer_after": False, "compiled": sys.version_info < (3, 12),
                               "forwards": 3}


# ---------------------------------------------------------------- fallbacks: each keeps today's behaviour

REASON = "[shims DEBUG] import shims.auto: the rest of the script is not run compiled: "


def _fallback(tmp_path, first, *, args=None, stdin=None, ending="print('end')", which="this", files=None):
    for name, text in (files or {}).items():
        write(tmp_path / name, text)
    script = write_case(tmp_path, first, ending)
    proc = run(which, args or [script], tmp_path, stdin=stdin, STARTUP_SIDE=tmp_path / "side.json",
               SHIMS_LOG="DEBUG")
    return proc, script


TRACED_WATCH = {"traced": sys.version_info < (3, 12), "tracer_after": False, "compiled": False, "forwards": 3}


@pytest.mark.parametrize("first, reason", [
    ("if True:\n    import shims.auto", "is not a top-level statement"),
    ("try:\n    import shims.auto\nexcept ImportError:\n    pass", "is not a top-level statement"),
    ("def boot():\n    import shims.auto\n\n\nboot()", "not imported by the script's module code itself"),
    ("import boot_helper", "not imported by the script's module code itself"),
])
def test_an_import_that_is_not_a_top_level_statement_of_the_script_falls_back_to_the_traced_watch(
        first, reason, tmp_path):
    proc, _ = _fallback(tmp_path, first, files={"boot_helper.py": "import shims.auto\n"})
    assert proc.returncode == 0, proc.stderr
    assert side(tmp_path) == TRACED_WATCH
    if sys.version_info < (3, 12):
        assert REASON in proc.stderr and reason in proc.stderr, proc.stderr


def test_a_launcher_that_runs_the_script_through_runpy_goes_on_after_it(tmp_path):
    write(tmp_path / "launcher.py", """
        import runpy, sys
        runpy.run_path(sys.argv[1], run_name="__main__")
        print("launcher goes on")
    """)
    script = write_case(tmp_path, "import shims.auto", "print('end')")
    proc = run("this", [str(tmp_path / "launcher.py"), script], tmp_path, STARTUP_SIDE=tmp_path / "side.json",
               SHIMS_LOG="DEBUG")
    assert proc.returncode == 0 and proc.stdout.splitlines()[-1] == "launcher goes on", proc.stderr
    assert side(tmp_path) == TRACED_WATCH
    if sys.version_info < (3, 12):
        assert "which may go on after it" in proc.stderr


def test_python_dash_i_keeps_the_interactive_session_after_the_script(tmp_path):
    script = write_case(tmp_path, "import shims.auto", "print('end')")
    proc = run("this", ["-i", script], tmp_path, stdin="print('repl sees', len(calls))\n",
               STARTUP_SIDE=tmp_path / "side.json", SHIMS_LOG="DEBUG")
    assert proc.returncode == 0, proc.stderr
    assert "repl sees 3" in proc.stdout + proc.stderr
    assert side(tmp_path) == TRACED_WATCH
    if sys.version_info < (3, 12):
        assert "interactive session" in proc.stderr


def test_a_debugger_owning_the_trace_function_is_left_alone(tmp_path):
    first = "import sys\nsys.settrace(lambda frame, event, arg: None)\nimport shims.auto"
    proc, _ = _fallback(tmp_path, first, ending="import shims\nprint(json.dumps(shims.status()['patches']['doctr']))")
    assert proc.returncode == 0, proc.stderr
    seen = side(tmp_path)
    assert seen["forwards"] == 6 and seen["compiled"] is False  # as without the takeover: not reached, and said so
    receipt = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "trace function (debugger or coverage) is active" in json.dumps(receipt)
    if sys.version_info < (3, 12):
        assert "a trace function (a debugger) is active" in proc.stderr


def test_a_script_changed_on_disk_since_python_read_it_is_not_run_from_the_new_file(tmp_path):
    first = "open(__file__, 'a').write('print(\"appended later\")\\n')\nimport shims.auto"
    proc, _ = _fallback(tmp_path, first)
    assert proc.returncode == 0 and "appended later" not in proc.stdout, proc.stdout + proc.stderr
    assert side(tmp_path) == TRACED_WATCH
    if sys.version_info < (3, 12):
        assert "differs from the code the interpreter is running" in proc.stderr


@pytest.mark.parametrize("how", ["-c", "stdin"])
def test_a_script_without_a_file_runs_unchanged(how, tmp_path):
    """-c and stdin: shims cannot read the source, so it does not know the script defines a target and does not
    watch it (no cost, not reached), as without the takeover."""
    write(tmp_path / "startup_probe.py", PROBE)
    source = SCRIPT.format(first="import shims.auto", ending="print('end')")
    args, stdin = (["-c", source], None) if how == "-c" else (["-"], source)
    proc = run("this", args, tmp_path, stdin=stdin, STARTUP_SIDE=tmp_path / "side.json")
    assert proc.returncode == 0 and proc.stdout.strip() == "end", proc.stderr
    assert side(tmp_path) == {"traced": False, "tracer_after": False, "compiled": False, "forwards": 6}


# ---------------------------------------------------------------- what runs the script: spawn children, pdb, coverage

def test_a_spawn_child_of_a_first_line_import_script_is_reached_and_returns_to_multiprocessing(tmp_path):
    ending = textwrap.dedent("""
        import multiprocessing


        def child(queue):
            seen = []
            fit_one_epoch(lambda x: seen.append(x) or x, [1, 2])
            queue.put(len(seen))


        if __name__ == "__main__":
            ctx = multiprocessing.get_context("spawn")
            queue = ctx.Queue()
            process = ctx.Process(target=child, args=(queue,))
            process.start()
            print("child forwards", queue.get(timeout=90))
            process.join(90)
            print("child exit", process.exitcode)
    """)
    script = write_case(tmp_path, "import shims.auto", ending)
    proc = run("this", [script], tmp_path, STARTUP_SIDE=tmp_path / "side.json")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[-3:] == ["child forwards 2", "child exit 0", ""], proc.stdout


def test_pdb_runs_the_script_stops_at_its_breakpoints_and_finishes(tmp_path):
    script = write_case(tmp_path, "import shims.auto", "print('after the break')\nprint('last')")
    with open(script) as f:
        line = f.read().splitlines().index("print('after the break')") + 1
    commands = f"break {line}\ncontinue\np 'at the break', len(calls)\ncontinue\nquit\n"
    proc = run("this", ["-m", "pdb", script], tmp_path, stdin=commands, STARTUP_SIDE=tmp_path / "side.json")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert f"{script}({line})<module>()" in out and "('at the break', " in out, out
    assert out.index("('at the break'") < out.index("after the break\nlast\n") < out.index("The program finished"), out


def test_coverage_measures_the_same_lines_and_branches_and_shims_reaches_the_script(tmp_path):
    try:
        import coverage
    except ImportError:
        pytest.skip(f"coverage is not installed in {sys.executable}")
    where = os.path.dirname(os.path.dirname(coverage.__file__))  # coverage's own site, for the subprocess
    measured = {}
    for variant, first in FIRST_LINES.items():
        folder = tmp_path / variant
        folder.mkdir()
        script = write_case(folder, first, "if len(sys.argv) > 5:\n    print('never')\nprint('end')")
        data = folder / ".coverage"
        proc = run("this", ["-m", "coverage", "run", "--branch", f"--data-file={data}", script], folder,
                   extra_path=[where], STARTUP_SIDE=folder / "side.json")
        assert proc.returncode == 0 and proc.stdout.strip() == "end", proc.stderr
        report = run("this", ["-m", "coverage", "json", f"--data-file={data}", "-o", str(folder / "c.json")],
                     folder, extra_path=[where])
        assert report.returncode == 0, report.stderr
        with open(folder / "c.json") as f:
            result = next(v for k, v in json.load(f)["files"].items() if k.endswith("train.py"))
        measured[variant] = {k: result[k] for k in ("executed_lines", "missing_lines", "missing_branches")}
    assert measured["shims"] == measured["bare"]
    assert measured["shims"]["missing_lines"] == [script_line(script, "    print('never')")]
    seen = side(tmp_path / "shims")
    assert seen["forwards"] == 3 and seen["compiled"] is (sys.version_info < (3, 12))


def script_line(script, text):
    with open(script) as f:
        return f.read().splitlines().index(text) + 1
