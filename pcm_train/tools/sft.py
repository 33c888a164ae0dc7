"""Behaviour-clone the small VLA on expert demonstrations (action-token cross-entropy).

    python -m pcm_train.sft demos=DIR out=DIR [observation=state|image] [labels=executed|clean] [epochs=N]
                            [batch_size=B] [lr=X] [weight_decay=X] [hidden_size=H] [num_layers=N] [seed=S]
                            [val_fraction=F] [device=auto]

Dataset: every chunk of every successful demonstration (``pcm_train.tools.demos``' format): the
observation at the chunk's first step, the task prompt, and the chunk's executed actions
(``labels=clean``: the expert's noise-free ones) as the 56 action tokens the policy emits (same
256-bin tokenization; the gripper mapped from the env's ±1 back to the model's 1 = open / 0 =
close). The last chunk of a demo may be short: its missing steps are masked out of the loss.
Demonstrations are split into train / validation by episode. Measurements: docs/state_mode.md.

Outputs in ``out``: the policy (``save_pretrained``: full weights, no LoRA) that
``python -m pcm_train.run policy.path=out`` starts from (a state-mode policy also needs
``policy.observation=state env.camera=false``, docs/state_mode.md), and ``sft_metrics.jsonl``,
one row per epoch (train / val loss and token accuracy).
"""
from __future__ import annotations

import dataclasses
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pcm_train.cli import run_command
from pcm_train.policies.action_tokens import normalized_to_tokens
from pcm_train.config import OBSERVATIONS, ConfigError, _above, _at_least, _one_of, _within, parse_overrides
from pcm_train.policies.small_vla import SmallVLA, SmallVLAConfig

LABELS = ("executed", "clean")
STATE_STD_FLOOR = 1e-2  # state dims that barely vary in the demos are not blown up by standardization


@dataclass
class SFTConfig:
    """Command-line options of ``python -m pcm_train.sft``."""

    demos: Optional[str] = None  # directory written by pcm_train.tools.demos (required)
    out: Optional[str] = None  # where the policy and sft_metrics.jsonl go (required)
    observation: str = "state"  # one of OBSERVATIONS; image needs demos recorded with images
    labels: str = "executed"  # one of LABELS: the executed (noisy) actions or the expert's noise-free ones
    epochs: int = 20
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.01
    hidden_size: int = 64  # decoder width (PolicySection's default)
    num_layers: int = 2
    seed: int = 0
    val_fraction: float = 0.1  # share of the demonstrations held out (whole episodes)
    device: str = "auto"  # "auto", "cpu", "cuda" or "cuda:<index>"

    def validate(self) -> None:
        for name in ("demos", "out"):
            if not getattr(self, name):
                raise ConfigError(f"{name}=DIR is required (python -m pcm_train.sft demos=DIR out=DIR ...)")
        _one_of("observation", self.observation, OBSERVATIONS)
        _one_of("labels", self.labels, LABELS)
        _at_least("epochs", self.epochs, 1)
        _at_least("batch_size", self.batch_size, 1)
        _above("lr", self.lr, 0.0)
        _at_least("weight_decay", self.weight_decay, 0.0)
        _at_least("hidden_size", self.hidden_size, 16)
        if self.hidden_size % 16:
            raise ConfigError(f"hidden_size must be a multiple of 16 (attention heads of 16), got {self.hidden_size}")
        _at_least("num_layers", self.num_layers, 1)
        _at_least("seed", self.seed, 0)
        _within("val_fraction", self.val_fraction, 0.0, 1.0, high_open=True)
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ConfigError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:<index>', got {self.device!r}")


# ----- actions -> tokens -----

def gripper_from_env(command: torch.Tensor) -> torch.Tensor:
    """Env gripper command (float, any shape; +1 close, -1 open) -> model value (1 open, 0 close): ``(1 - g) / 2``.

    Inverse of ``pcm_train.policies.action_tokens.gripper_to_env`` on ±1."""
    return (1.0 - command) / 2.0


def actions_to_tokens(actions: torch.Tensor, config: SmallVLAConfig) -> torch.Tensor:
    """Env-space actions float [..., action_dim] -> action token ids int64 [..., action_dim] that the policy
    decodes back to them: dims with ``action_norm_mask`` normalized by ``action_q01``/``action_q99`` to
    [-1, 1] (clipped), the last (gripper) dim through ``gripper_from_env``."""
    actions = actions.double()
    q01, q99 = torch.tensor(config.action_q01).double(), torch.tensor(config.action_q99).double()
    normalized = torch.where(torch.tensor(config.action_norm_mask), 2 * (actions - q01) / (q99 - q01 + 1e-8) - 1,
                             actions)
    normalized[..., -1] = gripper_from_env(actions[..., -1])
    return normalized_to_tokens(normalized.clamp(-1.0, 1.0).float(), config.action_token_start)


