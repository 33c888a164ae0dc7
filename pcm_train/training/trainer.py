"""The training loop: rollout -> GRPO advantage -> PCM selection -> actor update -> validation -> log -> checkpoint."""
from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pcm_train.training import checkpoint as ckpt
from pcm_train.training import run_dir
from pcm_train.algorithm.actor import make_optimizer, update_actor
from pcm_train.config import PCMTrainConfig, config_to_dict, save_config
from pcm_train.algorithm.controller import PCMController
from pcm_train.runtime.distributed import (DistInfo, any_rank, broadcast_batch, broadcast_object, gather_batch,
                                           gather_object, rank_share)
from pcm_train.algorithm.grpo import grpo_advantages, token_mask
from pcm_train.training.metrics_log import MetricsLog
from pcm_train.training.overlap import Background, RolloutCopy
from pcm_train.runtime.files import write_atomically
from pcm_train.policies.factory import build_policy, check_policy_path
from pcm_train.training.evaluation import (PlannedEpisode, parse_decoders, plan_episodes, rate_metrics, resolve_set,
                                          run_episodes)
from pcm_train.training.rollout import Episode, RolloutStats, StopRequested, collect_rollouts, episode_seed
from pcm_train.integrations.simplevla import pcm_shrink_batch
from pcm_train.algorithm.diagnostics import selection_diagnostics

NUM_INIT_STATES = 50  # every LIBERO task ships 50 fixed initial states


def draw_prompts(rng: np.random.Generator, tasks: list[int], count: int, val_init_states: int) -> list[tuple[int, int]]:
    """``count`` (task, initial state) training prompts: tasks uniformly from ``tasks``, states from the
    first ``NUM_INIT_STATES - val_init_states`` (the rest are held out for validation)."""
    chosen = rng.choice(tasks, size=count)
    states = rng.integers(0, NUM_INIT_STATES - val_init_states, size=count)
    return [(int(t), int(s)) for t, s in zip(chosen, states)]


