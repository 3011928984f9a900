"""doctr patch: the patched buggy loop is the upstream-fixed loop, bitwise, with one forward per step.

Reference loops (loops/) follow the structure of doctr's recognition scripts before and after PR #1862.
Models: timm (BatchNorm + dropout, so a second forward changes running statistics and RNG draws) and a real doctr
recognition model (vitstr_small, pretrained=False). All on CPU; amp uses the CPU autocast path (bfloat16).
"""

from __future__ import annotations

import importlib
import json
import os
import sys

import pytest
import torch
from torch import nn

import shims
from shims.testing import assert_same, check_fidelity
from tests.conftest import REPO, clean_env, run_python, write

LOOPS = "tests.patches.doctr.loops"
HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLES = os.path.join(REPO, "examples")


def enable_doctr(modules, **extra):
    options = {"SHIMS_DOCTR_MODULES": ",".join(modules)}
    options.update(extra)
    return shims.enable(patches=["doctr"], options=options)


def load_loop(name):
    return importlib.import_module(f"{LOOPS}.{name}")


class ClassifierLoss(nn.Module):
    """A timm classifier behind the doctr call convention: model(images, targets)["loss"]."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, images, targets):
        return {"loss": nn.functional.cross_entropy(self.net(images), targets)}


def timm_model():
    import timm
    return ClassifierLoss(timm.create_model("resnet10t", pretrained=False, num_classes=5, drop_rate=0.3))


def timm_data(steps=3, batch=4):
    g = torch.Generator().manual_seed(1)
    return [(torch.rand(batch, 3, 32, 32, generator=g), torch.randint(0, 5, (batch,), generator=g))
            for _ in range(steps)]


def doctr_model():
    os.environ.setdefault("USE_TORCH", "1")
    recognition = pytest.importorskip("doctr.models.recognition", reason="python-doctr is not installed")
    return recognition.vitstr_small(pretrained=False, vocab="abcdefghij")


def doctr_data(steps=2, batch=2):
    g = torch.Generator().manual_seed(2)
    words = ["abc", "jihg", "dead", "faced", "bag", "ace"]
    return [(torch.rand(batch, 3, 32, 128, generator=g), [words[(i * batch + j) % len(words)] for j in range(batch)])
            for i in range(steps)]


MODELS = {"timm-resnet10t": (timm_model, timm_data), "doctr-vitstr_small": (doctr_model, doctr_data)}


def train(loop, model_name, *, amp=False, ddp_signature=False, seed=0):
    """Run one epoch of `loop.fit_one_epoch`; returns (state_dict, epoch loss, forwards, steps, log calls)."""
    make_model, make_data = MODELS[model_name]
    torch.manual_seed(seed)
    model = make_model()
    data = make_data()
    forwards = []
    model.register_forward_pre_hook(lambda m, i: forwards.append(1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, 1e-3, total_steps=len(data))
    logged = []
    transforms = lambda x: (x - 0.5) / 0.25  # noqa: E731
    torch.manual_seed(seed + 1)  # the RNG stream the loop itself draws from (dropout)
    if ddp_signature:
        loss, _ = loop.fit_one_epoch(model, torch.device("cpu"), data, transforms, optimizer, scheduler, amp=amp)
    else:
        loss, _ = loop.fit_one_epoch(model, data, transforms, optimizer, scheduler, amp=amp,
                                     log=lambda **kw: logged.append(kw))
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return state, loss, len(forwards), len(data), logged


def one_epoch(loop_name, model_name, amp, ddp_signature):
    """The loop as a shims.testing variant: what one epoch produced (weights and buffers, loss, forwards, log)."""
    def run():
        state, loss, forwards, steps, logged = train(load_loop(loop_name), model_name, amp=amp,
                                                     ddp_signature=ddp_signature)
        return {"state": state, "loss": loss, "forwards": forwards, "steps": steps, "log": logged}
    return run


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "amp"])
@pytest.mark.parametrize("variant", ["single", "ddp"])
def test_patched_loop_is_the_fixed_loop_bitwise(model_name, amp, variant):
    buggy, fixed, ddp_signature = f"buggy_{variant}", f"fixed_{variant}", variant == "ddp"
    # unpatched, patched and upstream-fixed from the same seed and batches; patched == fixed bitwise: weights,
    # buffers, epoch loss, forwards per step, and what the unconditional log callback saw
    result = check_fidelity(one_epoch(buggy, model_name, amp, ddp_signature),
                            one_epoch(fixed, model_name, amp, ddp_signature),
                            patch="doctr", options={"SHIMS_DOCTR_MODULES": f"{LOOPS}.{buggy}"})
    steps = result.fixed["steps"]
    assert result.fixed["forwards"] == steps and result.unpatched["forwards"] == 2 * steps  # the bug, as upstream
    assert result.patched["forwards"] == steps, "exactly one forward per optimizer step"
    record = result.record("doctr")
    assert record["targets"][f"{LOOPS}.{buggy}:fit_one_epoch"]["status"] == "applied"
    assert record["counters"] == {"functions_rewritten": 1, "forwards_removed": steps}
    if model_name.startswith("timm"):
        # with BatchNorm and dropout the stray forward changes the result: the unpatched run differs
        with pytest.raises(AssertionError, match="differ"):
            assert_same(result.fixed["state"], result.unpatched["state"])


def test_fixed_loop_is_left_alone_and_said_to_be_fixed():
    module = load_loop("fixed_single")  # imported first: the receipt is read right after enabling
    receipt = enable_doctr([f"{LOOPS}.fixed_single"], SHIMS_STRICT="1")
    target = receipt["patches"]["doctr"]["targets"][f"{LOOPS}.fixed_single:fit_one_epoch"]
    assert target["status"] == "fixed-upstream"
    assert "no dead forward" in target["reason"]
    assert not hasattr(module.fit_one_epoch, "__shims_original__")


def test_disable_restores_the_original_function_object():
    module = load_loop("buggy_single")
    original = module.fit_one_epoch
    enable_doctr([f"{LOOPS}.buggy_single"])
    assert module.fit_one_epoch is not original and module.fit_one_epoch.__wrapped__ is original
    enable_doctr([f"{LOOPS}.buggy_single"])  # idempotent: the same configuration again wraps nothing twice
    assert module.fit_one_epoch.__wrapped__ is original
    shims.disable()
    assert module.fit_one_epoch is original


def test_tracebacks_keep_the_users_line_numbers(tmp_path, monkeypatch):
    path = write(tmp_path / "loopmod.py", '''
        def fit_one_epoch(model, loader, optimizer):
            for x in loader:
                out = model(x)
                optimizer.zero_grad()
                out = model(x)
                raise RuntimeError("boom")
    ''')
    monkeypatch.syspath_prepend(str(tmp_path))
    enable_doctr(["loopmod"])
    import loopmod
    assert loopmod.fit_one_epoch.__shims_original__ is not None
    with pytest.raises(RuntimeError) as info:
        loopmod.fit_one_epoch(lambda x: x, [1], type("O", (), {"zero_grad": lambda self: None})())
    frame = info.traceback[-1]
    assert frame.path == type(frame.path)(path) and frame.lineno + 1 == 6  # pytest's lineno is 0-based


NEGATIVE = {
    "first forward is logged": '''
        def fit_one_epoch(model, loader, optimizer, log):
            for x, y in loader:
                loss = model(x, y)["loss"]
                log(loss)
                optimizer.zero_grad()
                loss = model(x, y)["loss"]
                loss.backward()
    ''',
    "first forward is returned on one path": '''
        def fit_one_epoch(model, loader, optimizer, amp=False):
            for x, y in loader:
                loss = model(x, y)["loss"]
                if amp:
                    return loss
                loss = model(x, y)["loss"]
                loss.backward()
    ''',
    "one branch keeps the first value": '''
        def fit_one_epoch(model, loader, optimizer, amp=False):
            for x, y in loader:
                loss = model(x, y)["loss"]
                optimizer.zero_grad()
                if amp:
                    loss = model(x, y)["loss"]
                loss.backward()
    ''',
    "the forward's arguments have effects": '''
        def fit_one_epoch(model, loader, optimizer, augment):
            for x, y in loader:
                loss = model(augment(x), y)["loss"]
                optimizer.zero_grad()
                loss = model(x, y)["loss"]
                loss.backward()
    ''',
    "inside try": '''
        def fit_one_epoch(model, loader, optimizer):
            for x, y in loader:
                try:
                    loss = model(x, y)["loss"]
                    optimizer.zero_grad()
                    loss = model(x, y)["loss"]
                except ValueError:
                    print(loss)
                loss.backward()
    ''',
    "continue before the reassignment": '''
        def fit_one_epoch(model, loader, optimizer):
            for x, y in loader:
                loss = model(x, y)["loss"]
                if x is None:
                    continue
                loss = model(x, y)["loss"]
                loss.backward()
    ''',
    "a different shape (forward of a global, not of a parameter)": '''
        MODEL = None
        def fit_one_epoch(loader, optimizer):
            for x, y in loader:
                loss = MODEL(x, y)["loss"]
                optimizer.zero_grad()
                loss = MODEL(x, y)["loss"]
                loss.backward()
    ''',
    "decorated": '''
        import functools
        @functools.lru_cache(None)
        def fit_one_epoch(model, loader, optimizer):
            for x, y in loader:
                loss = model(x, y)["loss"]
                loss = model(x, y)["loss"]
                loss.backward()
    ''',
}


@pytest.mark.parametrize("case", list(NEGATIVE))
def test_functions_whose_first_forward_may_be_used_are_not_changed(case, tmp_path, monkeypatch):
    name = "negative_" + "".join(c if c.isalnum() else "_" for c in case)
    write(tmp_path / f"{name}.py", NEGATIVE[case])
    monkeypatch.syspath_prepend(str(tmp_path))
    receipt = enable_doctr([name])
    module = importlib.import_module(name)
    assert not hasattr(module.fit_one_epoch, "__shims_original__"), case
    target = shims.status()["patches"]["doctr"]["targets"][f"{name}:fit_one_epoch"]
    assert target["status"] in ("skipped", "fixed-upstream") and target["reason"], target
    del receipt


def test_strict_mode_raises_for_a_function_it_cannot_handle(tmp_path, monkeypatch):
    write(tmp_path / "strictmod.py", NEGATIVE["continue before the reassignment"])
    monkeypatch.syspath_prepend(str(tmp_path))
    enable_doctr(["strictmod"], SHIMS_STRICT="1")
    with pytest.raises(shims.ShimsPatchError, match="continue|reassigned"):
        importlib.import_module("strictmod")


# ---------------------------------------------------------------- the four ways in, end to end, in subprocesses

def read_json(path):
    with open(path) as f:
        return json.load(f)


def run_example(tmp_path, script_args, *, via_cli=False, extra_env=None, timeout=180):
    out = tmp_path / "result.json"
    env = clean_env(SHIMS_REPORT=tmp_path / "receipt.json", **(extra_env or {}))
    args = (["-m", "shims", "run"] if via_cli else []) + script_args + ["--out", str(out)]
    run_python(args, env=env, cwd=str(tmp_path), timeout=timeout)
    return read_json(out), read_json(tmp_path / "receipt.json")


def hand_fixed(tmp_path, *extra):
    result, _ = run_example(tmp_path, [os.path.join(EXAMPLES, "doctr_train.py"), "--hand-fixed", *extra])
    return result


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "amp"])
def test_way1_import_shims_auto_first_line_of_the_script(tmp_path, amp):
    source = open(os.path.join(EXAMPLES, "doctr_train.py")).read()
    script = write(tmp_path / "train_pytorch.py", "import shims.auto\n" + source)
    extra = ["--amp"] if amp else []
    env = {"PYTHONPATH": os.pathsep.join([REPO, EXAMPLES])}
    result, receipt = run_example(tmp_path, [script, *extra], extra_env=env)
    reference = hand_fixed(tmp_path, *extra)
    assert result["forwards_per_step"] == 1.0 and reference["forwards_per_step"] == 1.0
    assert result["weights"] == reference["weights"] and result["losses"] == reference["losses"]
    doctr = receipt["patches"]["doctr"]
    assert doctr["targets"]["__main__:fit_one_epoch"]["status"] == "applied"
    assert doctr["counters"] == {"functions_rewritten": 1, "forwards_removed": 4}


def test_way2_python_m_shims_run(tmp_path):
    result, receipt = run_example(tmp_path, [os.path.join(EXAMPLES, "doctr_train.py")], via_cli=True)
    unpatched, _ = run_example(tmp_path, [os.path.join(EXAMPLES, "doctr_train.py")])
    reference = hand_fixed(tmp_path)
    assert unpatched["forwards_per_step"] == 2.0
    assert result["forwards_per_step"] == 1.0
    assert result["weights"] == reference["weights"] != unpatched["weights"]
    assert receipt["patches"]["doctr"]["targets"]["__main__:fit_one_epoch"]["status"] == "applied"


@pytest.mark.parametrize("how", ["shims-run", "import-shims-auto"])
def test_way3_ddp_spawn_children_import_the_script_as_mp_main(tmp_path, how):
    script = os.path.join(EXAMPLES, "doctr_train_ddp.py")
    if how == "import-shims-auto":
        script = write(tmp_path / "train_pytorch_ddp.py", "import shims.auto\n" + open(script).read())
    args = (["-m", "shims", "run"] if how == "shims-run" else []) + [script, "--backend", "gloo", "--out-dir",
                                                                       str(tmp_path)]
    env = clean_env(SHIMS_REPORT=tmp_path / "receipt-{pid}.json", PYTHONPATH=os.pathsep.join([REPO, EXAMPLES]))
    run_python(args, env=env, cwd=str(tmp_path), timeout=240)
    ranks = [read_json(tmp_path / f"rank{r}.json") for r in (0, 1)]
    for rank in ranks:
        assert rank["name"] == "__mp_main__" and rank["forwards_per_step"] == 1.0
        receipt = read_json(tmp_path / f"receipt-{rank['pid']}.json")
        doctr = receipt["patches"]["doctr"]
        assert doctr["targets"]["__mp_main__:fit_one_epoch"]["status"] == "applied"
        assert doctr["counters"]["forwards_removed"] == 3


def test_way4_importable_module_named_by_SHIMS_DOCTR_MODULES(tmp_path):
    write(tmp_path / "mytrainer" / "__init__.py", "")
    write(tmp_path / "mytrainer" / "loops.py", open(os.path.join(HERE, "loops", "buggy_single.py")).read())
    runner = write(tmp_path / "run.py", '''
        import shims.auto
        import json, sys, torch
        from mytrainer.loops import fit_one_epoch
        sys.path.insert(0, sys.argv[1])
        from test_doctr import train
        import mytrainer.loops as loops
        state, loss, forwards, steps, _ = train(loops, "timm-resnet10t")
        print(json.dumps({"forwards": forwards, "steps": steps, "rewritten": hasattr(fit_one_epoch, "__wrapped__")}))
    ''')
    env = clean_env(SHIMS_DOCTR_MODULES="mytrainer.loops", PYTHONPATH=os.pathsep.join([REPO, str(tmp_path)]))
    proc = run_python([runner, HERE], env=env, cwd=str(tmp_path))
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"forwards": result["steps"], "steps": 3, "rewritten": True}
