"""Core machinery (issue 2): configuration, import cost, hook ordering, never-crash, versions, receipt, CLI, children.

In-process tests use a tiny fake patch on a module written to tmp_path, enabled through a test-only registry, so they
need neither torch nor a framework. Subprocess tests run the installed interpreter with a hard timeout.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import re
import subprocess
import sys
import uuid
from importlib import metadata

import pytest

import shims
from conftest import REPO as REPO_ROOT, SOURCE, clean_env, run_python, write
from shims import config, engine, registry
from shims.patch import Patch, Skip, Target

TIMEOUT = 120
REAL_PATCHES = ("doctr", "detr", "ddp", "colossalai", "yolo")


# ---------------------------------------------------------------- 1. configuration

@pytest.fixture(scope="module")
def patches():
    loaded = registry.load()
    assert tuple(p.name for p in loaded) == REAL_PATCHES, registry.broken()
    return loaded


def test_defaults_enable_every_patch_in_fix_mode(patches):
    cfg = config.parse({}, patches)
    assert cfg.patches == REAL_PATCHES and cfg.why_off == {}
    assert (cfg.mode, cfg.strict, cfg.report, cfg.log) == ("fix", False, None, None)
    assert cfg.options["doctr"]["FUNCTIONS"] == ("fit_one_epoch",)
    assert cfg.options["ddp"]["FIND_UNUSED"] == "auto"


@pytest.mark.parametrize("value, enabled", [
    ("all", REAL_PATCHES),
    ("ALL", REAL_PATCHES),
    ("none", ()),
    ("ddp, doctr", ("doctr", "ddp")),  # registry order, spaces and case ignored
    ("colossalai", ("colossalai",)),
])
def test_shims_patches_selects_patches(patches, value, enabled):
    cfg = config.parse({"SHIMS_PATCHES": value}, patches)
    assert cfg.patches == enabled
    for name in set(REAL_PATCHES) - set(enabled):
        assert "SHIMS_PATCHES" in cfg.why_off[name]


def test_shims_disable_leaves_patches_out_after_shims_patches(patches):
    cfg = config.parse({"SHIMS_PATCHES": "doctr,ddp", "SHIMS_DISABLE": "ddp,colossalai"}, patches)
    assert cfg.patches == ("doctr",)
    assert "SHIMS_DISABLE" in cfg.why_off["ddp"]
    assert "SHIMS_PATCHES" in cfg.why_off["detr"]


@pytest.mark.parametrize("value, mode", [("fix", "fix"), ("detect", "detect"), ("Detect ", "detect"), ("off", "off")])
def test_shims_mode(patches, value, mode):
    cfg = config.parse({"SHIMS_MODE": value}, patches)
    assert cfg.mode == mode
    if mode == "off":
        assert cfg.patches == () and all("SHIMS_MODE=off" in cfg.why_off[n] for n in REAL_PATCHES)
    else:
        assert cfg.patches == REAL_PATCHES


@pytest.mark.parametrize("value, strict", [("1", True), ("true", True), ("YES", True), ("on", True),
                                           ("0", False), ("false", False), ("no", False), ("", False)])
def test_shims_strict(patches, value, strict):
    assert config.parse({"SHIMS_STRICT": value}, patches).strict is strict


def test_shims_report_and_shims_log(patches):
    cfg = config.parse({"SHIMS_REPORT": "/tmp/receipt-{pid}.json", "SHIMS_LOG": "debug"}, patches)
    assert cfg.report == "/tmp/receipt-{pid}.json" and cfg.log == "DEBUG"
    assert config.parse({"SHIMS_REPORT": "  "}, patches).report is None


def test_per_patch_options(patches):
    cfg = config.parse({"SHIMS_DOCTR_FUNCTIONS": "train_epoch, fit_one_epoch", "SHIMS_DDP_FIND_UNUSED": "Static",
                        "SHIMS_DDP_SAFE_SITES": "mytrainer.engine:build_ddp", "SHIMS_DDP_OBSERVE": "7"}, patches)
    assert cfg.options["doctr"]["FUNCTIONS"] == ("train_epoch", "fit_one_epoch")
    assert cfg.options["ddp"]["FIND_UNUSED"] == "static"
    assert cfg.options["ddp"]["SAFE_SITES"] == ("mytrainer.engine:build_ddp",)
    assert cfg.options["ddp"]["OBSERVE"] == 7
    # the option changes what the patch targets
    doctr = next(p for p in patches if p.name == "doctr")
    assert "__main__:train_epoch" in {str(t) for t in doctr.resolve_targets(cfg.options["doctr"])}


def test_internal_variables_are_not_errors(patches):
    cfg = config.parse({"SHIMS__BOOT": "1", "SHIMS__PARENT_PID": "1"}, patches)
    assert cfg.patches == REAL_PATCHES


BAD = [
    # variable, value, words the message must contain (the valid choices)
    ("SHIMS_PATCHES", "doctor", ["all", "none", "doctr", "detr", "ddp", "colossalai", "did you mean 'doctr'"]),
    ("SHIMS_PATCHES", "doctr,nope", ["nope", "doctr", "colossalai"]),
    ("SHIMS_PATCHES", "", ["all", "none", "doctr"]),
    ("SHIMS_DISABLE", "colosalai", ["colossalai", "doctr"]),
    ("SHIMS_MODE", "bogus", ["fix", "detect", "off"]),
    ("SHIMS_MODE", "detec", ["did you mean 'detect'", "fix, detect, off"]),
    ("SHIMS_STRICT", "maybe", ["1", "0", "true", "false"]),
    ("SHIMS_LOG", "verbose", ["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]),
    ("SHIMS_DDP_FIND_UNUSED", "sometimes", ["auto", "keep", "off", "static"]),
    ("SHIMS_DDP_SAFE_SITES", "build_ddp", ["module:function"]),
    ("SHIMS_DDP_OBSERVE", "many", ["integer"]),
    ("SHIMS_DOCTR_FUNCTIONS", "fit-one-epoch", ["Python identifiers"]),
    ("SHIMS_DETR_DTYPE", "fp8", ["auto", "float16", "bfloat16", "float32"]),
    # misspelt variable names: the message names the variable, suggests the right one and lists the valid ones
    ("SHIMS_PATCH", "doctr", ["did you mean 'SHIMS_PATCHES'", "SHIMS_DISABLE", "SHIMS_MODE", "SHIMS_DOCTR_FUNCTIONS"]),
    ("SHIMS_DOCTR_FUNCTION", "fit_one_epoch", ["did you mean 'SHIMS_DOCTR_FUNCTIONS'", "SHIMS_PATCHES"]),
    ("SHIMS_DDP_FIND_UNUSED_PARAMETERS", "off", ["SHIMS_DDP_FIND_UNUSED", "SHIMS_PATCHES"]),
    ("SHIMS_STRIKT", "1", ["did you mean 'SHIMS_STRICT'"]),
]


@pytest.mark.parametrize("var, value, valid", BAD, ids=[f"{v}={x!r}" for v, x, _ in BAD])
def test_bad_values_and_names_are_errors_naming_variable_value_and_choices(patches, var, value, valid):
    with pytest.raises(shims.ShimsConfigError) as info:
        config.parse({var: value}, patches)
    message = str(info.value)
    assert var in message and repr(value) in message, message
    for word in valid:
        assert word in message, f"{word!r} missing from: {message}"
    assert isinstance(info.value, ValueError)  # ShimsConfigError is a ValueError


def test_enable_arguments_are_validated_like_the_environment():
    with pytest.raises(shims.ShimsConfigError, match="SHIMS_MODE='fixx'.*fix, detect, off"):
        shims.enable(mode="fixx")
    with pytest.raises(shims.ShimsConfigError, match="SHIMS_PATCHES"):
        shims.enable(patches=["doctr", "nope"])
    assert shims.status()["patches"] == {}
    assert "SHIMS__BOOT" not in os.environ


def test_config_is_frozen(patches):
    environ = {"SHIMS_PATCHES": "doctr"}
    cfg = config.parse(environ, patches)
    for key, value in (("mode", "off"), ("patches", ()), ("strict", True), ("new_attribute", 1)):
        with pytest.raises(AttributeError):
            setattr(cfg, key, value)
    environ["SHIMS_PATCHES"] = "none"  # the config does not follow later changes of its input
    assert cfg.patches == ("doctr",) and cfg.source == {"SHIMS_PATCHES": "doctr"}
    assert cfg == config.parse({"SHIMS_PATCHES": "doctr"}, patches)
    assert cfg != config.parse({"SHIMS_PATCHES": "ddp"}, patches)


BOGUS_MODE_SCRIPT = """
import json, os, sys
try:
    import shims.auto