def make_env_pool(cfg: PCMTrainConfig, image_size: int):
    """Ray env workers for the run: one per core by default (under torchrun, the node's cores split between
    its ranks: each rank rolls out with its own), with env slots for a step or a validation, at most
    ``env.max_slots`` of them per rank (a bigger batch then refills slots as episodes end).

    ``policy.observation=image`` needs ``env.camera=true`` (rendered images); ``state`` needs
    ``env.camera=false`` (camera-less envs with the privileged state). Raises ValueError otherwise."""
    import math
    import os

    from pcm_train.envs.workers import EnvWorkerPool

    state_mode = cfg.policy.observation == "state"
    if cfg.env.camera == state_mode:
        raise ValueError(f"policy.observation={cfg.policy.observation} needs env.camera={str(not state_mode).lower()} "
                         "(state mode runs camera-less envs, image mode renders; see docs/state_mode.md)")
    # under torchrun every rank rolls out with its own workers: the cores of a node are split between its ranks
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    workers = cfg.env.num_workers or max(1, (os.cpu_count() or 1) // local_ranks)
    t = cfg.trainer
    validation = t.val_episodes * len(t.val_sets) if t.val_episodes else cfg.env.max_slots  # per decoder
    slots = min(max(cfg.rollout.prompts_per_step * cfg.rollout.group_size, validation), cfg.env.max_slots)
    workers = min(workers, slots)
    main = int(os.environ.get("RANK", "0")) == 0  # rank 0 records its Ray processes in the run directory
    return EnvWorkerPool(workers, cfg.env.suite, camera=cfg.env.camera, image_size=image_size,
                         privileged_state=state_mode,
                         envs_per_worker=math.ceil(slots / workers), ray_address=cfg.env.ray_address,
                         step_timeout_s=cfg.env.step_timeout_s,
                         owner_dir=(cfg.resume or cfg.trainer.output_dir) if main else None,
                         dashboard=cfg.env.ray_dashboard,
                         max_steps=cfg.rollout.max_chunks * cfg.rollout.action_chunk,
                         num_steps_wait=cfg.rollout.num_steps_wait)


def rollout_threads(cfg: PCMTrainConfig, pool, device: torch.device) -> int | None:
    """torch threads of the policy while it rolls out: ``env.policy_threads``, or (0) on the CPU the cores this
    rank's env workers leave free, at least 1 (a policy thread sharing a core with a busy env worker stalls
    both); None on a GPU (torch's setting is left alone)."""
    if cfg.env.policy_threads:
        return cfg.env.policy_threads
    if device.type != "cpu":
        return None
    cores = (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, cores - len(getattr(pool, "workers", [])))


def _sync(device: torch.device) -> None:
    """Waits for the work this thread queued on ``device`` (its current stream only: a rollout in the
    background, ``trainer.overlap``, runs on a stream of its own and is not waited for)."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def resolve_device(name: str, dist_info: DistInfo = DistInfo()) -> torch.device:
    """``auto`` picks CUDA when present; under torchrun each rank takes its local GPU."""
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"trainer.device={name} but this machine has no CUDA device; use trainer.device=cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and dist_info.enabled:
        return torch.device("cuda", dist_info.local_rank)
    return torch.device(name)


@dataclass
class _Ahead:
    """A training batch rolled out in the background (``trainer.overlap``)."""

    future: Future  # -> ((batch, RolloutStats), wall-clock seconds)
    episode_rng: dict  # the episode RNG's state before the batch's episodes were drawn (a resume draws again)


class Trainer:
    """Owns the policy, optimizer, controller, RNGs and env pool of one run directory."""

    def __init__(self, cfg: PCMTrainConfig, pool_factory, dist_info: DistInfo | None = None):
        """Checks everything (device, tasks, policy path, the run directory or the checkpoint to
        resume and its metrics log) before the run directory is touched, then builds the policy,
        optimizer, controller and env pool; only when all of that succeeded is the directory
        written (``config.json`` last)."""
        self.cfg = cfg
        self.dist = dist_info or DistInfo()
        if not cfg.resume and cfg.trainer.output_dir is None:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            cfg.trainer.output_dir = broadcast_object(f"runs/{stamp}-{cfg.pcm.strategy}", self.dist)
        self.run_dir = Path(cfg.resume or cfg.trainer.output_dir)
        self.device = resolve_device(cfg.trainer.device, self.dist)
        self.tasks = self._task_ids()
        self.val_plan()  # a validation that cannot be built fails here, before anything is written
        if cfg.trainer.overlap and self.dist.enabled:
            raise ValueError(f"trainer.overlap=true runs in a single process, got {self.dist.world_size} ranks "
                             "under torchrun: set trainer.overlap=false")
        if cfg.trainer.diagnostics_every and self.dist.enabled:
            raise ValueError(f"trainer.diagnostics_every runs in a single process, got {self.dist.world_size} ranks "
                             "under torchrun: set trainer.diagnostics_every=0")
        if cfg.rollout.prompts_per_step * cfg.rollout.group_size < self.dist.world_size:
            raise ValueError(f"rollout.prompts_per_step x rollout.group_size ({cfg.rollout.prompts_per_step} x "
                             f"{cfg.rollout.group_size}) must be at least the {self.dist.world_size} ranks: every "
                             "rank rolls out a share of the step's episodes")
        check_policy_path(cfg.policy)
        resume_from, state = None, None
        if cfg.resume:
            resume_from = ckpt.latest_checkpoint(self.run_dir)
            state = ckpt.load_trainer_state(resume_from)
            if self.dist.is_main:
                missing = run_dir.check_metrics_log(self.run_dir, state["step"], cfg.trainer.allow_partial_log)
                if missing:
                    tqdm.write(f"warning: {self.run_dir / 'metrics.jsonl'} lacks {len(missing)} of the steps "
                               f"before the checkpoint (trainer.allow_partial_log=true)", file=sys.stderr)
        elif self.dist.is_main:
            from pcm_train.envs.workers import OWNER_FILE

            run_dir.check_fresh(self.run_dir, cfg.trainer.overwrite, ignore=(OWNER_FILE,))  # a dead run's Ray record
        if cfg.trainer.num_threads:
            torch.set_num_threads(cfg.trainer.num_threads)
        torch.manual_seed(cfg.trainer.seed)
        self._base_staging = None
        self.pool = None
        self._background = None
        try:
            self.policy = self._build_policy(resume_from)
            if self.dist.enabled:  # every rank starts from rank 0's weights
                for tensor in self.policy.state_dict().values():
                    torch.distributed.broadcast(tensor, src=0)
            self.optimizer = make_optimizer(self.policy, cfg.actor)
            self.controller = PCMController(cfg.pcm, seed=cfg.trainer.seed)
            self.episode_rng = np.random.default_rng(cfg.trainer.seed)
            self.shuffle_generator = torch.Generator().manual_seed(cfg.trainer.seed + 2)  # same on every rank
            self.step = 0
            self.wall_time_s = 0.0
            # overlap: the rollout copy holds the weights the next batch is rolled out with, _copy_lag updates
            # behind the live policy; _ahead is that batch once it is under way
            self.rollout_copy = RolloutCopy(self.policy) if cfg.trainer.overlap else None
            self._copy_lag = 0
            self._ahead: _Ahead | None = None
            if state is not None:
                self._load(state, resume_from)
            self.pool = pool_factory(cfg, image_size=self.policy.config.image_size)  # every rank rolls out
            if cfg.trainer.overlap:
                self._background = Background(self.device)
        except BaseException:
            if self.pool is not None:
                self.pool.close()
            if self._base_staging is not None:
                shutil.rmtree(self._base_staging, ignore_errors=True)
            raise
        self.metrics = self._open_run_dir() if self.dist.is_main else None
        self._stop = False

    # ----- setup -----

    def _open_run_dir(self) -> MetricsLog:
        """Setup succeeded: write the run directory (replace it on request, move the starting weights
        in, clean staging leftovers, align the metrics log and TensorBoard with the checkpoint, save
        ``config.json``)."""
        if not self.cfg.resume and self.cfg.trainer.overwrite:
            from pcm_train.envs.workers import OWNER_FILE

            run_dir.replace_contents(self.run_dir, keep=(OWNER_FILE,))  # the live pool's record of its Ray processes
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self._base_staging is not None:
            os.replace(self._base_staging, self.run_dir / "base_policy")
            self._base_staging = None
        for path in run_dir.clean_staging(self.run_dir):
            tqdm.write(f"removed {path} (left by an interrupted checkpoint write)", file=sys.stderr)
        t = self.cfg.trainer
        metrics = MetricsLog(self.run_dir, loggers=t.loggers, purge_step=self.step, config=config_to_dict(self.cfg),
                             wandb_project=t.wandb_project, wandb_mode=t.wandb_mode)
        metrics.truncate_after(self.step - 1)
        write_atomically(self.run_dir / "config.json", json.dumps(config_to_dict(self.cfg), indent=2))
        save_config(self.cfg, self.run_dir / "config.yaml")  # --config RUN/config.yaml repeats the run
        return metrics

    def _build_policy(self, resume_from):
        cfg, base = self.cfg.policy, self.run_dir / "base_policy"
        gc = self.cfg.actor.gradient_checkpointing
        if resume_from is None:
            from pcm_train.envs.families import state_dim

            policy = build_policy(type(cfg)(**{**vars(cfg), "lora_r": 0}), device=self.device,
                                  gradient_checkpointing=gc, state_dim=state_dim(self.cfg.env.suite))
            if cfg.path is None and self.dist.is_main:  # adapters and resumes need these starting weights
                self.run_dir.parent.mkdir(parents=True, exist_ok=True)
                self._base_staging = Path(tempfile.mkdtemp(dir=self.run_dir.parent,
                                                           prefix=f".{self.run_dir.name}.base_policy."))
                policy.save_pretrained(str(self._base_staging))
            if cfg.lora_r > 0:
                policy.add_lora(cfg.lora_r, cfg.lora_alpha)
            return policy
        saved = resume_from / "policy"
        try:
            if (saved / "adapter_config.json").is_file():
                base_cfg = type(cfg)(**{**vars(cfg), "path": cfg.path or str(base)})
                return build_policy(base_cfg, device=self.device, gradient_checkpointing=gc, adapters=saved)
            full_cfg = type(cfg)(**{**vars(cfg), "path": str(saved), "lora_r": 0})
            return build_policy(full_cfg, device=self.device, gradient_checkpointing=gc)
        except Exception as error:  # loaders raise many types for damaged files; the cause stays chained
            raise ckpt.CheckpointError(f"resume: cannot load the policy of checkpoint {saved} "
                                       f"({type(error).__name__}: {error})") from error

    def _task_ids(self) -> list[int]:
        from pcm_train.envs.families import list_tasks

        available = [t.task_id for t in list_tasks(self.cfg.env.suite)]
        chosen = self.cfg.env.task_ids or available
        unknown = sorted(set(chosen) - set(available))
        if unknown:
            raise ValueError(f"env.task_ids {unknown} not in {self.cfg.env.suite} (tasks {available})")
        return list(chosen)

    def _trainer_state(self) -> dict:
        """Everything but the weights a resume needs, as tensors and plain data (``torch.load(weights_only=True)``
        reads it back: the RNG states are tensors, dicts of ints and lists, ``random.getstate()``'s tuple).

        With ``trainer.overlap`` also the rollout copy's own tensors (the weights from before the last update,
        which roll out the next batch), and the episode RNG as it was before the next batch was drawn: a
        resume rolls that batch out again, the same."""
        state = {"step": self.step, "wall_time_s": self.wall_time_s, "optimizer": self.optimizer.state_dict(),
                 "controller": self.controller.state_dict(), "episode_rng": self.episode_rng.bit_generator.state,
                 "shuffle_generator": self.shuffle_generator.get_state(), "rng": ckpt.rng_states(),
                 "config": config_to_dict(self.cfg)}
        if self.rollout_copy is not None:
            state["rollout_policy"] = self.rollout_copy.state_dict()
            if self._ahead is not None:
                state["episode_rng"] = self._ahead.episode_rng
        return state

    def _load(self, state: dict, path: Path) -> None:
        try:
            self._restore_state(state)
        except (KeyError, ValueError, RuntimeError, TypeError) as error:
            raise ckpt.CheckpointError(f"resume: {path / 'trainer_state.pt'} does not fit this run "
                                       f"({type(error).__name__}: {error})") from error

    def _restore_state(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.controller.load_state_dict(state["controller"])
        self.episode_rng.bit_generator.state = state["episode_rng"]
        self.shuffle_generator.set_state(state["shuffle_generator"])
        ckpt.set_rng_states(state["rng"])
        self.step = state["step"] + 1
        self.wall_time_s = state["wall_time_s"]
        if self.rollout_copy is not None and "rollout_policy" in state:  # saved by an overlapped run
            self.rollout_copy.load_state_dict(state["rollout_policy"])
            self._copy_lag = 1

    # ----- episodes -----

    def train_episodes(self, step: int | None = None) -> list[Episode]:
        """prompts_per_step (task, initial state) pairs from the training states, G rollouts each, for ``step``
        (default: the current one); episode i of the step draws its actions from its own stream,
        ``episode_seed(trainer.seed, step, i)``."""
        r = self.cfg.rollout
        step = self.step if step is None else step
        drawn = draw_prompts(self.episode_rng, self.tasks, r.prompts_per_step, self.cfg.env.val_init_states)
        prompts = [(t, s, f"step{step}-prompt{i}") for i, (t, s) in enumerate(drawn) for _ in range(r.group_size)]
        return [Episode(*prompt, seed=episode_seed(self.cfg.trainer.seed, step, index))
                for index, prompt in enumerate(prompts)]

    def val_plan(self) -> list[PlannedEpisode]:
        """The validation episodes: ``trainer.val_episodes`` per decoder (``trainer.val_decoders``) and prompt
        set (``trainer.val_sets``), the same at every validation (``evaluation.plan_episodes``). ValueError
        naming the key for an unknown decoder or set, one the suite lacks, or repeating greedy episodes."""
        t, env = self.cfg.trainer, self.cfg.env
        decoders = parse_decoders(t.val_decoders, "trainer.val_decoders")
        sets = [resolve_set(name, env.suite, self.tasks, env.val_init_states, f"trainer.val_sets[{index}]")
                for index, name in enumerate(t.val_sets)]
        return plan_episodes(decoders, sets, self.tasks, t.val_episodes, t.seed, "trainer.val_episodes")

    def validate(self, trained_steps: int) -> tuple[dict, float]:
        """Rank 0: rolls the validation out with the live policy and appends its episodes to
        ``validation.jsonl`` (``step`` = trained_steps - 1); returns (``val/<set>/<decoder>/success_rate``
        metrics, seconds)."""
        started = time.perf_counter()
        records = run_episodes(self.policy, self.pool, self.val_plan(), max_chunks=self.cfg.rollout.max_chunks,
                               desc=f"validation after {trained_steps} steps",
                               gripper_signal=self.cfg.pcm.gripper_signal, pipeline=self.cfg.env.pipeline_groups,
                               policy_threads=rollout_threads(self.cfg, self.pool, self.device))
        self.metrics.write_validation([{"step": trained_steps - 1, "trained_steps": trained_steps, **record}
                                       for record in records])
        return rate_metrics(records), time.perf_counter() - started

    # ----- one step -----

    def _roll_out(self, step: int, episodes: list[Episode], policy, should_stop):
        """This rank's share of step ``step``'s ``episodes`` (all of them in a single process) rolled out by
        ``policy``: (batch, RolloutStats); StopRequested once ``should_stop()``."""
        share = [episodes[i] for i in rank_share(len(episodes), self.dist)]
        desc = f"step {step} rollout" + (f" (rank {self.dist.rank})" if self.dist.enabled else "")
        stats = RolloutStats()
        batch = collect_rollouts(policy, self.pool, share, max_chunks=self.cfg.rollout.max_chunks,
                                 temperature=self.cfg.actor.temperature, desc=desc, should_stop=should_stop,
                                 gripper_signal=self.cfg.pcm.gripper_signal, stats=stats,
                                 pipeline=self.cfg.env.pipeline_groups,
                                 policy_threads=rollout_threads(self.cfg, self.pool, self.device))
        return batch, stats

    def collect(self) -> dict | None:
        """Rollouts, GRPO advantages, PCM selection. Every rank rolls out its share of the step's episodes
        (all of them in a single process); rank 0 gathers the batch, computes advantages and the selection
        once and returns what the update needs (None on the other ranks). A stop on any rank stops all."""
        started = time.perf_counter()
        episodes = self.train_episodes()  # the same list on every rank (same episode_rng)
        rollout = None
        try:
            rollout = self._roll_out(self.step, episodes, self.policy, should_stop=lambda: self._stop)
        except StopRequested:
            pass
        if any_rank(rollout is None, self.dist):
            raise StopRequested
        payload = self.select(rollout, time.perf_counter() - started)
        return None if payload is None else {**payload, "started": started}

    def select(self, rollout, rollout_time_s: float, policy_lag: int = 0) -> dict | None:
        """Rank 0 (the others return None, after sending their share): the gathered batch's GRPO advantages
        and PCM selection. ``rollout``: this rank's (batch, RolloutStats), rolled out in ``rollout_time_s``
        (the gather is added) by weights ``policy_lag`` updates behind the live policy."""
        partial, rollout_stats = rollout
        gather_started = time.perf_counter()
        batch = gather_batch(partial, self.dist, self.device)
        every_stats = gather_object(rollout_stats, self.dist)
        if not self.dist.is_main:
            return None
        cfg = self.cfg
        rollout_stats = RolloutStats.combine(every_stats)
        rollout_time = rollout_time_s + time.perf_counter() - gather_started
        L, D = cfg.rollout.action_chunk, cfg.rollout.action_dim
        mask = token_mask(batch.batch["finish_step"], cfg.rollout.max_chunks, L, D)
        advantages = grpo_advantages(batch.batch["complete"], batch.non_tensor_batch["uid"], mask)
        batch.batch["advantages"] = advantages
        select_started = time.perf_counter()
        kept, selection = pcm_shrink_batch(batch, self.controller,
                                           action_token_start=self.policy.config.action_token_start,
                                           action_chunk=L, action_dim=D)
        _sync(self.device)
        select_time = time.perf_counter() - select_started
        row = {"step": self.step, "success_rate": float(batch.batch["complete"].float().mean()),
               "rollout_time_s": rollout_time, "select_time_s": select_time, "rollout/policy_lag": policy_lag,
               "episode_steps_mean": float(batch.batch["finish_step"].float().mean()),
               **rollout_stats.metrics(), **_advantage_stats(advantages, mask), **selection.metrics}
        every = cfg.trainer.diagnostics_every
        if every and self.step % every == 0:
            diag_started = time.perf_counter()
            row.update(selection_diagnostics(self.policy, batch, kept, selection, cfg.actor,
                                             action_chunk=L, action_dim=D))
            row["diag/time_s"] = time.perf_counter() - diag_started
        return {"kept": kept, "row": row}

    def learn(self, payload: dict) -> dict:
        """Every rank: the actor update on its share of the kept chunks; the step's metrics row."""
        kept = payload["kept"]
        actor = self.cfg.actor
        stats, loss_metrics, _ = update_actor(
            self.policy, self.optimizer, kept, actor, self.dist,
            mini_batch_trajectories=actor.ppo_mini_batch * self.cfg.rollout.group_size,
            generator=self.shuffle_generator)
        return {**payload["row"], "update_time_s": stats.update_time_s, "forward_time_s": stats.forward_time_s,
                "backward_time_s": stats.backward_time_s, "chunks_kept": stats.chunks, "tokens": stats.tokens,
                "activation_bytes": stats.activation_bytes, "peak_memory_bytes": stats.peak_memory_bytes,
                **loss_metrics}

    def validation_due(self, step: int) -> bool:
        """Whether step ``step`` ends with a validation (every ``trainer.val_every`` steps and the last)."""
        every = self.cfg.trainer.val_every
        return bool(every) and ((step + 1) % every == 0 or step + 1 == self.cfg.trainer.total_steps)

    def finish(self, row: dict, started: float) -> dict:
        """Rank 0: validation when due, then the step's timing split. The update is done, so a stop does not
        cut the validation short: the step is saved whole (a step dropped now would leave its update in the
        weights)."""
        if self.validation_due(self.step):
            rates, row["val_time_s"] = self.validate(self.step + 1)
            row.update(rates)
        row["step_time_s"] = time.perf_counter() - started
        # the share of the step spent waiting for rollouts: the whole rollout, or with overlap what was not hidden
        row["rollout_share"] = row.get("overlap/wait_s", row["rollout_time_s"]) / row["step_time_s"]
        row["update_share"] = row["update_time_s"] / row["step_time_s"]
        return row

    def train_step(self) -> dict:
        """One whole step in a single process."""
        payload = self.collect()
        return self.finish(self.learn(payload), payload["started"])

    # ----- one step with the next step's rollout in the background (trainer.overlap) -----

    def overlapped_step(self) -> dict:
        """One step in a single process with ``trainer.overlap``: this step's batch was rolled out in the
        background during the previous step (the first step of a process rolls it out now) by the rollout
        copy, which holds the weights from before that step's update; the copy then takes the live weights
        and rolls the next step's batch out while this batch is selected and trained on; validation (the
        live weights, the same env pool) comes once that rollout is back."""
        started = time.perf_counter()
        exposed_s = 0.0  # seconds this step waited for rollouts
        if self._ahead is None:
            self._roll_ahead(self.step)
            exposed_s += self._wait_ahead()[1]  # StopRequested: run() drops the step
        (rollout, rollout_time_s), lag = self._ahead.future.result(), self._copy_lag
        self._ahead = None
        self.rollout_copy.refresh(self.policy)
        self._copy_lag = 0
        if self.step + 1 < self.cfg.trainer.total_steps:
            self._roll_ahead(self.step + 1)
        row = self.learn(self.select(rollout, rollout_time_s, policy_lag=lag))
        self._copy_lag += 1
        row["overlap/rollout_time_s"] = row["overlap/hidden_s"] = 0.0
        if self._ahead is not None:
            try:
                wall_s, wait_s = self._wait_ahead()
            except StopRequested:  # this step stands; the checkpoint lets a resume roll the next batch out again
                pass
            else:
                exposed_s += wait_s
                row["overlap/rollout_time_s"], row["overlap/hidden_s"] = wall_s, max(wall_s - wait_s, 0.0)
        row["overlap/wait_s"] = exposed_s
        return self.finish(row, started)

    def _roll_ahead(self, step: int) -> None:
        """Draws step ``step``'s episodes and starts their rollout by the rollout copy in the background."""
        rng_state = self.episode_rng.bit_generator.state
        episodes = self.train_episodes(step)
        stop = self._background.abort

        def job():
            return self._roll_out(step, episodes, self.rollout_copy.policy,
                                  should_stop=lambda: self._stop or stop.is_set())

        self._ahead = _Ahead(self._background.submit(job), rng_state)

    def _wait_ahead(self) -> tuple[float, float]:
        """Waits for the background rollout: (its wall-clock, the seconds waited). A stopped one is dropped,
        the episode RNG rewound to before its draw, and StopRequested raised."""
        waited = time.perf_counter()
        try:
            _, wall_s = self._ahead.future.result()
        except StopRequested:
            self.episode_rng.bit_generator.state = self._ahead.episode_rng
            self._ahead = None
            raise
        return wall_s, time.perf_counter() - waited

    def _drop_ahead(self) -> None:
        """Stops a background rollout still under way and waits for its thread (the env pool is free after)."""
        if self._ahead is None:
            return
        self._background.abort.set()
        try:
            self._ahead.future.exception()
        finally:
            self._background.abort.clear()
            self.episode_rng.bit_generator.state = self._ahead.episode_rng
            self._ahead = None

    # ----- the loop -----

    def save(self) -> Path:
        return ckpt.save_checkpoint(self.run_dir, self.step, self.policy, self._trainer_state())

    def _request_stop(self, signum, frame):
        if self._stop:
            raise KeyboardInterrupt
        self._stop = True
        tqdm.write("stopping after a safe point (Ctrl-C again to abort without saving)")

    def _distributed_step(self) -> dict:
        """Every rank rolls out its share; rank 0 selects and broadcasts the kept chunks; every rank learns;
        rank 0 validates."""
        payload = self.collect()
        header = broadcast_object(None if payload is None else {k: v for k, v in payload.items() if k != "kept"},
                                  self.dist)
        payload = {**header, "kept": broadcast_batch(payload["kept"] if payload else None, self.dist, self.device)}
        row = self.learn(payload)
        return self.finish(row, payload["started"]) if self.dist.is_main else row

    def run(self) -> bool:
        """Train to ``total_steps``; returns False when stopped early by Ctrl-C (state saved)."""
        cfg = self.cfg.trainer
        main = self.dist.is_main
        previous = signal.signal(signal.SIGINT, self._request_stop)
        saved_step = None
        try:
            if main and self.step == 0 and cfg.val_every and cfg.val_before_train:
                rates, seconds = self.validate(0)
                tqdm.write(f"validation before training ({seconds:.0f} s): "
                           + ", ".join(f"{key} {rate:.3f}" for key, rate in rates.items()))
            progress = tqdm(range(self.step, cfg.total_steps), desc="training", unit="step", initial=self.step,
                            total=cfg.total_steps, disable=not main)
            for step in progress:
                self.step = step
                snapshot = (self.controller.state_dict(), self.episode_rng.bit_generator.state,
                            self.shuffle_generator.get_state(), ckpt.rng_states())
                try:
                    if self.dist.enabled:
                        row = self._distributed_step()
                    else:
                        row = self.overlapped_step() if cfg.overlap else self.train_step()
                except StopRequested:
                    self._restore(snapshot)
                    self.step = step - 1
                    if main and step > 0 and saved_step != self.step:
                        self.save()
                    return False
                self._stop = broadcast_object(self._stop, self.dist)
                if main:
                    self.wall_time_s += row["step_time_s"]
                    row["wall_time_s"] = self.wall_time_s
                    self.metrics.write(row)
                    progress.set_postfix(success=f"{row['success_rate']:.2f}", update_s=f"{row['update_time_s']:.2f}")
                    # every validation point keeps its policy: a decoder or set added later is evaluated on it
                    if (cfg.save_every and (step + 1) % cfg.save_every == 0) or step + 1 == cfg.total_steps \
                            or self.validation_due(step) or self._stop:
                        self.save()
                        saved_step = step
                if self._stop:
                    return False
            return True
        finally:
            if self._background is not None:  # a batch rolled out ahead is not kept past run(): the checkpoint
                self._drop_ahead()  # redoes it; one an error (or a second Ctrl-C) left under way is stopped
            signal.signal(signal.SIGINT, previous)
            if self.metrics is not None:
                self.metrics.close()

    def _restore(self, snapshot) -> None:
        controller, episode_rng, shuffle_gen, rng = snapshot
        self.controller.load_state_dict(controller)
        self.episode_rng.bit_generator.state = episode_rng
        self.shuffle_generator.set_state(shuffle_gen)
        ckpt.set_rng_states(rng)

    def close(self) -> None:
        if self._background is not None:
            self._background.close()
        if self.pool is not None:
            self.pool.close()


def _advantage_stats(advantages: torch.Tensor, mask: torch.Tensor) -> dict:
    per_traj = advantages[:, 0] if advantages.shape[1] else advantages.new_zeros(advantages.shape[0])
    valid = mask.any(1)
    a = per_traj[valid]
    return {"advantage/mean": float(a.mean()) if a.numel() else 0.0,
            "advantage/std": float(a.std()) if a.numel() > 1 else 0.0,
            "advantage/nonzero_fraction": float((a != 0).float().mean()) if a.numel() else 0.0}
