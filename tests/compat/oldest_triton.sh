#!/usr/bin/env bash
# The kernel tests on the oldest Triton the project supports (3.6, what the lent GPU machines run),
# under the interpreter, in a separate venv (.venv-compat). Triton 3.6's interpreter converts
# 1-element arrays with int(), which NumPy >= 2.3 refuses: the venv pins numpy < 2.3.
set -euo pipefail
cd "$(dirname "$0")/../.."
python3 -m venv .venv-compat
.venv-compat/bin/pip install -q -c constraints.txt torch==2.13.0 triton==3.6.0 "numpy<2.3" tqdm pytest scipy
.venv-compat/bin/pip install -q --no-deps -e .
.venv-compat/bin/python -c "import torch, triton; print(f'oldest pins: torch {torch.__version__}, triton {triton.__version__}')"
.venv-compat/bin/python -m pytest -q -m "not slow" -p no:cacheprovider \
    tests/test_phases.py tests/test_phases_dtypes.py tests/test_packing.py tests/test_packing_offsets.py \
    tests/test_sampling.py
