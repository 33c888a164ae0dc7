"""``python -m pcm_train.gradient_signal`` runs ``pcm_train.tools.gradient_signal`` (its docstring says what it does)."""
import sys

from pcm_train.tools.gradient_signal import main

if __name__ == "__main__":
    sys.exit(main())
