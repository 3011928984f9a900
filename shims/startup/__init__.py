"""Start-up: how shims starts in a process and reaches the script it runs in.

    _boot       what `import shims.auto`, `python -m shims run` and child processes share: parse the environment,
                enable the engine, reach the script
    takeover    Python 3.9-3.11, a first-line `import shims.auto`: run the rest of the script compiled, no tracer
    mainwatch   reach a target the script defines right after its `def`: the compiled hooks, or a watch of the
                script's module code (sys.monitoring on 3.12+, a trace function on 3.9-3.11 as the fallback)
    bootstrap/  the sitecustomize that starts shims in child processes (put on their PYTHONPATH)

docs/startup.md says what each costs, and what a script can still see of it.
"""
