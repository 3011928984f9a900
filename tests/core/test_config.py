"""Configuration: the environment (and shims.enable's arguments) -> a frozen, validated Config; bad input is an
error naming what was wrong and what is valid."""

from __future__ import annotations

import json
import os
import re

import pytest

import shims
from shims import config
from tests.conftest import SOURCE, clean_env, run_python
from tests.core.conftest import REAL_PATCHES, TIMEOUT


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
    # ranges: a negative count of iterations is refused, not read as "off"
    ("SHIMS_DDP_OBSERVE", "-1", ["out of range", "a whole number >= 0"]),
    ("SHIMS_DDP_OBSERVE", "fifty", ["not an integer", "a whole number >= 0"]),
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
    # errors name the argument the bad value came from, not the variable it stands for
    with pytest.raises(shims.ShimsConfigError, match=r"shims.enable\(mode='fixx'\).*fix, detect, off"):
        shims.enable(mode="fixx")
    with pytest.raises(shims.ShimsConfigError, match=r"shims.enable\(patches=\['doctr', 'nope'\]\).*'nope'") as info:
        shims.enable(patches=["doctr", "nope"])
    assert "SHIMS_PATCHES" not in str(info.value)
    with pytest.raises(shims.ShimsConfigError, match=r"options=\{'SHIMS_DDP_OBSERVE': -1\}.*out of range.*>= 0"):
        shims.enable(options={"SHIMS_DDP_OBSERVE": -1})
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


def test_readme_table_of_variables_is_the_one_generated_from_config(patches):
    with open(os.path.join(SOURCE, "README.md")) as f:
        readme = f.read()
    table = config.environment_markdown(patches)
    assert table in readme, "README.md's table of variables differs from shims/config.py's; regenerate it:\n" + table
    assert readme.count("| variable | values | default | meaning |") == 1
