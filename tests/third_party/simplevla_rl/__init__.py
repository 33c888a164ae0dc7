"""Files from PRIME-RL/SimpleVLA-RL (commit 7c51662), importable as ``simplevla_rl`` instead of their ``verl``.

See README.md in this folder for what was copied and the import lines that were rewired.
"""
