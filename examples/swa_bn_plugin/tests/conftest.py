import os
import sys

pytest_plugins = ["shims.testing"]  # the fixtures shims_engine, shims_fidelity, shims_orderings

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)  # swa_reference, imported by name as a user's module would be
