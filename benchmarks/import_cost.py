"""What `import shims.auto` costs a process that imports torch: whole processes, alternating, medians and ratios.

    python benchmarks/import_cost.py [--pairs 10] [--editable]

Two scripts run as separate processes, in alternating order (ABBA...):
    plain    import torch
    shims    import shims.auto; import torch
The wall time of each whole process is measured; the report gives both medians and the median of the per-pair
ratios shims / plain (goal: within noise, <= 1.01). Then `-X importtime` of `import shims.auto` alone splits the
time among shims' own modules (the self time of every `shims*` module, budget 20 ms) and its dependencies (wrapt).

By default shims is measured as a user installs it: the wheel is built and installed with `pip install --no-deps
--target` into a temporary folder that comes first on PYTHONPATH (an editable install adds its own import finder,
whose cost is not shims'). --editable measures the interpreter's own installation instead.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def install_wheel(python, into):
    dist = os.path.join(into, "dist")
    subprocess.run([python, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", dist, REPO],
                   check=True, capture_output=True)
    wheel = [f for f in os.listdir(dist) if f.endswith(".whl")][0]
    site = os.path.join(into, "site")
    subprocess.run([python, "-m", "pip", "install", "--no-deps", "-q", "--target", site, os.path.join(dist, wheel)],
                   check=True, capture_output=True)
    return site


def run(python, code, env):
    """(wall seconds, CPU seconds user+system) of one whole process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run([python, "-c", code], env=env, check=True, capture_output=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the children waited for so far: this one is the delta
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def shims_own_ms(python, env):
    """(ms in shims' own modules, ms in wrapt) from -X importtime of `import shims.auto` (self times summed)."""
    proc = subprocess.run([python, "-X", "importtime", "-c", "import shims.auto"], env=env, check=True,
                          capture_output=True, text=True)
    own = deps = 0
    for line in proc.stderr.splitlines():
        match = re.match(r"import time:\s*(\d+)\s*\|\s*(\d+)\s*\|\s*(\S+)\s*$", line)
        if not match:
            continue
        name = match.group(3)
        if name == "shims" or name.startswith("shims."):
            own += int(match.group(1))
        elif name == "wrapt" or name.startswith("wrapt."):
            deps += int(match.group(1))
    return own / 1000, deps / 1000


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=10)
    parser.add_argument("--editable", action="store_true", help="measure the installed (editable) shims")
    args = parser.parse_args()
    python = sys.executable
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHIMS_")}
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # as users run it: bytecode cached after the first run
    with tempfile.TemporaryDirectory() as tmp:
        if not args.editable:
            env["PYTHONPATH"] = install_wheel(python, tmp)
        plain, shims = "import torch", "import shims.auto\nimport torch"
        for code in (plain, shims):  # warm the bytecode caches and the page cache
            run(python, code, env)
        times = {"plain": [], "shims": []}
        cpu = {"plain": [], "shims": []}
        ratios, cpu_ratios = [], []
        for i in range(args.pairs):
            order = ("plain", "shims") if i % 2 == 0 else ("shims", "plain")
            pair = {}
            for name in order:
                pair[name] = run(python, plain if name == "plain" else shims, env)
                times[name].append(pair[name][0])
                cpu[name].append(pair[name][1])
            ratios.append(pair["shims"][0] / pair["plain"][0])
            cpu_ratios.append(pair["shims"][1] / pair["plain"][1])
        own = [shims_own_ms(python, env) for _ in range(5)]
    import torch
    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, "
          f"shims from {'the editable install' if args.editable else 'its wheel'}, {args.pairs} pairs alternating")
    print(f"  import torch                        median {statistics.median(times['plain']) * 1000:8.1f} ms")
    print(f"  import shims.auto; import torch     median {statistics.median(times['shims']) * 1000:8.1f} ms")
    print(f"  ratio shims / plain, wall           median {statistics.median(ratios):.3f} "
          f"(min {min(ratios):.3f}, max {max(ratios):.3f})")
    print(f"  CPU (user+sys): plain {statistics.median(cpu['plain']) * 1000:.1f} ms, shims "
          f"{statistics.median(cpu['shims']) * 1000:.1f} ms; ratio median {statistics.median(cpu_ratios):.3f} "
          f"(min {min(cpu_ratios):.3f}, max {max(cpu_ratios):.3f})")
    print(f"  import shims.auto alone: shims' own modules {statistics.median(o[0] for o in own):.1f} ms "
          f"(budget 20 ms), wrapt {statistics.median(o[1] for o in own):.1f} ms (median of 5, -X importtime self "
          "times)")


if __name__ == "__main__":
    main()