except Exception as exc:
    import shims
    print(json.dumps({"patches": shims.status()["patches"], "boot": os.environ.get("SHIMS__BOOT")}))
    raise
print("imported")
"""


def test_import_shims_auto_with_a_bad_mode_fails_before_patching_anything():
    proc = run_python(["-c", BOGUS_MODE_SCRIPT], env=clean_env(SHIMS_MODE="bogus"), timeout=TIMEOUT, check=False)
    assert proc.returncode != 0
    assert "imported" not in proc.stdout
    assert re.search(r"ShimsConfigError: SHIMS_MODE='bogus'.*fix, detect, off", proc.stderr), proc.stderr
    state = json.loads(proc.stdout.strip().splitlines()[-1])
    assert state == {"patches": {}, "boot": None}  # no receipt entry, nothing exported to child processes


# ---------------------------------------------------------------- 2. import cost

def test_import_shims_auto_does_not_import_torch():
    proc = run_python(["-c", "import shims.auto, sys; print('torch' in sys.modules, 'shims' in sys.modules)"],
                      timeout=TIMEOUT)
    assert proc.stdout.split() == ["False", "True"]


LOADED_BY_AUTO = """
import json, sys, sysconfig
before = set(sys.modules)
import shims.auto
site = {sysconfig.get_paths()[k] for k in ("purelib", "platlib")}
files = {m: getattr(sys.modules[m], "__file__", None) or "" for m in set(sys.modules) - before}
print(json.dumps({"loaded": sorted(files), "installed": sorted(m for m, f in files.items()
                                                              if any(f.startswith(s) for s in site))}))
