"""Build the policy a run trains, from its ``policy`` config section."""
from __future__ import annotations

from pathlib import Path

import torch

from pcm_train.config import POLICIES, PolicySection
from pcm_train.envs.libero import PRIVILEGED_STATE_DIM
from pcm_train.policies.openvla_oft import OpenVLAOFT
from pcm_train.policies.small_vla import SmallVLA, SmallVLAConfig


def check_policy_path(cfg: PolicySection) -> None:
    """Cheap checks of ``cfg.path`` before anything is built (FileNotFoundError naming the key)."""
    if cfg.name == "openvla_oft" and cfg.path is None:
        raise FileNotFoundError("policy.path is required for policy.name=openvla_oft "
                                "(a local OpenVLA-OFT checkpoint folder, e.g. a SimpleVLA-RL SFT download)")
    if cfg.path is not None and not (Path(cfg.path) / "config.json").is_file():
        raise FileNotFoundError(f"policy.path={cfg.path}: no config.json there (a directory written by "
                                "save_pretrained, pcm_train.tools.sft or pcm_train.run's base_policy/ is expected)")


def build_policy(cfg: PolicySection, *, device: torch.device, gradient_checkpointing: bool = False,
                 adapters: Path | None = None, state_dim: int = PRIVILEGED_STATE_DIM):
    """The policy named by ``cfg.name``: ``cfg.path`` loads saved weights (required for ``openvla_oft``:
    an OpenVLA-OFT checkpoint folder), else a fresh small VLA from the config sizes and observation mode
    (seed torch first for reproducible weights; state mode reads ``state_dim`` numbers, the env
    family's privileged state: ``pcm_train.envs.families.state_dim``). A saved
    policy must have ``cfg.observation``'s mode. LoRA adapters are added when ``cfg.lora_r > 0`` (or
    loaded, trainable, from ``adapters``)."""
    if cfg.name not in POLICIES:
        raise ValueError(f"policy.name must be one of {POLICIES}, got {cfg.name!r}")
    if cfg.name == "openvla_oft" and cfg.observation != "image":
        raise ValueError(f"policy.observation={cfg.observation} needs policy.name=small_vla (openvla_oft sees "
                         "images only): set policy.observation=image env.camera=true")
    if cfg.name == "openvla_oft":
        if cfg.path is None:
            raise FileNotFoundError("policy.path is required for policy.name=openvla_oft "
                                    "(a local OpenVLA-OFT checkpoint folder, e.g. a SimpleVLA-RL SFT download)")
        policy = OpenVLAOFT.from_checkpoint(cfg.path, dtype=getattr(torch, cfg.dtype), device=device)
    elif cfg.path is not None:
        path = Path(cfg.path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"policy.path={cfg.path}: no config.json there (a directory written by "
                                    "save_pretrained or pcm_train.run's base_policy/ is expected)")
        policy = SmallVLA.from_pretrained(str(path))
        if policy.config.observation != cfg.observation:
            raise ValueError(f"policy.path={cfg.path} holds a {policy.config.observation}-observation policy; set "
                             f"policy.observation={policy.config.observation} (see docs/state_mode.md)")
    else:
        policy = SmallVLA(SmallVLAConfig(hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                                         num_attention_heads=max(1, cfg.hidden_size // 16),
                                         intermediate_size=2 * cfg.hidden_size, image_size=cfg.image_size,
                                         observation=cfg.observation, state_dim=state_dim))
    policy = policy.to(device=device, dtype=getattr(torch, cfg.dtype))
    if adapters is not None:
        policy.load_lora(str(adapters), trainable=True)
    elif cfg.lora_r > 0:
        policy.add_lora(cfg.lora_r, cfg.lora_alpha)
    if gradient_checkpointing:
        policy.enable_gradient_checkpointing()
    return policy
