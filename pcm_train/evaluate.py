"""``python -m pcm_train.evaluate`` runs ``pcm_train.tools.evaluate`` (its docstring says what it does)."""
import sys

from pcm_train.tools.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