"""


def test_import_shims_auto_loads_only_shims_wrapt_and_the_standard_library():
    # what it costs in milliseconds is measured by benchmarks/import_cost.py (never timed in a test); here: what it
    # loads. Of the installed packages only shims' own modules and wrapt (the runtime dependency for import hooks)
    proc = run_python(["-c", LOADED_BY_AUTO], timeout=TIMEOUT)
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "shims.auto" in found["loaded"] and "wrapt" in found["loaded"]
    foreign = [m for m in found["installed"] if m.split(".")[0] not in ("shims", "wrapt")
               and not m.startswith(("__editable__", "_distutils_hack"))]
    assert foreign == [], f"import shims.auto loaded {foreign}"
    assert "torch" not in found["loaded"] and "numpy" not in found["loaded"]


# ---------------------------------------------------------------- 3-6. the engine, with a fake patch

TARGET_SOURCE = """
CALLS = []

def train(x):
    CALLS.append(x)
    return x * 2

def evaluate(x):
    return -x
"""


@pytest.fixture
def target(tmp_path, monkeypatch):
    """The name of a fresh, not yet imported module (defining train and evaluate) on sys.path."""
    name = f"shims_fake_target_{uuid.uuid4().hex[:8]}"
    write(tmp_path / f"{name}.py", TARGET_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    engine.reset()
    sys.modules.pop(name, None)


def counting_wrapper(original, ctx):
    """The fake patch's replacement: calls the original and counts each call in the receipt (one count per layer)."""
    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        ctx.count("calls")
        return original(*args, **kwargs)
    return wrapper


def fake_patch(module, *, name="fake", replace=counting_wrapper, targets=("train",), **kwargs):
    return Patch(name=name, summary=f"test patch {name}", replace=replace,
                 targets=tuple(t if isinstance(t, Target) else Target(module, t) for t in targets), **kwargs)


def enable(*patches, **environ):
    """Enable `patches` as the whole registry, with SHIMS_* variables `environ`; returns the receipt."""
    cfg = config.parse({k: str(v) for k, v in environ.items()}, patches)
    engine.get().enable(cfg, patches)
    return shims.status()


def target_status(name="fake", module=None, qualname="train"):
    record = shims.status()["patches"][name]
    return record["targets"][f"{module}:{qualname}"] if module else record


def calls_counted(name="fake"):
    return shims.status()["patches"][name]["counters"].get("calls", 0)


def test_enabled_before_import_applies_on_import(target):
    receipt = enable(fake_patch(target))
    assert receipt["patches"]["fake"]["targets"][f"{target}:train"]["status"] == "not-imported"
    assert target not in sys.modules
    module = importlib.import_module(target)
    assert hasattr(module.train, "__shims_original__")
    assert module.train.__wrapped__ is module.train.__shims_original__
    assert module.train(3) == 6 and module.CALLS == [3] and calls_counted() == 1
    assert target_status(module=target)["status"] == "applied"
    assert not hasattr(module.evaluate, "__shims_original__")  # only the declared target changes


def test_enabled_after_import_applies_at_once(target):
    module = importlib.import_module(target)
    original = module.train
    enable(fake_patch(target))
    assert module.train is not original
    assert module.train.__wrapped__ is original and module.train.__shims_original__ is original
    assert module.train(2) == 4 and calls_counted() == 1


def test_enabling_twice_and_importing_twice_wrap_exactly_once(target):
    patch = fake_patch(target)
    enable(patch)
    module = importlib.import_module(target)
    original = module.train.__shims_original__
    enable(patch)  # the same configuration again
    importlib.import_module(target)  # a second import
    import_statement = __import__(target)
    assert import_statement is module
    enable(patch, SHIMS_STRICT="1")  # a different configuration: reverted, then applied again
    assert module.train.__wrapped__ is original and module.train.__shims_original__ is original
    module.train(1)
    assert calls_counted() == 1, "one wrapper layer: one count per call"
    shims.disable()
    assert module.train is original


def test_reloading_the_target_wraps_the_new_function_exactly_once(target):
    enable(fake_patch(target))
    module = importlib.import_module(target)
    module = importlib.reload(module)
    assert hasattr(module.train, "__shims_original__"), "the reloaded function is patched"
    assert not hasattr(module.train.__shims_original__, "__shims_original__"), "not a wrapper of the old wrapper"
    module.train(1)
    assert calls_counted() == 1
    assert target_status(module=target)["status"] == "applied"


