"""Started by Python in processes that a patched run starts (shims puts this folder on their PYTHONPATH).

Enables shims from the inherited SHIMS_* variables, then hands over to any other sitecustomize on the path, which this
file would otherwise hide. A failure here never stops the child: it is printed and the child goes on unpatched.
"""


def _start_shims():
    import os
    if os.environ.get("SHIMS__BOOT") != "1":
        return
    try:
        from shims import runner
        runner.boot_child()
    except Exception as exc:  # noqa: BLE001
        if os.environ.get("SHIMS_STRICT", "0").strip().lower() in ("1", "true", "yes", "on"):
            raise
        import sys
        sys.stderr.write(f"[shims] not started in child process {os.getpid()}: {type(exc).__name__}: {exc}\n")


def _chain_next_sitecustomize():
    import importlib.util
    import os
    import sys
    here = os.path.dirname(os.path.abspath(__file__))
    rest = [p for p in sys.path if os.path.abspath(p or ".") != here]
    for entry in rest:
        candidate = os.path.join(entry or ".", "sitecustomize.py")
        if os.path.isfile(candidate):
            spec = importlib.util.spec_from_file_location("_shims_chained_sitecustomize", candidate)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return


_start_shims()
_chain_next_sitecustomize()
