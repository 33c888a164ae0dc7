"""``python -m pcm_train.estimator_variance`` runs ``pcm_train.tools.estimator_variance`` (its docstring says what it does)."""
import sys

from pcm_train.tools.estimator_variance import main

if __name__ == "__main__":
    sys.exit(main())
