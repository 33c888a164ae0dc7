"""``python -m pcm_train.sft`` runs ``pcm_train.tools.sft`` (its docstring says what it does)."""
import sys

from pcm_train.tools.sft import main

if __name__ == "__main__":
    sys.exit(main())