def test_disable_restores_the_original_object_and_enable_works_again(target):
    module = importlib.import_module(target)
    original = module.train
    patch = fake_patch(target)
    enable(patch)
    assert module.train is not original
    shims.disable()
    assert module.train is original
    assert target_status(module=target)["status"] == "reverted"
    module.train(1)
    assert calls_counted() == 0
    enable(patch)
    assert module.train is not original and module.train.__wrapped__ is original
    module.train(1)
    assert calls_counted() == 1
    shims.disable()
    assert module.train is original


def test_disable_before_import_stops_patching(target):
    enable(fake_patch(target))
    shims.disable()
    module = importlib.import_module(target)
    assert not hasattr(module.train, "__shims_original__")


def test_a_method_target_is_replaced_and_restored(target, tmp_path):
    name = target + "_cls"
    write(tmp_path / f"{name}.py", """
        class Trainer:
            def step(self):
                return "step"
            @staticmethod
            def tag():
                return "tag"
    """)
    try:
        module = importlib.import_module(name)
        original_step, original_tag = module.Trainer.__dict__["step"], module.Trainer.__dict__["tag"]
        enable(fake_patch(name, targets=("Trainer.step", "Trainer.tag")))
        assert module.Trainer.__dict__["step"].__wrapped__ is original_step
        assert module.Trainer().step() == "step" and calls_counted() == 1
        assert module.Trainer.__dict__["tag"].__shims_original__ is original_tag  # the staticmethod object itself
        shims.disable()
        assert module.Trainer.__dict__["step"] is original_step and module.Trainer.__dict__["tag"] is original_tag
        assert module.Trainer.tag() == "tag" and module.Trainer().step() == "step"
    finally:
        sys.modules.pop(name, None)


# ---------------------------------------------------------------- 4. never crash

def raising_replace(original, ctx):
    raise RuntimeError("boom in replace 42")


@pytest.mark.parametrize("when", ["enable-then-import", "import-then-enable"])
def test_a_failing_patch_leaves_the_target_as_it_was(target, when):
    if when == "import-then-enable":
        module = importlib.import_module(target)
        original = module.train
        enable(fake_patch(target, replace=raising_replace))
    else:
        enable(fake_patch(target, replace=raising_replace))
        module = importlib.import_module(target)  # the user's import never fails
        original = module.train
    assert not hasattr(original, "__shims_original__") and module.train(5) == 10
    status = target_status(module=target)
    assert status["status"] == "error" and "RuntimeError: boom in replace 42" in status["reason"]
    assert target_status()["status"] == "error" and "boom in replace 42" in target_status()["reason"]


@pytest.mark.parametrize("when", ["enable-then-import", "import-then-enable"])
def test_a_failing_patch_raises_in_strict_mode(target, when):
    patch = fake_patch(target, replace=raising_replace)
    if when == "import-then-enable":
        importlib.import_module(target)
        with pytest.raises(shims.ShimsPatchError, match="'fake'.*boom in replace 42"):
            enable(patch, SHIMS_STRICT="1")
    else:
        enable(patch, SHIMS_STRICT="1")
        with pytest.raises(shims.ShimsPatchError, match="'fake'.*boom in replace 42"):
            importlib.import_module(target)


def skipping_replace(original, ctx):
    raise Skip("the loop has an unexpected shape")


def test_skip_is_recorded_with_its_reason_and_other_patches_still_apply(target):
    module = importlib.import_module(target)
    original = module.train
    enable(fake_patch(target, replace=skipping_replace),
           fake_patch(target, name="other", targets=("evaluate",)))
    assert module.train is original
    status = target_status(module=target)
    assert status == {"status": "skipped", "reason": "the loop has an unexpected shape"}
    assert target_status("other")["status"] == "applied" and hasattr(module.evaluate, "__shims_original__")


def test_skip_raises_in_strict_mode_naming_the_patch(target):
    importlib.import_module(target)
    with pytest.raises(shims.ShimsPatchError, match=r"'fake'.*unexpected shape.*SHIMS_STRICT"):
        enable(fake_patch(target, replace=skipping_replace), SHIMS_STRICT="1")


def test_skip_as_fixed_upstream_never_raises_even_in_strict_mode(target):
    def already_fixed(original, ctx):
        raise Skip("upstream removed the bug", status="fixed-upstream")

    enable(fake_patch(target, replace=already_fixed), SHIMS_STRICT="1")
    module = importlib.import_module(target)
    assert not hasattr(module.train, "__shims_original__")
    assert target_status(module=target) == {"status": "fixed-upstream", "reason": "upstream removed the bug"}


# ---------------------------------------------------------------- 5. versions

PYTEST_VERSION = metadata.version("pytest")
MISSING_DIST = "shims-test-no-such-distribution"


