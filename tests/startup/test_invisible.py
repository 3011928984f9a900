"""`import shims.auto` is invisible to the script: cases where it once was not, each compared with the plain script.

Each script runs three times, on this Python and on pyenv's 3.9, 3.10, 3.11 and 3.12 where installed, with line 1
`pass` (plain), `import shims.auto` (on 3.9-3.11 the rest of the script runs compiled: shims/startup/takeover.py) and
`if True: import shims.auto` (the traced fallback on 3.9-3.11: mainwatch.ScriptWatch); exit status, stdout and stderr
must be identical, and the two shims runs must have reached the script's `fit_one_epoch` (one forward, not two).
What stays visible, and why, is listed in docs/startup.md.
"""

from __future__ import annotations

import os
import select
import subprocess
import time

import pytest

from tests.startup.conftest import ALL, env_for, python_for, run, write

VARIANTS = {"plain": "pass", "takeover": "import shims.auto", "fallback": "if True: import shims.auto"}

# line 1 is the variant's; one forward per fit_one_epoch call once shims has reached it (two in the plain script)
TEMPLATE = """{first}
import os, sys, threading


def fit_one_epoch(model, loader):
    for x in loader:
        loss = model(x)
        loss = model(x)
    return loss


_calls = []
fit_one_epoch(lambda x: _calls.append(x) or x, [1])
with open(os.environ["STARTUP_SIDE"], "w") as _f:
    _f.write(str(len(_calls)))
del _calls, _f
{body}
"""

CASES = {
    # 3.9/3.10's importlib.import_module takes the module lock that the main thread held during the takeover
    "a thread imports shims.auto": """
import importlib
done = []
worker = threading.Thread(target=lambda: (importlib.import_module("shims.auto"), done.append(1)))
worker.start()
worker.join(20)
print("imported in the thread:", done)
""",
    # the engine kept the script's function, and with it __main__'s globals, past the interpreter's teardown
    "__del__ of module-level objects at exit": """
class Noisy:
    def __del__(self):
        print("__del__ ran", flush=True)


keep = Noisy()
print("end")
""",
    # 3.9's traced fallback left f_trace on the module frame, which then kept reporting a stale line number
    "line numbers of module code after the watch": """
import warnings
a = 1


def f():
    warnings.warn("where am I")
    raise ValueError("which line?")


f()
""",
    "sys.excepthook deleted": 'del sys.excepthook\nraise ValueError("mine")',
    "sys.excepthook = None": 'sys.excepthook = None\nraise ValueError("mine")',
    "sys.excepthook raises": 'def hook(*args):\n    raise KeyError("in the hook")\n\n\n'
                             'sys.excepthook = hook\nraise ValueError("mine")',
    "sys.excepthook exits": 'sys.excepthook = lambda *args: sys.exit(4)\nraise ValueError("mine")',
    # no name of shims in the script's globals (the user's own `import shims.auto` binds `shims`, nothing else)
    "globals()": 'print(sorted(name for name in globals() if name != "shims"))',
    # a trace function the script sets sees, after the script's end, what it sees without shims
    "a tracer set by the script": """
import atexit
seen = []


def tracer(frame, event, arg):
    if os.sep + "shims" + os.sep in frame.f_code.co_filename:
        seen.append((event, frame.f_code.co_name))
    return tracer


atexit.register(lambda: print("the tracer saw shims:", seen))
sys.settrace(tracer)
print("end")
""",
}

STEPS = {  # pdb commands after `breakpoint()`: step past the script's last line, then quit or go on
    "step past the end": "n\nn\nn\nn\nn\nq\n",
    "quit at the return": "n\nn\nq\n",
    "continue": "n\nc\n",
}


def compare(which, tmp_path, body, *, args=None, stdin=None, merge=False, name="train.py", variants=None):
    """Run the three variants; assert they end alike; return the plain run's (status, stdout, stderr)."""
    results, forwards = {}, {}
    for variant, first in (variants or VARIANTS).items():
        folder = tmp_path / variant
        script = write(folder / name, TEMPLATE.format(first=first, body=body.strip("\n")))
        for helper, text in (args or {}).items() if isinstance(args, dict) else ():
            write(folder / helper, text)
        argv = [str(folder / list(args)[0]), script] if isinstance(args, dict) else args or [script]
        proc = run(which, argv, folder, stdin=stdin, merge=merge, STARTUP_SIDE=folder / "side.txt")
        results[variant] = tuple(str(x).replace(str(folder), "<dir>")
                                 for x in (proc.returncode, proc.stdout, proc.stderr))
        with open(folder / "side.txt") as f:
            forwards[variant] = f.read()
    assert forwards == {"plain": "2", "takeover": "1", "fallback": "1"}  # shims reached the script, both ways
    for variant in ("takeover", "fallback"):
        assert results[variant] == results["plain"], f"{variant}: {results[variant]}\nplain: {results['plain']}"
    return results["plain"]


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("which", ALL)
def test_the_script_sees_no_difference(which, case, tmp_path):
    status, out, err = compare(which, tmp_path, CASES[case])
    if case == "a thread imports shims.auto":
        assert "imported in the thread: [1]" in out
    if case == "__del__ of module-level objects at exit":
        assert out == "end\n__del__ ran\n"
    if case == "line numbers of module code after the watch":
        lines = TEMPLATE.format(first="pass", body=CASES[case].strip("\n")).splitlines()
        call, warn = lines.index("f()") + 1, lines.index('    warnings.warn("where am I")') + 1
        assert f'train.py", line {call}, in <module>\n    f()' in err and f"train.py:{warn}: UserWarning" in err


