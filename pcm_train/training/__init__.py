"""The training machinery: the loop, rollouts, checkpoints, metrics, run directories (torchrun and memory
measurement live in ``pcm_train.runtime``, below the algorithm)."""