# ----- dataset -----

def load_successful_demonstrations(directory: str) -> list:
    """The successful episodes (``pcm_train.expert.Episode``) listed in ``directory/index.json``, in its order."""
    from pcm_train.tools.demos import FORMAT, INDEX_FILE, read_episode

    index_path = Path(directory) / INDEX_FILE
    if not index_path.is_file():
        raise FileNotFoundError(f"demos={directory}: no {INDEX_FILE} there (write demonstrations with "
                                "python -m pcm_train.demos out=DIR ...)")
    index = json.loads(index_path.read_text())
    if index.get("format") != FORMAT:
        raise ValueError(f"demos={directory}: format {index.get('format')!r}, expected {FORMAT!r}")
    return [read_episode(Path(directory) / entry["file"]) for entry in index["episodes"] if entry["success"]]


@dataclass
class ChunkDataset:
    """N chunks. observations: float32 [N, state_dim] states or uint8 [N, H, W, 3] images (the chunk's first
    step); prompts: N task strings; tokens int64 [N, A] action token ids; mask bool [N, A] (False for the
    padded steps of a short last chunk); episode int64 [N]: index of the demonstration."""

    observations: np.ndarray
    prompts: list[str]
    tokens: torch.Tensor
    mask: torch.Tensor
    episode: np.ndarray

    def __len__(self) -> int:
        return len(self.prompts)

    def subset(self, rows: np.ndarray) -> ChunkDataset:
        return ChunkDataset(self.observations[rows], [self.prompts[r] for r in rows], self.tokens[rows],
                            self.mask[rows], self.episode[rows])


