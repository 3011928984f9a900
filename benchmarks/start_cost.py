"""What `import shims.auto` on a script's first line costs a whole process, on the interpreter running this.

    .venv/bin/python benchmarks/start_cost.py [--rounds 7] [--no-fallback]

Two scripts, each defining a doctr-shaped `fit_one_epoch` (a target shims must reach right after its `def`):
    doctr   imports torch, torchvision and doctr.models (skipped with a message when doctr is not installed here)
    torch   imports torch only
Each runs as a whole process in these variants, alternating (each round starts with a different variant, after one
untimed warm-up run of each):
    without             line 1 is `pass`
    import shims.auto   line 1 is `import shims.auto` (3.9-3.11: the rest of the script runs compiled, no tracer;
                        3.12+: sys.monitoring)
    fallback            `if True: import shims.auto`: not a top-level statement, so shims watches the module code
                        (3.9-3.11: a trace function while the imports run; what every first-line import cost before)
Prints per variant the median wall and CPU (user+sys) seconds, and the ratio to `without`: the median of the per-round
ratios and, in brackets, the ratio of the medians. Every shims run must report `fit_one_epoch` rewritten.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BODY = """
import json
{imports}


def fit_one_epoch(model, train_loader, batch_transforms, optimizer, scheduler, amp=False, log=None):
    model.train()
    for images, targets in train_loader:
        images = batch_transforms(images)
        train_loss = model(images, targets)["loss"]
        optimizer.zero_grad()
        train_loss = model(images, targets)["loss"]
        train_loss.backward()
        optimizer.step()
        scheduler.step()
    return train_loss.item()


print(json.dumps({{"rewritten": getattr(fit_one_epoch, "__wrapped__", None) is not None}}))
"""

SCRIPTS = {
    "doctr": "import torch\nimport torchvision\nimport doctr.models",
    "torch": "import torch",
}
VARIANTS = {
    "without": "pass",
    "import shims.auto": "import shims.auto",
    "fallback": "if True:\n    import shims.auto",
}


def run_once(path, env):
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, path], env=env, capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{path} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    rewritten = json.loads(proc.stdout.strip().splitlines()[-1])["rewritten"]
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, rewritten


def bench(name, imports, variants, rounds, folder, env):
    paths = {}
    for variant, first in variants.items():
        paths[variant] = os.path.join(folder, f"{name}_{variant.replace(' ', '_').replace('.', '_')}.py")
        with open(paths[variant], "w") as f:
            f.write(first + "\n" + BODY.format(imports=imports).lstrip("\n"))
    for variant in variants:  # warm-up: file cache, bytecode caches
        run_once(paths[variant], env)
    walls = {v: [] for v in variants}
    cpus = {v: [] for v in variants}
    order = list(variants)
    for r in range(rounds):
        for variant in order[r % len(order):] + order[:r % len(order)]:
            wall, cpu, rewritten = run_once(paths[variant], env)
            if rewritten != (variant != "without"):
                raise SystemExit(f"{name}/{variant}: fit_one_epoch rewritten={rewritten}: shims did not reach it")
            walls[variant].append(wall)
            cpus[variant].append(cpu)
    print(f"\n{name} script ({imports.replace(chr(10), '; ')}), {rounds} rounds")
    print(f"  {'variant':<19} {'wall s':>8} {'ratio':>15} {'cpu s':>8} {'ratio':>15}")
    for variant in variants:
        cells = []
        for values in (walls, cpus):
            med = statistics.median(values[variant])
            per_round = statistics.median(x / y for x, y in zip(values[variant], values["without"]))
            cells.append(f"{med:8.3f} {per_round:7.3f} ({med / statistics.median(values['without']):.3f})")
        print(f"  {variant:<19} {cells[0]} {cells[1]}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--no-fallback", action="store_true", help="leave out the traced fallback variant")
    parser.add_argument("--only", choices=sorted(SCRIPTS), help="run one script only")
    args = parser.parse_args()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHIMS_")}
    env["PYTHONPATH"] = os.pathsep.join([REPO] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["USE_TORCH"] = "1"  # doctr <= 0.11 picks its backend from this
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # as users run: bytecode cached after the warm-up
    variants = {k: v for k, v in VARIANTS.items() if not (args.no_fallback and k == "fallback")}
    print(f"Python {sys.version.split()[0]} ({sys.executable})")
    if importlib.util.find_spec("torch") is None:
        raise SystemExit("torch is not installed for this interpreter: nothing to measure")
    with tempfile.TemporaryDirectory() as folder:
        for name, imports in SCRIPTS.items():
            if args.only and name != args.only:
                continue
            missing = [m for m in ("torchvision", "doctr") if m in imports and importlib.util.find_spec(m) is None]
            if missing:
                print(f"\n{name} script: skipped, {' and '.join(missing)} not installed for this interpreter")
                continue
            bench(name, imports, variants, args.rounds, folder, env)


if __name__ == "__main__":
    main()