@pytest.mark.parametrize("kwargs, status, reason_words", [
    ({"supported": f">={PYTEST_VERSION}"}, "applied", []),
    ({"supported": "<1"}, "skipped", ["pytest", PYTEST_VERSION, "<1"]),
    ({"supported": ">=1,<2"}, "skipped", ["pytest", ">=1,<2"]),
    ({"fixed_in": PYTEST_VERSION}, "fixed-upstream", ["pytest", PYTEST_VERSION]),
    ({"fixed_in": "1.0"}, "fixed-upstream", ["pytest", "1.0"]),
    ({"fixed_in": "9999"}, "applied", []),
], ids=["in-range", "below-range", "outside-range", "fixed-in-this-version", "fixed-earlier", "fixed-later"])
def test_version_range_and_fixed_in_of_the_patch_distribution(target, kwargs, status, reason_words):
    enable(fake_patch(target, distribution="pytest", **kwargs))
    module = importlib.import_module(target)
    record = target_status()
    assert record["status"] == status and record["version"] == PYTEST_VERSION
    assert hasattr(module.train, "__shims_original__") is (status == "applied")
    for word in reason_words:
        assert word in record["reason"], record["reason"]


def test_version_skip_raises_in_strict_mode_but_fixed_upstream_does_not(target):
    enable(fake_patch(target, distribution="pytest", fixed_in="1.0"), SHIMS_STRICT="1")
    importlib.import_module(target)
    assert target_status()["status"] == "fixed-upstream"
    engine.reset()
    sys.modules.pop(target, None)
    enable(fake_patch(target, distribution="pytest", supported="<1"), SHIMS_STRICT="1")
    with pytest.raises(shims.ShimsPatchError, match="'fake'.*supported range <1"):
        importlib.import_module(target)


def test_a_distribution_that_is_not_installed_does_not_block_the_patch(target):
    enable(fake_patch(target, distribution=MISSING_DIST, supported="<1"))
    module = importlib.import_module(target)
    assert target_status()["status"] == "applied" and hasattr(module.train, "__shims_original__")


def test_a_targets_distribution_overrides_the_patchs(target):
    # the patch's package (pytest) is fixed upstream; one target's package is another one, not installed
    patch = fake_patch(target, distribution="pytest", fixed_in="1.0",
                       targets=(Target(target, "train", distribution=MISSING_DIST), Target(target, "evaluate")))
    enable(patch)
    module = importlib.import_module(target)
    assert target_status(module=target, qualname="train")["status"] == "applied"
    assert hasattr(module.train, "__shims_original__")
    evaluate = target_status(module=target, qualname="evaluate")
    assert evaluate["status"] == "fixed-upstream" and "pytest" in evaluate["reason"]
    assert not hasattr(module.evaluate, "__shims_original__")


def test_a_targets_distribution_is_checked_when_the_patch_has_none(target):
    patch = fake_patch(target, fixed_in="1.0",
                       targets=(Target(target, "train", distribution="pytest"), Target(target, "evaluate")))
    enable(patch)
    module = importlib.import_module(target)
    train = target_status(module=target, qualname="train")
    assert train["status"] == "fixed-upstream" and "pytest" in train["reason"] and PYTEST_VERSION in train["reason"]
    assert not hasattr(module.train, "__shims_original__")
    assert target_status(module=target, qualname="evaluate")["status"] == "applied"  # user code: no version


def test_a_release_that_fixed_the_bug_and_moved_the_function_is_fixed_upstream_not_skipped(target):
    """The version verdict comes before the attribute lookup (rfdetr >= 1.6 has no engine.evaluate at all)."""
    enable(fake_patch(target, distribution="pytest", fixed_in="1.0", targets=("train", "removed_in_the_fix")))
    importlib.import_module(target)
    gone = target_status(module=target, qualname="removed_in_the_fix")
    assert gone["status"] == "fixed-upstream" and "pytest" in gone["reason"], gone


# ---------------------------------------------------------------- 6. the receipt

def test_status_has_the_documented_shape(target):
    enable(fake_patch(target), fake_patch(target, name="off", targets=("evaluate",)), SHIMS_DISABLE="off")
    importlib.import_module(target).train(1)
    receipt = shims.status()
    assert receipt["schema"] == 1 and receipt["mode"] == "fix" and receipt["strict"] is False
    assert receipt["pid"] == os.getpid()
    fake = receipt["patches"]["fake"]
    assert {"status", "reason", "targets", "counters"} <= set(fake)
    assert fake["status"] == "applied" and isinstance(fake["reason"], str)
    assert fake["targets"] == {f"{target}:train": {"status": "applied", "reason": ""}}
    assert fake["counters"] == {"calls": 1}
    off = receipt["patches"]["off"]
    assert off["status"] == "disabled" and "SHIMS_DISABLE" in off["reason"]
    json.dumps(receipt)  # JSON-serialisable as it is


