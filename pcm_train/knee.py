"""``python -m pcm_train.knee`` runs ``pcm_train.tools.knee`` (its docstring says what it does)."""
import sys

from pcm_train.tools.knee import main

if __name__ == "__main__":
    sys.exit(main())