LAUNCHER = """
import runpy, sys, traceback
try:
    runpy.run_path(sys.argv[1], run_name="__main__")
except ValueError:
    traceback.print_exc()
print("the launcher goes on")
"""


@pytest.mark.parametrize("fallback", ["a launcher that goes on after the script", "a file edited before the import"])
@pytest.mark.parametrize("which", ALL)
def test_module_line_numbers_after_the_traced_watch_of_every_fallback(which, fallback, tmp_path):
    """Each reason for the traced watch (3.9-3.11), against the plain script run the same way."""
    body = CASES["line numbers of module code after the watch"]
    call = TEMPLATE.format(first="pass", body=body.strip("\n")).splitlines().index("f()") + 1
    if fallback == "a launcher that goes on after the script":
        status, out, err = compare(which, tmp_path, body, args={"launcher.py": LAUNCHER})
        assert out.endswith("the launcher goes on\n") and f'line {call}, in <module>\n    f()' in err
    else:
        edit = "open(__file__, 'a').write('# appended' + chr(10)); "
        variants = {"plain": edit + "pass", "takeover": edit + "import shims.auto",
                    "fallback": edit + "__import__('shims.auto')"}  # not an import statement: traced
        status, out, err = compare(which, tmp_path, body, variants=variants)
        assert f'line {call}, in <module>\n    f()' in err


@pytest.mark.parametrize("steps", list(STEPS))
@pytest.mark.parametrize("which", ALL)
def test_breakpoint_then_stepping_past_the_end_never_shows_shims(which, steps, tmp_path):
    status, out, err = compare(which, tmp_path, "breakpoint()\nx = 1", stdin=STEPS[steps])
    assert "shims" not in out + err and "importlib" not in out + err


@pytest.mark.parametrize("which", ALL)
def test_python_dash_m_with_both_streams_in_one_pipe(which, tmp_path):
    """runpy neither flushes nor removes anything at a module's end (the interpreter does both for a file)."""
    body = ("import atexit\natexit.register(lambda: sys.stderr.write('atexit, on stderr\\n'))\n"
            "print('on stdout', __file__ is not None)\nsys.stderr.write('on stderr\\n')")
    status, out, _ = compare(which, tmp_path, body, args=["-m", "train"], merge=True)
    # stdout is block-buffered into a pipe and flushed only at the interpreter's finalization, after atexit
    assert status == "0" and out.splitlines() == ["on stderr", "atexit, on stderr", "on stdout True"]


def _interactive(which, tmp_path, startup):
    """Python's prompt on a pseudo-terminal, with PYTHONSTARTUP=startup: everything it printed. Each line is typed
    once the prompt shows (the terminal echoes typing at once: typed early, it would land elsewhere in the output)."""
    import pty
    env = env_for(which, tmp_path, PYTHONSTARTUP=startup, STARTUP_SIDE=tmp_path / "side.txt")
    main, child = pty.openpty()
    proc = subprocess.Popen([python_for(which), "-q"], stdin=child, stdout=child, stderr=child, env=env,
                            cwd=str(tmp_path), close_fds=True)
    os.close(child)
    out = b""

    def read_until(marker, seconds=60):
        nonlocal out
        deadline = time.monotonic() + seconds
        while marker not in out and time.monotonic() < deadline:
            if not select.select([main], [], [], 0.5)[0]:
                continue
            try:
                chunk = os.read(main, 4096)
            except OSError:  # the child closed the terminal
                return
            if not chunk:
                return
            out += chunk

    try:
        read_until(b">>> ")
        os.write(main, b"print('at the prompt', 6 * 7)\n")
        read_until(b"at the prompt 42\r\n>>> ")
        os.write(main, b"exit()\n")
        read_until(b"\0")  # to the end
        proc.wait(60)
    finally:
        proc.kill()
        os.close(main)
    return proc.returncode, out.decode(errors="replace").replace("\r\n", "\n")


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="no pseudo-terminals on this platform")
@pytest.mark.parametrize("which", ALL)
def test_a_pythonstartup_file_importing_shims_auto_leaves_the_prompt(which, tmp_path):
    results = {}
    for variant, first in VARIANTS.items():
        folder = tmp_path / variant
        startup = write(folder / "startup.py", TEMPLATE.format(first=first, body="print('startup ran')"))
        results[variant] = _interactive(which, folder, startup)
        with open(folder / "side.txt") as f:
            assert f.read() == ("2" if variant == "plain" else "1")  # shims reached the startup file's function
    assert results["plain"][0] == 0 and "at the prompt 42" in results["plain"][1]
    assert results["takeover"] == results["plain"] and results["fallback"] == results["plain"]