def test_report_is_written_at_exit_and_names_why_a_patch_is_off(tmp_path):
    report = tmp_path / "out" / "receipt.json"
    proc = run_python(["-c", "import shims.auto; print('ran')"],
                      env=clean_env(SHIMS_REPORT=report, SHIMS_DISABLE="ddp"), timeout=TIMEOUT)
    assert proc.stdout.strip() == "ran"
    with open(report) as f:
        receipt = json.load(f)
    assert receipt["schema"] == 1 and receipt["mode"] == "fix" and receipt["pid"] > 0
    assert set(receipt["patches"]) == set(REAL_PATCHES)
    ddp = receipt["patches"]["ddp"]
    assert ddp["status"] == "disabled" and "SHIMS_DISABLE" in ddp["reason"]
    assert receipt["patches"]["doctr"]["status"] == "not-imported"
    assert all({"status", "reason", "targets", "counters"} <= set(r) for r in receipt["patches"].values())


# ---------------------------------------------------------------- 7. the command line

def shims_cli(*args, check=False, **env):
    return run_python(["-m", "shims", *args], env=clean_env(**env), timeout=TIMEOUT, check=check)


def test_cli_help():
    proc = shims_cli("--help")
    assert proc.returncode == 0
    for word in ("run", "doctor", "list", "SHIMS_PATCHES", "SHIMS_MODE"):
        assert word in proc.stdout, word


def list_blocks(text):
    """`python -m shims list` output: patch name -> its block of lines."""
    return {block.split(":", 1)[0]: block for block in text.strip().split("\n\n")}


def test_cli_list_shows_every_patch_with_installed_versions():
    proc = shims_cli("list", check=True)
    blocks = list_blocks(proc.stdout)
    assert set(REAL_PATCHES) <= set(blocks), proc.stdout
    for dist, patch in (("torch", "ddp"), ("colossalai", "colossalai"), ("rfdetr", "detr")):
        try:
            version = metadata.version(dist)
        except metadata.PackageNotFoundError:
            version = "not installed"
        assert f"{dist}" in blocks[patch] and f"installed: {version}" in blocks[patch], blocks[patch]
    assert "user code" in blocks["doctr"]
    assert "SHIMS_DOCTR_FUNCTIONS" in blocks["doctr"] and "SHIMS_DDP_FIND_UNUSED" in blocks["ddp"]
    # the environment's choices are shown
    blocks = list_blocks(shims_cli("list", check=True, SHIMS_DISABLE="ddp").stdout)
    assert "SHIMS_DISABLE" in blocks["ddp"] and "SHIMS_DISABLE" not in blocks["doctr"]


def test_cli_unknown_command_exits_2_naming_the_valid_ones():
    proc = shims_cli("bogus")
    assert proc.returncode == 2
    assert "bogus" in proc.stderr and all(word in proc.stderr for word in ("run", "doctor", "list"))


def test_cli_run_without_a_script_exits_2():
    proc = shims_cli("run")
    assert proc.returncode == 2 and "script" in proc.stderr.lower()


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


# ---------------------------------------------------------------- 8. child processes

SPAWN_SCRIPT = """
import json, multiprocessing, sys


def child(queue):
    loaded = sys.modules.get("shims")
    queue.put({"loaded": loaded is not None, "mode": loaded.status()["mode"] if loaded else None,
               "patches": sorted(loaded.status()["patches"]) if loaded else None})


if __name__ == "__main__":
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    process = ctx.Process(target=child, args=(queue,))
    process.start()
    result = queue.get(timeout=90)
    process.join(90)
    result["exitcode"] = process.exitcode
    print(json.dumps(result))
"""


def test_shims_run_reaches_a_multiprocessing_spawn_child(tmp_path):
    script = write(tmp_path / "spawner.py", SPAWN_SCRIPT)
    report = tmp_path / "r.json"
    proc = shims_cli("run", script, check=True, SHIMS_PATCHES="doctr", SHIMS_REPORT=report)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"loaded": True, "mode": "fix", "patches": sorted(REAL_PATCHES), "exitcode": 0}, proc.stderr
    with open(report) as f:
        assert json.load(f)["patches"]["doctr"]["status"] == "not-imported"  # the parent's receipt


def test_a_plain_spawn_child_without_shims_stays_clean(tmp_path):
    script = write(tmp_path / "spawner.py", SPAWN_SCRIPT)
    proc = run_python([script], env=clean_env(), timeout=TIMEOUT)
    assert json.loads(proc.stdout.strip().splitlines()[-1])["loaded"] is False


# a doctr-shaped loop with its dead forward, run on a stand-in model that counts its calls
DEAD_FORWARD_LOOP = """
def fit_one_epoch(model, loader):
    for x in loader:
        loss = model(x)
        loss = model(x)
    return loss
calls = []
fit_one_epoch(lambda x: calls.append(x) or x, STEPS)
"""

TORCHRUN_WORKER = """
import json, os, sys
""" + DEAD_FORWARD_LOOP.replace("STEPS", "[1, 2, 3, 4]") + """
import shims
with open(os.path.join(sys.argv[1], f"rank{os.environ['RANK']}.json"), "w") as f:
    json.dump({"forwards": len(calls), "doctr": shims.status()["patches"]["doctr"]["counters"]}, f)
"""


