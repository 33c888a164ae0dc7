"""``python -m pcm_train.compare_update`` runs ``pcm_train.tools.compare_update`` (its docstring says what it does)."""
import sys

from pcm_train.tools.compare_update import main

if __name__ == "__main__":
    sys.exit(main())
