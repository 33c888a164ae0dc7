"""``python -m pcm_train.report`` runs ``pcm_train.tools.report`` (its docstring says what it does)."""
import sys

from pcm_train.tools.report import main

if __name__ == "__main__":
    sys.exit(main())
