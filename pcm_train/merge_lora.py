"""``python -m pcm_train.merge_lora`` runs ``pcm_train.tools.merge_lora`` (its docstring says what it does)."""
import sys

from pcm_train.tools.merge_lora import main

if __name__ == "__main__":
    sys.exit(main())
