"""What each gradient hook does under torch.autograd.grad, backward, retain_graph, and a leaf used twice.

    python benchmarks/hook_semantics.py

Prints a Markdown table (the one in docs/patches/colossalai.md and patches/colossalai/gradhooks.py). Every row is a
fresh leaf `w = [1., 2., 3.]` with three observers: a tensor hook (`w.register_hook`, what ColossalAI <= 0.3.6 LowLevelZero and
GeminiDDP use), a post-accumulate-grad hook (`w.register_post_accumulate_grad_hook`, PR #5596) and the shims deferral
(a tensor hook calling `gradhooks.defer_until_accumulated`). "sees" is the gradient each hook was handed.
"""

from __future__ import annotations

import torch

from shims.patches.colossalai import gradhooks


def fmt(t):
    return "None" if t is None else "[" + ", ".join(f"{v:g}" for v in t.tolist()) + "]"


def observe(run):
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0]))
    v = torch.nn.Parameter(torch.tensor([1.0, 1.0, 1.0]))
    tensor_seen, post_seen, deferred_seen = [], [], []
    w.register_hook(lambda g: tensor_seen.append(g.clone()))
    w.register_post_accumulate_grad_hook(lambda p: post_seen.append(p.grad.clone()))

    def deferring(grad):
        gradhooks.defer_until_accumulated(w, lambda p: deferred_seen.append(p.grad.clone()))

    w.register_hook(deferring)
    returned = run(w, v)
    return {"tensor": tensor_seen, "post": post_seen, "deferred": deferred_seen, "grad": w.grad, "returned": returned}


def autograd_grad(w, v):
    return torch.autograd.grad((2 * w).sum(), w)[0]


def backward(w, v):
    (2 * w).sum().backward()


def backward_twice_retain(w, v):
    y = (2 * w).sum()
    y.backward(retain_graph=True)
    y.backward()


def used_twice(w, v):
    (2 * w + 3 * w).sum().backward()


def grad_grad_then_backward(w, v):
    y = (2 * w).sum()
    first = torch.autograd.grad(y, w, retain_graph=True)[0]
    torch.autograd.grad(y, w, retain_graph=True)
    y.backward()
    return first


def backward_other_inputs(w, v):
    (w * v).sum().backward(inputs=[v])


def backward_onto_existing_grad(w, v):
    w.grad = torch.ones(3)
    (2 * w).sum().backward()


ROWS = [
    ("torch.autograd.grad(y, w)", autograd_grad),
    ("y.backward()", backward),
    ("y.backward(retain_graph=True) twice", backward_twice_retain),
    ("w used twice in one graph, backward()", used_twice),
    ("autograd.grad twice, then backward (VQGAN)", grad_grad_then_backward),
    ("backward(inputs=[v]), w not in inputs", backward_other_inputs),
    ("backward() with w.grad = 1 already", backward_onto_existing_grad),
]


def cell(seen):
    return f"{len(seen)}" + (f": {', '.join(fmt(s) for s in seen)}" if seen else "")


def main():
    print(f"torch {torch.__version__}; w = [1, 2, 3], y = (2 * w).sum() unless said otherwise\n")
    print("| call | tensor hook: calls: sees | post-accumulate-grad hook: calls: sees .grad | shims deferral: "
          "calls: sees .grad | w.grad after | autograd.grad returned |")
    print("|---|---|---|---|---|---|")
    for label, run in ROWS:
        r = observe(run)
        print(f"| {label} | {cell(r['tensor'])} | {cell(r['post'])} | {cell(r['deferred'])} | {fmt(r['grad'])} | "
              f"{fmt(r['returned']) if r['returned'] is not None else '-'} |")


if __name__ == "__main__":
    main()
