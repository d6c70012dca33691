"""Settings for the whole test run, notebooks included (nbval starts their kernels from this process)."""

import os

# Training notebooks read this switch and run a small version of themselves, so that CI stays short.
# Their stored outputs come from full runs (tools/run_notebooks.py, which leaves it unset).
os.environ.setdefault("NANOVLM_QUICK", "1")
