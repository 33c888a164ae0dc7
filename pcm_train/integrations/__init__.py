"""Drop-ins for other trainers (SimpleVLA-RL / verl)."""
