"""Patches from other packages (`shims.patches` entry points): found from metadata alone, imported when their trigger
module is, then treated as built-ins; a broken or clashing plug-in is reported, never fatal unless strict.

Each test lays out, in a temporary folder, a tiny framework (`tinyfw`) and a distribution that declares a plug-in
for it: a `*.dist-info` folder with METADATA and entry_points.txt, what pip writes. Every check runs in a fresh
interpreter with that folder on PYTHONPATH. (tests/core/test_plugin_example.py installs the real example with pip.)
"""

from __future__ import annotations

import json
import os
import textwrap

import pytest

from shims.testing import check_orderings
from tests.conftest import REPO, clean_env, run_python, write

FRAMEWORK = '''
def step(x):
    return x + 1
'''

PLUGIN = '''
from shims.patch import Option, Patch, Skip, Target, wrap

def doubled(original, ctx):
    def around(wrapped, instance, args, kwargs):
        ctx.count("calls")
        return 2 * wrapped(*args, **kwargs)
    return wrap(original, around)

def fingerprint(original):
    if original.__code__.co_argcount != 1:
        raise Skip("step does not take one argument")

PATCH = Patch(name="tinyfix", summary="doubles tinyfw.train.step", targets=(Target("tinyfw.train", "step"),),
              replace=doubled, fingerprint=fingerprint, distribution="tinyfw", supported="<2",
              options=(Option("LEVEL", "int", default=1, help="unused"),))
'''