@pytest.mark.slow
def test_shims_run_torchrun_reaches_every_worker(tmp_path):
    """`python -m shims run $(which torchrun) ... train.py`: torchrun's workers run train.py as a file, patched."""
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    if not os.path.exists(torchrun):
        pytest.skip(f"no torchrun next to {sys.executable}")
    script = write(tmp_path / "train.py", TORCHRUN_WORKER)
    proc = shims_cli("run", torchrun, "--standalone", "--nproc_per_node", "2", script, str(tmp_path),
                     check=True, SHIMS_PATCHES="doctr", OMP_NUM_THREADS="1")
    for rank in (0, 1):
        with open(tmp_path / f"rank{rank}.json") as f:
            result = json.load(f)
        assert result == {"forwards": 4, "doctr": {"functions_rewritten": 1, "forwards_removed": 4}}, proc.stderr


@pytest.mark.parametrize("argv0", ["SCRIPT", "-c", "-m", "-", "", "no-such-file.py"])
def test_a_child_finds_its_script_from_sys_argv_where_there_is_no_sys_orig_argv(argv0, tmp_path, monkeypatch):
    """Python 3.9 has no sys.orig_argv (torchrun workers were left unpatched there); when sitecustomize runs,
    sys.argv[0] is already the script, or -c, -m, - or '' for the other ways of running Python."""
    from shims import runner
    script = write(tmp_path / "train.py", "pass")
    monkeypatch.delattr(sys, "orig_argv", raising=False)
    monkeypatch.setattr(sys, "argv", [script if argv0 == "SCRIPT" else argv0, "--nproc", "2"])
    assert runner._script_from_argv() == (script if argv0 == "SCRIPT" else None)


def test_disable_withdraws_the_bootstrap_from_child_processes():
    shims.enable(patches=["doctr"])
    assert os.environ.get("SHIMS__BOOT") == "1"
    assert engine.BOOTSTRAP_DIR in os.environ["PYTHONPATH"].split(os.pathsep)
    assert os.environ.get("SHIMS_PATCHES") == "doctr"
    shims.disable()
    assert "SHIMS__BOOT" not in os.environ
    assert engine.BOOTSTRAP_DIR not in os.environ.get("PYTHONPATH", "").split(os.pathsep)


