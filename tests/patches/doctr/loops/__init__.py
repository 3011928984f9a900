"""Reference training loops following the structure of doctr's recognition scripts (written here, not copied).

buggy_single / buggy_ddp: the loop as upstream had it from PR #604 to b73d998765 (the stray forward before zero_grad).
fixed_single / fixed_ddp: the loop as upstream fixed it in PR #1862 (commit 183cf65a52): the stray forward removed.
Each module defines `fit_one_epoch` with the upstream signature; `amp` uses CUDA autocast when CUDA is present and
the CPU autocast path (bfloat16) otherwise, the closest CPU equivalent of upstream's torch.cuda.amp.
"""
