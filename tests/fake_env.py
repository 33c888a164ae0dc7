"""A deterministic stand-in for the LIBERO worker pool, for fast trainer tests.

An episode succeeds once its env has executed ``close_steps`` closing gripper
commands; observations are images and float32 [state_dim] states derived from
(task, initial state, step).
"""
import numpy as np

from pcm_train.envs.workers import ChunkResult


class FakePool:
    def __init__(self, cfg=None, *, image_size=32, close_steps=20, max_steps=512, state_dim=8, num_slots=None):
        if num_slots is not None:  # otherwise a batch of any size is in flight at once
            self.num_slots = num_slots
        self.image_size = image_size
        self.state_dim = state_dim
        self.close_steps = close_steps
        self.max_steps = max_steps
        self.episodes = []
        self.resets = 0
        self.refills = 0
        self.closed = False

    def _obs(self, e):
        task, init, steps, _ = self.episodes[e]
        rng = np.random.default_rng(task * 1000 + init * 10 + steps)
        image = rng.integers(0, 256, (self.image_size, self.image_size, 3), dtype=np.uint8)
        state = rng.standard_normal(self.state_dim).astype(np.float32)
        return {"image": image, "language": self.language(task), "state": state}

    def language(self, task_id):
        return f"put object {task_id} in the basket"

    def reset(self, episodes):
        assert len(episodes) <= getattr(self, "num_slots", len(episodes)), "more episodes than env slots"
        self.resets += 1
        self.episodes = [[t, s, 0, 0] for t, s in episodes]
        return [self._obs(e) for e in range(len(episodes))]

    def refill(self, positions, episodes):
        """Starts ``episodes`` at the first of ``positions``, in order."""
        assert len(episodes) <= len(positions) and len(set(positions)) == len(positions)
        self.refills += 1
        placed = list(positions)[:len(episodes)]
        for p, (t, s) in zip(placed, episodes):
            self.episodes[p] = [t, s, 0, 0]
        return placed, [self._obs(p) for p in placed]

    def step_chunk(self, actions, active):
        E = len(self.episodes)
        reward, steps = np.zeros(E, np.float32), np.zeros(E, np.int64)
        terminated, truncated = np.zeros(E, bool), np.zeros(E, bool)
        for e in np.flatnonzero(active):
            for action in actions[e]:
                self.episodes[e][2] += 1
                self.episodes[e][3] += int(action[-1] > 0)
                steps[e] += 1
                terminated[e] = self.episodes[e][3] >= self.close_steps
                if terminated[e] or self.episodes[e][2] >= self.max_steps:
                    break
            truncated[e] = not terminated[e] and self.episodes[e][2] >= self.max_steps
            reward[e] = float(terminated[e])
        return ChunkResult([self._obs(e) for e in range(E)], reward, terminated, truncated, steps)

    def close(self):
        self.closed = True


def fake_pool_factory(**kwargs):
    def make(cfg, image_size):
        return FakePool(cfg, image_size=image_size, max_steps=cfg.rollout.max_chunks * cfg.rollout.action_chunk,
                        **kwargs)
    return make
