"""``python -m pcm_train.demos`` runs ``pcm_train.tools.demos`` (its docstring says what it does)."""
import sys

from pcm_train.tools.demos import main

if __name__ == "__main__":
    sys.exit(main())