def lay_out(root, *, name="tinyfix", value="tinyfix_plugin:PATCH", trigger="tinyfw", plugin=PLUGIN,
            dist="tinyfix-plugin", extra_entry_points=""):
    """tinyfw (a framework, version 1.0) and a distribution declaring the plug-in, in `root`."""
    write(root / "tinyfw" / "__init__.py", "from tinyfw import train\n")
    write(root / "tinyfw" / "train.py", FRAMEWORK)
    write(root / "tinyfw-1.0.dist-info" / "METADATA", "Metadata-Version: 2.1\nName: tinyfw\nVersion: 1.0\n")
    write(root / "tinyfix_plugin.py", plugin)
    triggers = f"[shims.patch_triggers]\n{name} = {trigger}\n" if trigger else ""
    write(root / f"{dist.replace('-', '_')}-0.3.dist-info" / "METADATA",
          f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.3\n")
    write(root / f"{dist.replace('-', '_')}-0.3.dist-info" / "entry_points.txt",
          f"[shims.patches]\n{name} = {value}\n{extra_entry_points}\n{triggers}")
    return root


def run(root, code, **env):
    proc = run_python(["-c", textwrap.dedent(code)], env=clean_env(PYTHONPATH=os.pathsep.join([str(root), REPO]),
                                                                 **env), cwd=str(root), check=False)
    return proc


def last_json(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


SCRIPT = '''
import json, sys
import shims.auto
loaded_at_start = "tinyfix_plugin" in sys.modules
import tinyfw
import shims
print(json.dumps({"loaded_at_start": loaded_at_start, "loaded": "tinyfix_plugin" in sys.modules,
                  "result": tinyfw.train.step(3), "receipt": shims.status()["patches"].get("tinyfix")}))
'''


def test_found_from_metadata_imported_with_its_trigger_and_applied(tmp_path):
    seen = last_json(run(lay_out(tmp_path), SCRIPT))
    assert seen["loaded_at_start"] is False and seen["loaded"] is True
    assert seen["result"] == 8  # (3 + 1) * 2: the plug-in's replacement ran
    receipt = seen["receipt"]
    assert receipt["status"] == "applied" and receipt["counters"] == {"calls": 1}
    assert receipt["targets"] == {"tinyfw.train:step": {"status": "applied", "reason": ""}}
    assert receipt["origin"] == "plug-in tinyfix-plugin 0.3 (shims.patches: tinyfix = tinyfix_plugin:PATCH)"
    assert receipt["summary"] == "doubles tinyfw.train.step" and receipt["version"] == "1.0"


def test_disabled_plug_ins_are_never_imported(tmp_path):
    root = lay_out(tmp_path)
    for env in ({"SHIMS_DISABLE": "tinyfix"}, {"SHIMS_PATCHES": "doctr"}, {"SHIMS_MODE": "off"}):
        seen = last_json(run(root, SCRIPT, **env))
        assert seen["loaded"] is False and seen["result"] == 4, env
        assert seen["receipt"]["status"] == "disabled", env
    seen = last_json(run(root, SCRIPT, SHIMS_PATCHES="tinyfix"))
    assert seen["result"] == 8 and seen["receipt"]["status"] == "applied"


def test_ranges_apply_as_for_built_ins(tmp_path):
    root = lay_out(tmp_path)
    write(root / "tinyfw-1.0.dist-info" / "METADATA", "Metadata-Version: 2.1\nName: tinyfw\nVersion: 2.5\n")
    seen = last_json(run(root, SCRIPT))
    assert seen["result"] == 4
    assert seen["receipt"]["status"] == "skipped"
    assert "tinyfw 2.5 is outside the supported range <2" in seen["receipt"]["reason"]


def test_options_are_read_when_the_plug_in_loads(tmp_path):
    root = lay_out(tmp_path)
    assert last_json(run(root, SCRIPT, SHIMS_TINYFIX_LEVEL="3"))["receipt"]["status"] == "applied"
    bad = last_json(run(root, SCRIPT, SHIMS_TINYFIX_LEVL="3"))
    assert bad["result"] == 4
    reason = bad["receipt"]["targets"]["tinyfix_plugin:PATCH"]["reason"]
    assert "unknown variable SHIMS_TINYFIX_LEVL='3'" in reason and "SHIMS_TINYFIX_LEVEL" in reason
    assert "is not an integer" in last_json(run(root, SCRIPT, SHIMS_TINYFIX_LEVEL="high"))["receipt"]["reason"]


def test_a_plug_in_that_fails_to_load_is_reported_not_fatal_unless_strict(tmp_path):
    root = lay_out(tmp_path, plugin="raise ImportError('needs tinyfw-extras')\n")
    seen = last_json(run(root, SCRIPT))
    assert seen["result"] == 4
    target = seen["receipt"]["targets"]["tinyfix_plugin:PATCH"]
    assert target == {"status": "error", "reason": "plug-in failed to load: ImportError: needs tinyfw-extras"}
    strict = run(root, SCRIPT, SHIMS_STRICT="1")
    assert strict.returncode != 0
    assert "ShimsPatchError: shims plug-in 'tinyfix' (plug-in tinyfix-plugin 0.3" in strict.stderr
    assert "needs tinyfw-extras" in strict.stderr


def test_an_entry_point_that_is_not_a_patch_or_misnamed_is_reported(tmp_path):
    root = lay_out(tmp_path, value="tinyfix_plugin:doubled")
    reason = last_json(run(root, SCRIPT))["receipt"]["targets"]["tinyfix_plugin:doubled"]["reason"]
    assert "gives a function, not a shims.patch.Patch" in reason
    root = lay_out(tmp_path / "misnamed", name="tiny_fix")
    proc = run(root, SCRIPT.replace('get("tinyfix")', 'get("tiny_fix")'))
    assert "entry point 'tiny_fix' gives the patch named 'tinyfix'" in last_json(proc)["receipt"]["reason"]


def test_a_name_taken_by_a_built_in_is_refused(tmp_path):
    root = lay_out(tmp_path, name="doctr", dist="evil-doctr")
    code = '''
        import json, shims
        receipt = shims.enable()["patches"]
        print(json.dumps({k: v for k, v in receipt.items() if k.startswith("doctr")}))
    '''
    seen = last_json(run(root, code))
    assert seen["doctr"]["origin"] == "shims" and seen["doctr"]["status"] != "error"
    refused = seen["doctr (evil-doctr)"]
    assert refused["status"] == "error"
    assert refused["reason"].startswith("evil-doctr:shims.patches:doctr: refused: evil-doctr declares the patch name "
                                        "'doctr', which is a patch built into shims")
    strict = run(root, code, SHIMS_STRICT="1")
    assert strict.returncode != 0 and "which is a patch built into shims" in strict.stderr


def test_two_plug_ins_with_one_name_keep_the_first(tmp_path):
    root = lay_out(tmp_path / "first")
    later = tmp_path / "later"  # after `first` on sys.path: as for imports, the first one found wins
    write(later / "other_tinyfix-0.1.dist-info" / "METADATA", "Metadata-Version: 2.1\nName: other-tinyfix\n"
          "Version: 0.1\n")
    write(later / "other_tinyfix-0.1.dist-info" / "entry_points.txt", "[shims.patches]\ntinyfix = nowhere:PATCH\n")
    code = 'import json, shims; print(json.dumps(shims.enable()["patches"]["tinyfix (other-tinyfix)"]))'
    proc = run_python(["-c", code], env=clean_env(PYTHONPATH=os.pathsep.join([str(root), str(later), REPO])),
                      cwd=str(root))
    assert "already taken by plug-in tinyfix-plugin 0.3" in last_json(proc)["reason"]


def test_list_shows_where_each_patch_comes_from(tmp_path):
    root = lay_out(tmp_path)
    proc = run_python(["-m", "shims", "list"], env=clean_env(PYTHONPATH=os.pathsep.join([str(root), REPO])),
                      cwd=str(root))
    assert "doctr: " in proc.stdout and "  from: shims\n" in proc.stdout
    block = proc.stdout[proc.stdout.index("tinyfix: doubles tinyfw.train.step"):]
    assert "  from: plug-in tinyfix-plugin 0.3 (shims.patches: tinyfix = tinyfix_plugin:PATCH)" in block
    assert "tinyfw.train:step" in block and "SHIMS_TINYFIX_LEVEL=1" in block
    broken = lay_out(tmp_path / "broken", plugin="raise ImportError('needs tinyfw-extras')\n")
    proc = run_python(["-m", "shims", "list"], env=clean_env(PYTHONPATH=os.pathsep.join([str(broken), REPO])),
                      cwd=str(broken))
    assert "tinyfix: BROKEN: plug-in failed to load (plug-in tinyfix-plugin 0.3" in proc.stdout
    assert "tinyfix: doubles" not in proc.stdout


def test_without_a_trigger_the_plug_in_loads_when_shims_starts(tmp_path):
    seen = last_json(run(lay_out(tmp_path, trigger=None), SCRIPT))
    assert seen["loaded_at_start"] is True and seen["result"] == 8


def test_orderings_check_runs_on_a_plug_in_and_catches_an_irreversible_patch(tmp_path):
    root = lay_out(tmp_path)
    result = check_orderings("tinyfix", ["tinyfw.train"], path=[root, REPO], cwd=str(root))
    assert result.targets() == ["tinyfw.train:step"]
    # a common mistake: changing the original in place (here its code), which shims.disable() cannot undo
    in_place = PLUGIN.replace("    return wrap(original, around)",
                              "    original.__code__ = (lambda x: 2 * (x + 1)).__code__\n"
                              "    return original")
    root = lay_out(tmp_path / "in_place", plugin=in_place)
    with pytest.raises(AssertionError, match="'patched': False"):
        check_orderings("tinyfix", ["tinyfw.train"], path=[root, REPO], cwd=str(root))
