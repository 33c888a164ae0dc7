"""``python -m pcm_train.study`` runs ``pcm_train.tools.study`` (its docstring says what it does)."""
import sys

from pcm_train.tools.study import main

if __name__ == "__main__":
    sys.exit(main())
