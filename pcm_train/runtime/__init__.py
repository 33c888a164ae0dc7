"""What the algorithm and the training loop both use, below both: torchrun process groups and
collectives, memory measurement, atomic file writes. Imports nothing else of pcm_train."""