def chunk_demonstrations(episodes, config: SmallVLAConfig, labels: str = "executed") -> ChunkDataset:
    """Cut episodes (``language``, ``states`` float [T, state_dim], ``images`` uint8 [T, H, W, 3] or None,
    ``actions`` / ``clean_actions`` float [T, action_dim]) into ``config.action_chunk``-step chunks, observed
    at their first step; ``labels`` picks the target actions (one of LABELS)."""
    L, D = config.action_chunk, config.action_dim
    key = "states" if config.observation == "state" else "images"
    observations, prompts, tokens, masks, episode_index = [], [], [], [], []
    for index, episode in enumerate(episodes):
        if len(episode.actions) == 0:
            continue
        steps = len(episode.actions)
        chunks = -(-steps // L)
        actions = np.zeros((chunks * L, D), dtype=np.float32)
        actions[:steps] = episode.actions if labels == "executed" else episode.clean_actions
        valid = np.arange(chunks * L) < steps
        observations.append(getattr(episode, key)[::L][:chunks])
        prompts += [episode.language] * chunks
        tokens.append(actions_to_tokens(torch.from_numpy(actions), config).view(chunks, L * D))
        masks.append(torch.from_numpy(np.repeat(valid, D)).view(chunks, L * D))
        episode_index += [index] * chunks
    if not prompts:
        raise ValueError("the demonstrations hold no actions")
    return ChunkDataset(np.concatenate(observations), prompts, torch.cat(tokens), torch.cat(masks),
                        np.array(episode_index))


def split_episodes(data: ChunkDataset, val_fraction: float, rng: np.random.Generator) -> tuple[ChunkDataset, ...]:
    """(train, val) by whole episodes; val holds round(val_fraction * episodes) of them (at least one when
    val_fraction > 0 and there are two or more episodes), or is empty."""
    episodes = np.unique(data.episode)
    count = min(max(round(val_fraction * len(episodes)), int(val_fraction > 0)), len(episodes) - 1)
    held_out = rng.permutation(episodes)[:count]
    is_val = np.isin(data.episode, held_out)
    return data.subset(np.flatnonzero(~is_val)), data.subset(np.flatnonzero(is_val))


# ----- training -----

def new_policy(cfg: SFTConfig, state_dim: int, image_size: int) -> SmallVLA:
    """A fresh small VLA of the config's sizes and observation mode, on the CPU."""
    torch.manual_seed(cfg.seed)
    return SmallVLA(SmallVLAConfig(hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                                   num_attention_heads=cfg.hidden_size // 16, intermediate_size=2 * cfg.hidden_size,
                                   observation=cfg.observation, state_dim=state_dim, image_size=image_size))


def standardize_states(policy: SmallVLA, train_set: ChunkDataset) -> None:
    """State mode: set the state encoder's mean / std (floored at STATE_STD_FLOOR) from the training chunks."""
    states = torch.from_numpy(train_set.observations).double()
    policy.state_encoder.set_normalization(states.mean(0).float(), states.std(0).clamp(min=STATE_STD_FLOOR).float())


def batch_loss(policy: SmallVLA, data: ChunkDataset, rows: np.ndarray) -> tuple[torch.Tensor, int, int]:
    """Mean cross-entropy over the rows' valid action tokens; also (correct argmax tokens, valid tokens)."""
    device = policy.device
    key = "state" if policy.config.observation == "state" else "image"
    inputs = policy.observations_to_inputs([{key: observation} for observation in data.observations[rows]])
    input_ids, attention_mask = policy.encode_prompts([data.prompts[r] for r in rows])
    logits = policy.action_logits(input_ids, attention_mask, inputs.to(device))
    targets = (data.tokens[rows] - policy.config.action_token_start).to(device)
    mask = data.mask[rows].to(device)
    loss = F.cross_entropy(logits[mask].float(), targets[mask])
    correct = int((logits[mask].argmax(-1) == targets[mask]).sum())
    return loss, correct, int(mask.sum())


def run_epoch(policy: SmallVLA, data: ChunkDataset, batch_size: int, optimizer: torch.optim.Optimizer | None,
              rng: np.random.Generator, desc: str) -> dict:
    """One pass (shuffled when training, i.e. with an optimizer); token-weighted mean loss and accuracy."""
    order = rng.permutation(len(data)) if optimizer is not None else np.arange(len(data))
    policy.train(optimizer is not None)
    loss_sum, correct, tokens = 0.0, 0, 0
    progress = tqdm(range(0, len(data), batch_size), desc=desc, leave=False, unit="batch")
    for start in progress:
        rows = order[start:start + batch_size]
        with torch.set_grad_enabled(optimizer is not None):
            loss, batch_correct, batch_tokens = batch_loss(policy, data, rows)
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        value = float(loss.detach())
        loss_sum += value * batch_tokens
        correct += batch_correct
        tokens += batch_tokens
        progress.set_postfix(loss=f"{value:.3f}")
    return {"loss": loss_sum / max(tokens, 1), "token_accuracy": correct / max(tokens, 1)}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={name} but this machine has no CUDA device; use device=cpu")
    return torch.device(name)


def train(cfg: SFTConfig) -> dict:
    """Load the demonstrations, train, save the policy to ``cfg.out``; returns the last epoch's metrics row."""
    cfg.validate()
    device = resolve_device(cfg.device)
    episodes = load_successful_demonstrations(cfg.demos)
    if not episodes:
        raise ValueError(f"{cfg.demos}: no successful demonstrations to learn from")
    if cfg.observation == "image" and episodes[0].images is None:
        raise ValueError(f"observation=image needs demonstrations recorded with images; {cfg.demos} has none")
    image_size = episodes[0].images.shape[1] if cfg.observation == "image" else SmallVLAConfig.image_size
    policy = new_policy(cfg, state_dim=episodes[0].states.shape[1], image_size=image_size)
    rng = np.random.default_rng(cfg.seed)
    chunks = chunk_demonstrations(episodes, policy.config, cfg.labels)
    train_set, val_set = split_episodes(chunks, cfg.val_fraction, rng)
    if cfg.observation == "state":
        standardize_states(policy, train_set)
    policy.to(device)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"{len(train_set)} train / {len(val_set)} val chunks from {len(np.unique(train_set.episode))} / "
          f"{len(np.unique(val_set.episode))} successful demonstrations; {cfg.observation} observations",
          file=sys.stderr)
    row = {}
    with open(out / "sft_metrics.jsonl", "w") as log:
        for epoch in tqdm(range(cfg.epochs), desc="sft", unit="epoch"):
            trained = run_epoch(policy, train_set, cfg.batch_size, optimizer, rng, f"epoch {epoch}")
            row = {"epoch": epoch, "train_loss": trained["loss"], "train_token_accuracy": trained["token_accuracy"]}
            if len(val_set):
                checked = run_epoch(policy, val_set, cfg.batch_size, None, rng, f"epoch {epoch} val")
                row.update(val_loss=checked["loss"], val_token_accuracy=checked["token_accuracy"])
            log.write(json.dumps(row) + "\n")
            log.flush()
            tqdm.write(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    policy.save_pretrained(str(out))
    (out / "sft_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    return row


def parse_args(argv: list[str]) -> SFTConfig:
    """``key=value`` overrides of SFTConfig; ConfigError for unknown keys or bad values."""
    return parse_overrides(SFTConfig, argv)


def main(argv: list[str] | None = None) -> int:
    return run_command(__doc__, _main, argv)


def _main(argv: list[str]) -> int:
    cfg = parse_args(argv)
    row = train(cfg)
    losses = ", ".join(f"{k} {row[k]:.4f}" for k in ("train_loss", "val_loss") if k in row)
    print(f"final {losses}; policy in {Path(cfg.out).resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