def test_disable_gives_the_environment_back_and_enable_reads_the_users_environment(monkeypatch):
    """enable(...) exports its settings for child processes; disable() must not leave them to the next enable()."""
    for key in [k for k in os.environ if k.startswith("SHIMS_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("SHIMS_DISABLE", "ddp")
    engine.reset()
    try:
        shims.enable(patches=["doctr"], strict=True)
        assert os.environ["SHIMS_PATCHES"] == "doctr" and os.environ["SHIMS__BOOT"] == "1"
        shims.enable()  # the user's environment again (SHIMS_DISABLE=ddp), not what the first call exported
        assert engine.get().config.patches == ("doctr", "detr", "colossalai", "yolo") and not engine.get().config.strict
        shims.disable()
        assert {k: v for k, v in os.environ.items() if k.startswith("SHIMS_")} == {"SHIMS_DISABLE": "ddp"}
    finally:
        engine.reset()


# ---------------------------------------------------------------- reaching a script's functions without a tracer

WATCHED_SCRIPT = """
{first_line}
import sys
TRACED_DURING_MODULE_CODE = sys.gettrace() is not None
""" + DEAD_FORWARD_LOOP.replace("STEPS", "[1, 2, 3]") + """
import json, shims
print(json.dumps({{"traced": TRACED_DURING_MODULE_CODE, "tracer_after": sys.gettrace() is not None,
                  "forwards": len(calls), "counters": shims.status()["patches"]["doctr"]["counters"]}}))
raise SystemExit(0 if len(sys.argv) < 2 else int("the last line raises here"))
"""


def test_shims_run_reaches_the_script_without_a_tracer_and_keeps_line_numbers(tmp_path):
    """`python -m shims run` compiles the script with a call after the def: imports run with no trace hook."""
    script = write(tmp_path / "train.py", WATCHED_SCRIPT.format(first_line="pass"))
    out = run_python(["-m", "shims", "run", script], env=clean_env(SHIMS_PATCHES="doctr"))
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"traced": False, "tracer_after": False, "forwards": 3,
                      "counters": {"functions_rewritten": 1, "forwards_removed": 3}}
    failed = run_python(["-m", "shims", "run", script, "boom"], env=clean_env(SHIMS_PATCHES="doctr"), check=False)
    assert failed.returncode == 1
    with open(script) as f:
        last_line = len(f.read().splitlines())
    assert f'File "{script}", line {last_line}, in <module>' in failed.stderr, failed.stderr


def _other_pythons():
    """CPython 3.12+ interpreters on this machine (sys.monitoring), besides the one running the tests."""
    import glob
    import shutil
    found = {}
    for minor in range(12, 16):
        for candidate in sorted(glob.glob(os.path.expanduser(f"~/.pyenv/versions/3.{minor}.*/bin/python"))) + [
                shutil.which(f"python3.{minor}")]:
            if not candidate or f"3.{minor}" in found:
                continue
            try:  # a pyenv shim on PATH may exist without working
                probe = subprocess.run([candidate, "-c", "import sys; print(sys.version_info[:2])"],
                                       capture_output=True, text=True, timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                continue
            if probe.returncode == 0 and probe.stdout.strip() == f"(3, {minor})":
                found[f"3.{minor}"] = candidate
    return found


def copy_wrapt_for_another_python(root):
    """wrapt, shims' runtime dependency, beside a copied shims for another interpreter: its pure-Python code (the C
    extension is built for this Python; wrapt falls back to Python when it cannot load it)."""
    import shutil
    import wrapt
    shutil.copytree(os.path.dirname(wrapt.__file__), root / "wrapt", ignore=shutil.ignore_patterns("*.so", "*.pyd"))


@pytest.mark.parametrize("how", ["import-shims-auto", "booted-child"])
@pytest.mark.parametrize("minor", ["3.12", "3.13"])
def test_scripts_are_watched_with_sys_monitoring_on_python_312_and_later(minor, how, tmp_path):
    """From 3.12 only the script's own code object is watched, no global trace hook: for the first-line import, and
    for a child process that the interpreter runs as a file (a torchrun worker) booted by shims' sitecustomize."""
    python = _other_pythons().get(minor)
    if python is None:
        pytest.skip(f"no Python {minor} interpreter on this machine (looked on PATH and in ~/.pyenv)")
    import shutil
    root = tmp_path / "site"
    shutil.copytree(os.path.join(SOURCE, "shims"), root / "shims")  # shims and its patches, as installed,
    shutil.copytree(os.path.join(SOURCE, "patches"), root / "shims" / "patches")  # for that interpreter
    copy_wrapt_for_another_python(root)
    first_line = "import shims.auto" if how == "import-shims-auto" else "pass"
    script = write(tmp_path / "train.py", WATCHED_SCRIPT.format(first_line=first_line))
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(root), "SHIMS_PATCHES": "doctr",
           "PYTHONNOUSERSITE": "1"}
    if how == "booted-child":  # what config.export_for_children leaves for a child process
        env.update({"SHIMS__BOOT": "1", "SHIMS__PARENT_PID": "1",
                    "PYTHONPATH": os.pathsep.join([str(root / "shims" / "bootstrap"), str(root)])})
    proc = subprocess.run([python, script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"traced": False, "tracer_after": False, "forwards": 3,
                      "counters": {"functions_rewritten": 1, "forwards_removed": 3}}


def test_import_shims_auto_on_this_python_runs_the_script_with_no_tracer(tmp_path):
    """3.9-3.11: the rest of the script runs compiled (shims/takeover.py); 3.12+: sys.monitoring. Details and the
    fallbacks: tests/test_startup.py."""
    script = write(tmp_path / "train.py", WATCHED_SCRIPT.format(first_line="import shims.auto"))
    out = run_python([script], env=clean_env(SHIMS_PATCHES="doctr"))
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"traced": False, "tracer_after": False, "forwards": 3,
                      "counters": {"functions_rewritten": 1, "forwards_removed": 3}}


# ---------------------------------------------------------------- packaging

@pytest.mark.slow
def test_the_wheel_installs_patches_as_shims_patches_never_as_a_top_level_package(tmp_path):
    """`pip install .` gives `shims` with `shims.patches`; no top-level `patches` lands in site-packages."""
    import zipfile
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", SOURCE, "--no-deps", "--no-build-isolation",
                           "-w", str(tmp_path / "wheel"), "-q"], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env={**os.environ, "TMPDIR": str(tmp_path)})
    if proc.returncode != 0 and "No module named" in proc.stderr and "setuptools" in proc.stderr:
        pytest.skip("setuptools is not installed in this environment, so the wheel cannot be built offline")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = (tmp_path / "wheel").glob("shims-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"shims", wheel.name.split("-")[0] + "-" +
                                                wheel.name.split("-")[1] + ".dist-info"}
    for patch in ("doctr", "detr", "ddp", "colossalai", "yolo"):
        assert f"shims/patches/{patch}.py" in names
    assert "shims/bootstrap/sitecustomize.py" in names
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target",
                    str(target), str(wheel)], check=True, capture_output=True, timeout=300)
    check = subprocess.run(
        [sys.executable, "-S", "-c", "import sys; sys.path[:0] = [sys.argv[1]] + sys.argv[2:];"
         "import importlib.util, shims.auto, shims.patches.doctr;"
         "print(shims.auto.__file__.startswith(sys.argv[1]), importlib.util.find_spec('patches') is None,"
         " sorted(shims.status()['patches']))", str(target)] + [p for p in sys.path if "site-packages" in p],
        capture_output=True, text=True, timeout=60, cwd=tmp_path, env=clean_env(PYTHONPATH=""))
    assert check.returncode == 0, check.stderr
    assert check.stdout.split() == ["True", "True", "['colossalai',", "'ddp',", "'detr',", "'doctr',", "'yolo']"], check.stdout
