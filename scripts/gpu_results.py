"""Helpers of scripts/gpu_check.sh: the environment probe and the writer of its one results file.

    python scripts/gpu_results.py env OUT.json            what this machine has (python, torch, CUDA, GPU, packages)
    python scripts/gpu_results.py write WORK RESULT.md --mode cuda|cpu-dry-run

`write` reads what each stage left in WORK (NAME.rc, NAME.log, NAME.seconds, NAME.limit, NAME.cmd, NAME.json,
NAME.xml) and writes RESULT.md: markdown tables, then the whole result as JSON between ```json fences (`load` reads it
back). Standard library only, so that it still writes the file when torch or a carried wheel is what broke.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import xml.etree.ElementTree as ET

STAGES = ["install", "env", "tests_cuda", "doctr", "detr", "tests_cuda_path"]
PACKAGES = ["torch", "torchvision", "numpy", "python-doctr", "rfdetr", "transformers", "tokenizers",
            "huggingface_hub", "timm", "pycocotools", "pytest"]
IMPORTS = ["torch", "shims", "doctr.models", "rfdetr.engine", "pycocotools.coco", "timm"]
JSON_START, JSON_END = "```json\n", "\n```\n"
TAIL = 2500  # characters of each stage's log kept in the JSON


def probe_env(path):
    """What the stages will run on; every probe is guarded, so a missing piece is recorded, not fatal. The file is
    rewritten after each probe, so a probe killed by the stage's timeout (a slow first import) keeps the earlier ones."""
    import importlib
    import importlib.metadata as md
    env = {"python": sys.version.split()[0], "executable": sys.executable, "platform": platform.platform(),
           "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "pythonpath": os.environ.get("PYTHONPATH", ""), "packages": {}, "imports": {}}

    def save():
        with open(path, "w") as f:
            json.dump(env, f, indent=1)

    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        env["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        env["nvidia_smi"] = f"not available: {exc}"
    for name in PACKAGES:
        try:
            env["packages"][name] = md.version(name)
        except md.PackageNotFoundError:
            env["packages"][name] = None
    save()
    try:
        import torch
        env["torch"], env["cuda_build"] = torch.__version__, torch.version.cuda
        env["cuda_available"] = torch.cuda.is_available()
        if env["cuda_available"]:
            props = torch.cuda.get_device_properties(0)
            env["gpu"] = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                          "memory_gib": round(props.total_memory / 2**30, 1),
                          "multiprocessors": props.multi_processor_count,
                          "cudnn": torch.backends.cudnn.version(), "bf16": torch.cuda.is_bf16_supported(),
                          "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
                          "tf32_cudnn": torch.backends.cudnn.allow_tf32}
    except Exception as exc:  # noqa: BLE001 - record why, go on
        env["torch_error"] = f"{type(exc).__name__}: {exc}"[:300]
    save()
    for name in IMPORTS:
        try:
            module = importlib.import_module(name)
            env["imports"][name] = f"ok ({os.path.dirname(getattr(module, '__file__', '') or '')})"
        except Exception as exc:  # noqa: BLE001
            env["imports"][name] = f"{type(exc).__name__}: {exc}"[:300]
        save()
    try:
        from shims import registry
        env["shims_patches"] = [patch.name for patch in registry.load()]
    except Exception as exc:  # noqa: BLE001
        env["shims_patches"] = f"{type(exc).__name__}: {exc}"[:300]
    save()
    print(json.dumps(env, indent=1))


def read(path, default=None):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return default


def junit(path):
    """Counts and the failing / skipped tests of a pytest --junitxml file."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    result = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "problems": []}
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}.{case.get('name', '')}"
        kinds = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
        if not kinds:
            result["passed"] += 1
            continue
        child = case.find(kinds[0])
        key = {"failure": "failed", "error": "errors", "skipped": "skipped"}[kinds[0]]
        result[key] += 1
        message = (child.get("message") or child.text or "").strip().splitlines()
        result["problems"].append({"test": name, "kind": key, "message": (message[0] if message else "")[:300]})
    return result


def collect(work, mode):
    stages = {}
    for name in STAGES:
        rc = read(os.path.join(work, f"{name}.rc"))
        entry = {"command": (read(os.path.join(work, f"{name}.cmd"), "") or "").strip()}
        if rc is None:
            entry["status"] = (read(os.path.join(work, f"{name}.skip"), "") or "").strip() or "not run"
        else:
            code = int(rc.strip())
            entry["rc"] = code
            entry["status"] = "ok" if code == 0 else "timeout" if code in (124, 137) else "failed"
            entry["seconds"] = float(read(os.path.join(work, f"{name}.seconds"), "nan"))
            entry["limit_s"] = int(read(os.path.join(work, f"{name}.limit"), "0"))
            entry["log_tail"] = (read(os.path.join(work, f"{name}.log"), "") or "")[-TAIL:]
        data = read(os.path.join(work, f"{name}.json"))
        if data:
            try:
                entry["result"] = json.loads(data)
            except ValueError as exc:
                entry["result_error"] = f"unreadable JSON: {exc}"
        tests = junit(os.path.join(work, f"{name}.xml"))
        if tests is not None:
            entry["tests"] = tests
        stages[name] = entry
    return {"issue": 15, "mode": mode, "written_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds"), "env": stages["env"].get("result"), "stages": stages}


def fmt(value, spec):
    return "n/a" if value is None else format(value, spec)


def markdown(results):
    env = results.get("env") or {}
    gpu = env.get("gpu") or {}
    dry = results["mode"] != "cuda"
    lines = ["# shims GPU check", ""]
    if dry:
        lines += ["**CPU dry run**: every stage ran on the CPU with the tiniest sizes to prove the plumbing, the "
                  "timeouts and this file. Nothing here is a GPU measurement.", ""]
    lines += [f"- written: {results['written_utc']}; mode: {results['mode']}",
              f"- device: {gpu.get('name', 'no CUDA device')} (capability {gpu.get('capability', 'n/a')}, "
              f"{gpu.get('memory_gib', 'n/a')} GiB); nvidia-smi: {env.get('nvidia_smi', 'n/a')}",
              f"- python {env.get('python', 'n/a')}, torch {env.get('torch', 'n/a')}, CUDA build "
              f"{env.get('cuda_build', 'n/a')}, cuDNN {gpu.get('cudnn', 'n/a')}, TF32 matmul "
              f"{gpu.get('tf32_matmul', 'n/a')} / cuDNN {gpu.get('tf32_cudnn', 'n/a')}",
              f"- packages: {', '.join(f'{k} {v}' for k, v in (env.get('packages') or {}).items())}", "",
              "## Stages", "", "| stage | status | seconds | limit s | command |", "|---|---|---|---|---|"]
    for name, stage in results["stages"].items():
        command = stage["command"] if len(stage["command"]) < 160 else stage["command"][:150] + " ..."
        lines.append(f"| {name} | {stage['status']} | {fmt(stage.get('seconds'), '.1f')} | "
                     f"{stage.get('limit_s', '')} | `{command}` |")
    bad_imports = {k: v for k, v in (env.get("imports") or {}).items() if not v.startswith("ok")}
    if bad_imports:
        lines += ["", "Imports that failed: " + "; ".join(f"`{k}`: {v}" for k, v in bad_imports.items())]

    doctr = results["stages"]["doctr"].get("result")
    lines += ["", "## doctr fit_one_epoch (benchmarks/doctr_step.py)", ""]
    if doctr:
        lines += [f"{doctr['arch']}, batch {doctr['batch_size']}, amp={doctr['amp']}, {doctr['device_name']}, "
                  f"{doctr['rounds']} rounds x {doctr['steps']} steps", "",
                  "| variant | median ms/step | min | max | peak CUDA MiB |", "|---|---|---|---|---|"]
        peaks = doctr.get("peak_cuda_bytes") or {}
        for name, median in doctr["median_s_per_step"].items():
            peak = peaks.get(name)
            lines.append(f"| {name} | {median * 1e3:.1f} | {doctr['min_s_per_step'][name] * 1e3:.1f} | "
                         f"{doctr['max_s_per_step'][name] * 1e3:.1f} | "
                         f"{'n/a' if peak is None else format(peak / 2**20, '.0f')} |")
        lines += ["", "| ratio (median of per-round ratios) | value |", "|---|---|"]
        lines += [f"| {k} | {v:.3f} |" for k, v in doctr["ratios"].items()]
        check = doctr.get("weights_check")
        if check:
            lines += ["", f"Weights after {check['steps']} steps from one start, tolerance {check['tolerance']} "
                      f"(bitwise, deterministic algorithms); forwards per step {check['forwards_per_step']}", "",
                      "| pair | bitwise | max abs diff | elements differing |", "|---|---|---|---|"]
            for pair, r in check["pairs"].items():
                lines.append(f"| {pair} | {r['bitwise']} | {r['max_abs_diff']:.3g} | "
                             f"{r['elements_differing']} / {r['elements']} |")
            if check["nondeterministic_ops"]:
                lines.append(f"\nNondeterministic ops that ran: {'; '.join(check['nondeterministic_ops'])}")
    else:
        lines.append(f"no result: stage {results['stages']['doctr']['status']}")

    detr = results["stages"]["detr"].get("result")
    lines += ["", "## RF-DETR Nano evaluate with fp16_eval (benchmarks/detr_eval.py)", ""]
    if detr:
        lines += [f"{detr['images']} images {detr['resolution']}px, batch {detr['batch']}, {detr['rounds']} rounds, "
                  f"{detr['device_name']}, memory: {detr['memory']}, rfdetr amp: {detr['rfdetr_amp']}", "",
                  "| variant | median s | x float32 | peak MiB | max abs dlogits | max abs dboxes | params after | "
                  "model unchanged | autograd graph |", "|---|---|---|---|---|---|---|---|---|"]
        for name, v in detr["variants"].items():
            lines.append(f"| {name} | {v['median_s']:.3f} | {v['x_float32']:.2f} | {v['peak_bytes'] / 2**20:.1f} | "
                         f"{v['max_abs_dlogits']:.2e} | {v['max_abs_dboxes']:.2e} | {v['params_after']} | "
                         f"{v['model_unchanged']} | {v['graph']} |")
    else:
        lines.append(f"no result: stage {results['stages']['detr']['status']}")

    lines += ["", "## Tests", "", "| stage | passed | failed | errors | skipped | status |", "|---|---|---|---|---|---|"]
    problems = []
    for name in ("tests_cuda", "tests_cuda_path"):
        stage = results["stages"][name]
        t = stage.get("tests")
        if t:
            lines.append(f"| {name} | {t['passed']} | {t['failed']} | {t['errors']} | {t['skipped']} | "
                         f"{stage['status']} |")
            problems += [f"- {name}: {p['kind']} `{p['test']}`: {p['message']}" for p in t["problems"]]
        else:
            lines.append(f"| {name} | n/a | n/a | n/a | n/a | {stage['status']} |")
    if problems:
        lines += [""] + problems
    lines += ["", "## Everything above, as JSON", "", JSON_START.rstrip("\n")]
    return "\n".join(lines) + "\n" + json.dumps(results, indent=1, sort_keys=False) + JSON_END


def load(path):
    """The JSON part of a results file written by `write`."""
    text = read(path)
    start = text.index(JSON_START) + len(JSON_START)
    return json.loads(text[start:text.rindex(JSON_END)])


def main(argv):
    if len(argv) == 2 and argv[0] == "env":
        probe_env(argv[1])
    elif len(argv) == 5 and argv[0] == "write" and argv[3] == "--mode":
        results = collect(argv[1], argv[4])
        with open(argv[2], "w") as f:
            f.write(markdown(results))
        print(markdown(results).split("## Everything above")[0])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
