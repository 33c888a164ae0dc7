"""The training machinery: the loop, rollouts, checkpoints, metrics, run directories, torchrun."""
