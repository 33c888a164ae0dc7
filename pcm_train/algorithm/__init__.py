"""The PCM algorithm: phase-scored chunk selection, GRPO loss, the mini-batched actor update, batch shrinking."""
