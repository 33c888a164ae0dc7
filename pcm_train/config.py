"""Training configuration: OmegaConf structured configs over typed dataclass sections.

Each section is a dataclass whose fields carry their types and defaults; OmegaConf merges, in
order, the defaults, a preset (``pcm_train/configs/<name>.yaml``), a YAML file (``--config``, e.g.
a run's ``config.yaml``) and ``key=value`` overrides as verl/Hydra users write them, converting
each value by its field's type. A section may define ``validate(prefix)`` for its range rules;
``validate`` also checks every field's type strictly (for configs built in Python). Errors are
``ConfigError`` naming the key: an unknown key with a suggestion, a value of the wrong type with
the expected one.

Defaults are the paper's runs (PCM.md §7) on the small CPU policy;
``preset=paper`` switches to the paper's OpenVLA-OFT setup.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

STRATEGIES = ("full", "random", "top_phase", "pcm")
LOSS_AGG_MODES = ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")  # verl's agg_loss
KL_TYPES = ("low_var_kl", "k3", "kl", "k1", "abs", "mse", "k2")  # verl's kl_penalty
ESTIMATORS = ("biased", "unbiased")
GRIPPER_SIGNALS = ("command", "fingers")  # what the phase labeler reads: commands a[6], or the finger sensor
LOGGERS = ("tensorboard", "wandb")  # beside metrics.jsonl
DTYPES = ("float32", "bfloat16", "float16")
SUITES = ("libero_spatial", "libero_object", "libero_goal", "libero_10", "metaworld")  # envs/families.py
POLICIES = ("small_vla", "openvla_oft")
OBSERVATIONS = ("image", "state")  # small_vla's observation encoders (docs/state_mode.md)
NUM_PHASES = 5

# Presets are YAML files shipped in pcm_train/configs/<name>.yaml (the same format as --config files).
PRESET_DIR = Path(__file__).resolve().parent / "configs"
PRESETS = tuple(sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))
ASSET_DIR = Path(__file__).resolve().parent / "assets"
# The small VLA behaviour-cloned on scripted LIBERO-Object demonstrations, state mode (shipped with the
# package; docs/results/libero_object_first/README.md says how it was made): its rollouts succeed about half the time.
# In YAML: ${pcm_asset:libero_object_state_sft}.
SFT_POLICY = str(ASSET_DIR / "libero_object_state_sft")
OmegaConf.register_new_resolver("pcm_asset", lambda name: str(ASSET_DIR / name), replace=True)


class ConfigError(ValueError):
    """A configuration key, value or combination that cannot be used."""


@dataclass
class PCMSection:
    """Chunk masking (PCM.md §2, §4, §5)."""

    strategy: str = "pcm"  # one of STRATEGIES
    budget: int = 12  # B: chunks kept per trajectory
    refresh_every: int = 5  # T_rc: steps between keep-probability refreshes
    p_min: float = 0.1  # floor on a phase's keep weight
    num_phases: int = NUM_PHASES  # K, fixed by the labeler
    close_above: float = 0.0  # env gripper command a[6] > this means "close"
    gripper_signal: str = "command"  # one of GRIPPER_SIGNALS: label phases from the executed commands a[6], or
    # from the fingers (the env's info["gripper_closed"]: MetaWorld only; ignores closes too short to act)
    sustain: float = 0.75  # tau: grip fraction of a grasp-interval chunk
    grip: float = 0.5  # ACTIVE_GRIP at or above this grip fraction
    low: float = 0.1  # PRE_GRASP lower bound
    window: int = 3  # W: chunks before/after a grasp interval
    estimator: str = "biased"  # one of ESTIMATORS: "unbiased" weights kept chunks by 1/q (docs/METHOD.md)

    def validate(self, prefix: str) -> None:
        _one_of(f"{prefix}.strategy", self.strategy, STRATEGIES)
        _at_least(f"{prefix}.budget", self.budget, 1)
        _at_least(f"{prefix}.refresh_every", self.refresh_every, 1)
        _within(f"{prefix}.p_min", self.p_min, 0.0, 1.0, low_open=True)
        _one_of(f"{prefix}.num_phases", self.num_phases, (NUM_PHASES,))
        _within(f"{prefix}.close_above", self.close_above, -1.0, 1.0)
        _one_of(f"{prefix}.gripper_signal", self.gripper_signal, GRIPPER_SIGNALS)
        for name in ("sustain", "grip", "low"):
            _within(f"{prefix}.{name}", getattr(self, name), 0.0, 1.0)
        if not self.low <= self.grip <= self.sustain:
            raise ConfigError(
                f"{prefix}.low <= {prefix}.grip <= {prefix}.sustain must hold, "
                f"got {self.low} / {self.grip} / {self.sustain}"
            )
        _at_least(f"{prefix}.window", self.window, 0)
        _one_of(f"{prefix}.estimator", self.estimator, ESTIMATORS)


@dataclass
class ActorSection:
    """Optimizer and PPO-clip loss (PCM.md §1, §7)."""

    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.4
    clip_ratio_c: Optional[float] = None  # verl's dual clip for A < 0; None = off (SimpleVLA-RL)
    lr: float = 1e-5  # 0 = the weights never change (a control run that only rolls out and scores)
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    grad_clip: float = 2.0
    ppo_mini_batch: int = 2  # prompts (x rollout.group_size trajectories) per optimizer step; verl's ppo_mini_batch_size
    ppo_epochs: int = 1  # passes over the rollout batch
    shuffle: bool = True  # reshuffle trajectories into mini-batches every epoch (seeded by trainer.seed)
    temperature: float = 1.6  # rollout and log-prob temperature
    loss_agg_mode: str = "seq-mean-token-mean"  # one of LOSS_AGG_MODES
    micro_batch_trajectories: int = 1  # trajectories (all their kept chunks) per forward/backward; memory only
    gradient_checkpointing: bool = False  # recompute decoder activations in backward
    kl_coef: float = 0.0  # > 0: KL to the base policy (LoRA adapters disabled); needs policy.lora_r > 0
    kl_type: str = "low_var_kl"  # one of KL_TYPES

    def validate(self, prefix: str) -> None:
        _within(f"{prefix}.clip_ratio_low", self.clip_ratio_low, 0.0, 1.0, low_open=True, high_open=True)
        _above(f"{prefix}.clip_ratio_high", self.clip_ratio_high, 0.0)
        if self.clip_ratio_c is not None:
            _above(f"{prefix}.clip_ratio_c", self.clip_ratio_c, 1.0)
        _at_least(f"{prefix}.lr", self.lr, 0.0)
        _finite(f"{prefix}.lr", self.lr)
        for index, beta in enumerate(self.betas):
            _within(f"{prefix}.betas[{index}]", beta, 0.0, 1.0, high_open=True)
        _at_least(f"{prefix}.weight_decay", self.weight_decay, 0.0)
        _above(f"{prefix}.grad_clip", self.grad_clip, 0.0)
        _at_least(f"{prefix}.ppo_mini_batch", self.ppo_mini_batch, 1)
        _at_least(f"{prefix}.ppo_epochs", self.ppo_epochs, 1)
        _above(f"{prefix}.temperature", self.temperature, 0.0)
        _one_of(f"{prefix}.loss_agg_mode", self.loss_agg_mode, LOSS_AGG_MODES)
        _at_least(f"{prefix}.micro_batch_trajectories", self.micro_batch_trajectories, 1)
        _at_least(f"{prefix}.kl_coef", self.kl_coef, 0.0)
        _finite(f"{prefix}.kl_coef", self.kl_coef)
        _one_of(f"{prefix}.kl_type", self.kl_type, KL_TYPES)


@dataclass
class RolloutSection:
    """Prompts, groups and the action layout (PCM.md §1, LAYOUT.md)."""

    prompts_per_step: int = 8
    group_size: int = 10  # G rollouts per prompt
    action_chunk: int = 8  # L env steps per chunk
    action_dim: int = 7  # D numbers per step
    max_chunks: int = 64  # C chunks per trajectory (512 steps)
    num_steps_wait: int = 10  # no-op env steps after reset

    def validate(self, prefix: str) -> None:
        _at_least(f"{prefix}.prompts_per_step", self.prompts_per_step, 1)
        _at_least(f"{prefix}.group_size", self.group_size, 2)
        _at_least(f"{prefix}.action_chunk", self.action_chunk, 1)
        _at_least(f"{prefix}.action_dim", self.action_dim, 1)
        _at_least(f"{prefix}.max_chunks", self.max_chunks, 1)
        _at_least(f"{prefix}.num_steps_wait", self.num_steps_wait, 0)


@dataclass
class PolicySection:
    """Which policy to train and how."""

    name: str = "small_vla"
    path: Optional[str] = None  # local checkpoint directory; None = fresh weights
    hidden_size: int = 64  # small_vla decoder width
    num_layers: int = 2  # small_vla decoder layers
    image_size: int = 32  # small_vla input image side (the env renders at this size)
    observation: str = "image"  # one of OBSERVATIONS; "state" needs env.camera=false (docs/state_mode.md)
    lora_r: int = 32  # 0 = no LoRA adapters
    lora_alpha: int = 32
    dtype: str = "float32"  # one of DTYPES

    def validate(self, prefix: str) -> None:
        _one_of(f"{prefix}.name", self.name, POLICIES)
        _at_least(f"{prefix}.hidden_size", self.hidden_size, 8)
        _at_least(f"{prefix}.num_layers", self.num_layers, 1)
        _at_least(f"{prefix}.image_size", self.image_size, 8)
        _one_of(f"{prefix}.observation", self.observation, OBSERVATIONS)
        _at_least(f"{prefix}.lora_r", self.lora_r, 0)
        _above(f"{prefix}.lora_alpha", self.lora_alpha, 0)
        _one_of(f"{prefix}.dtype", self.dtype, DTYPES)


@dataclass
class TrainerSection:
    """Loop length, logging cadence, outputs, seeding."""

    total_steps: int = 200
    val_every: int = 1  # 0 = never
    # validation (docs/trainer.md, "Validation"): val_episodes episodes for every decoder ("greedy" or
    # "sample@T") and prompt set ("train", "held_out", or ids such as "40-49"); 0 = every prompt of a set once
    val_episodes: int = 50
    val_decoders: list[str] = field(default_factory=lambda: ["greedy", "sample@1.0"])
    val_sets: list[str] = field(default_factory=lambda: ["held_out"])
    val_before_train: bool = True  # a fresh run also validates its starting policy (trained_steps 0)
    save_every: int = 10  # 0 = never
    # every N steps (0 = never) compare the kept chunks' gradient with the full one on the step's batch
    # before the update (pcm_train.algorithm.diagnostics: diag/... metrics; two extra backward passes)
    diagnostics_every: int = 0
    output_dir: Optional[str] = None  # None = a new runs/<date>-<time>-<strategy> directory
    seed: int = 0
    device: str = "auto"  # "auto", "cpu", "cuda" or "cuda:<index>"
    num_threads: int = 0  # torch CPU threads of the trainer process; 0 = torch's default (env workers use 1)
    overwrite: bool = False  # a fresh run may replace a non-empty output_dir (else it refuses)
    allow_partial_log: bool = False  # resume although metrics.jsonl lacks steps before the checkpoint
    # roll the next step's batch out in the background (a second copy of the policy holding the weights from
    # before this step's update) while this step's update runs: one step off-policy; one process only
    overlap: bool = False
    loggers: list[str] = field(default_factory=lambda: ["tensorboard"])  # any of LOGGERS (metrics.jsonl always)
    wandb_project: str = "pcm"
    wandb_mode: Optional[str] = None  # "online", "offline" (no network needed), "disabled"; None = WANDB_MODE

    def validate(self, prefix: str) -> None:
        _at_least(f"{prefix}.total_steps", self.total_steps, 1)
        _at_least(f"{prefix}.val_every", self.val_every, 0)
        _at_least(f"{prefix}.save_every", self.save_every, 0)
        _at_least(f"{prefix}.diagnostics_every", self.diagnostics_every, 0)
        _at_least(f"{prefix}.val_episodes", self.val_episodes, 0)
        for key in ("val_decoders", "val_sets"):
            if not getattr(self, key):
                raise ConfigError(f"{prefix}.{key} must name at least one entry, got []")
        _at_least(f"{prefix}.num_threads", self.num_threads, 0)
        if self.output_dir is not None and not self.output_dir.strip():
            raise ConfigError(f"{prefix}.output_dir must be a path or null, got an empty string")
        _at_least(f"{prefix}.seed", self.seed, 0)
        for index, name in enumerate(self.loggers):
            _one_of(f"{prefix}.loggers[{index}]", name, LOGGERS)
        if self.wandb_mode is not None:
            _one_of(f"{prefix}.wandb_mode", self.wandb_mode, ("online", "offline", "disabled"))
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ConfigError(f"{prefix}.device must be 'auto', 'cpu', 'cuda' or 'cuda:<index>', got {self.device!r}")


@dataclass
class EnvSection:
    """LIBERO and the rollout workers."""

    suite: str = "libero_object"
    task_ids: Optional[list[int]] = None  # None = every task of the suite
    val_init_states: int = 10  # the last N of each task's 50 initial states are held out for validation
    camera: bool = True  # False: state observations, no rendering (state-mode policies only)
    num_workers: int = 0  # Ray env workers; 0 = one per CPU core
    max_slots: int = 32  # envs in flight at once over all workers; a bigger batch runs in waves (env reuse)
    ray_address: Optional[str] = None  # None = start Ray locally; "auto" or an address = join a cluster
    step_timeout_s: float = 120.0  # a worker silent this long is restarted
    ray_dashboard: bool = False  # Ray's dashboard when the run starts Ray (it costs CPU on small machines)
    # groups of env workers stepping at once: the policy acts for one group while the others step (1 = all
    # envs step together, then the policy acts for all); used for seeded and greedy rollouts (the trainer's)
    pipeline_groups: int = 2
    # torch threads of the policy while it rolls out on the CPU (the env workers share the cores); 0 = the
    # cores this rank's env workers leave free, at least 1
    policy_threads: int = 0

    def validate(self, prefix: str) -> None:
        _one_of(f"{prefix}.suite", self.suite, SUITES)
        if self.task_ids is not None and (not self.task_ids or min(self.task_ids) < 0):
            raise ConfigError(f"{prefix}.task_ids must be null or a non-empty list of ids >= 0, got {self.task_ids}")
        _within(f"{prefix}.val_init_states", self.val_init_states, 1, 49)
        _at_least(f"{prefix}.num_workers", self.num_workers, 0)
        _at_least(f"{prefix}.max_slots", self.max_slots, 1)
        _above(f"{prefix}.step_timeout_s", self.step_timeout_s, 0.0)
        _at_least(f"{prefix}.pipeline_groups", self.pipeline_groups, 1)
        _at_least(f"{prefix}.policy_threads", self.policy_threads, 0)


@dataclass
class PCMTrainConfig:
    """The whole run. Sections are dataclass fields; scalars at the top level are options."""

    preset: Optional[str] = None  # one of PRESETS, applied by load_config before other overrides
    pcm: PCMSection = field(default_factory=PCMSection)
    actor: ActorSection = field(default_factory=ActorSection)
    rollout: RolloutSection = field(default_factory=RolloutSection)
    policy: PolicySection = field(default_factory=PolicySection)
    trainer: TrainerSection = field(default_factory=TrainerSection)
    env: EnvSection = field(default_factory=EnvSection)
    resume: Optional[str] = None  # a run directory to continue from its last checkpoint


def load_config(overrides: list[str] | None = None, config_file: str | os.PathLike | None = None) -> PCMTrainConfig:
    """Defaults, then the preset (``preset=...`` among the overrides, else the file's ``preset``), then
    ``config_file`` (a YAML file such as a run's ``config.yaml``), then the overrides in order.

    overrides: ``"key=value"`` strings as verl/Hydra take them, e.g. ``"pcm.budget=8"``,
    ``"actor.betas=[0.9,0.95]"``, ``"policy.path=null"``, ``"preset=paper"``. Raises ConfigError.
    """
    pairs = [_split_override(override) for override in overrides or []]
    file_layer = _load_yaml(config_file) if config_file is not None else OmegaConf.create()
    presets = [value for key, value in pairs if key == "preset"]
    preset = _yaml_value(presets[-1]) if presets else file_layer.get("preset")
    layers = []
    if preset is not None:
        _one_of("preset", preset, PRESETS)
        layers.append((f"preset {preset}", _load_yaml(PRESET_DIR / f"{preset}.yaml")))
    if config_file is not None:
        layers.append((str(config_file), file_layer))
    config = _merged(PCMTrainConfig(), layers, pairs)
    validate(config)
    return config


def apply_overrides(config: Any, overrides: typing.Iterable[str]) -> None:
    """Sets each ``"a.b=value"`` in place (OmegaConf parses the value by the field's annotated type).

    Works on any dataclass tree, so new sections and fields need no change here.
    Raises ConfigError for a malformed override, an unknown key or an unusable value.
    """
    merged = _merged(config, [], [_split_override(override) for override in overrides])
    for item in dataclasses.fields(config):
        setattr(config, item.name, getattr(merged, item.name))


def parse_overrides(config_class: type, argv: typing.Iterable[str]) -> Any:
    """A fresh ``config_class()`` with the ``key=value`` overrides applied, then validated; ConfigError for
    unknown keys or unusable values."""
    config = config_class()
    apply_overrides(config, argv)
    config.validate()
    return config


def preset_overrides(name: str) -> list[str]:
    """The preset ``name`` as ``key=value`` strings (for display), e.g. ``["policy.observation=state", ...]``."""
    _one_of("preset", name, PRESETS)

    def flat(prefix: str, node) -> list[str]:
        if isinstance(node, dict):
            return [item for key, value in node.items() for item in flat(f"{prefix}{key}.", value)]
        return [f"{prefix[:-1]}={node}"]

    return flat("", OmegaConf.to_container(_load_yaml(PRESET_DIR / f"{name}.yaml"), resolve=True))


def save_config(config: PCMTrainConfig, path: str | os.PathLike) -> None:
    """Writes ``config`` as YAML that ``--config`` (``load_config(config_file=...)``) reads back."""
    from pcm_train.runtime.files import write_atomically

    write_atomically(Path(path), OmegaConf.to_yaml(OmegaConf.structured(config)))


def validate(config: PCMTrainConfig) -> None:
    """Checks every field's type, then each section's range rules. Raises ConfigError naming the key."""
    _check_types(config, "")
    if config.preset is not None:
        _one_of("preset", config.preset, tuple(PRESETS))
    for item in dataclasses.fields(config):
        section = getattr(config, item.name)
        if dataclasses.is_dataclass(section) and hasattr(section, "validate"):
            section.validate(item.name)
    _check_combinations(config)


def _check_combinations(config: PCMTrainConfig) -> None:
    """Rules that span sections."""
    prompts, mini = config.rollout.prompts_per_step, config.actor.ppo_mini_batch
    if prompts % mini:
        raise ConfigError(f"actor.ppo_mini_batch ({mini}) must divide rollout.prompts_per_step ({prompts}): "
                          "every optimizer step takes the same number of prompts' trajectories")
    if config.actor.kl_coef > 0 and config.policy.lora_r == 0:
        raise ConfigError("actor.kl_coef > 0 needs LoRA (policy.lora_r > 0): the KL reference is the base policy "
                          "with the adapters disabled, so no second model is kept in memory")
    if config.policy.name == "openvla_oft" and config.policy.observation != "image":
        raise ConfigError(f"policy.name=openvla_oft sees images only, got policy.observation="
                          f"{config.policy.observation} (set by an override, a --config file or the preset); "
                          "set policy.observation=image env.camera=true, or use preset=paper")
    if config.pcm.gripper_signal == "fingers" and config.env.suite != "metaworld":
        raise ConfigError(f"pcm.gripper_signal=fingers needs an env that reports its fingers (env.suite=metaworld), "
                          f"got env.suite={config.env.suite}; use pcm.gripper_signal=command")
    if config.pcm.strategy in ("pcm", "random") and config.pcm.budget >= config.rollout.max_chunks:
        warnings.warn(f"pcm.budget ({config.pcm.budget}) >= rollout.max_chunks ({config.rollout.max_chunks}): "
                      f"every valid chunk is kept, so pcm.strategy={config.pcm.strategy} trains as "
                      "pcm.strategy=full", UserWarning, stacklevel=3)


def config_to_dict(config: PCMTrainConfig) -> dict[str, Any]:
    """Nested dict of plain values, one per section, for logs and checkpoints."""
    return dataclasses.asdict(config)


def _all_keys(config: Any, prefix: str = "") -> list[str]:
    """Every settable dotted key of a config, e.g. ``["preset", "pcm.strategy", ...]``."""
    keys = []
    for item in dataclasses.fields(config):
        value = getattr(config, item.name)
        if dataclasses.is_dataclass(value):
            keys.extend(_all_keys(value, f"{prefix}{item.name}."))
        else:
            keys.append(prefix + item.name)
    return keys


def _split_override(override: str) -> tuple[str, str]:
    key, equals, value = override.partition("=")
    if not equals or not key.strip():
        raise ConfigError(f"override {override!r} must look like key=value or section.key=value")
    return key.strip(), value.strip()


def _yaml_value(text: str) -> str:
    """An override's value as YAML: ``None`` means null, ``(a, b)`` a list, nothing the empty string."""
    if text in ("None", "none"):
        return "null"
    if text.startswith("(") and text.endswith(")"):
        return "[" + text[1:-1] + "]"
    return text if text else "''"


def _load_yaml(path) -> DictConfig:
    try:
        loaded = OmegaConf.load(path)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"config file {path} is not valid YAML: {' '.join(str(error).split())}") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"config file {path} must hold a mapping of sections (pcm:, actor:, ...)")
    return loaded


def _merged(config: Any, layers: list[tuple[str, DictConfig]], pairs: list[tuple[str, str]]) -> Any:
    """``config`` (a dataclass instance) with the YAML ``layers`` and the ``(key, value)`` overrides
    merged in order by OmegaConf; a new instance, tuples restored. Raises ConfigError naming the key."""
    merged = OmegaConf.structured(config)
    for source, layer in layers:
        merged = _merge_one(config, merged, layer, source, None)
    for key, value in pairs:
        layer = OmegaConf.from_dotlist([f"{key}={_yaml_value(value)}"])
        merged = _merge_one(config, merged, layer, f"{key}={value}", key)
    try:
        return _restore_tuples(OmegaConf.to_object(merged))
    except OmegaConfBaseException as error:  # e.g. an interpolation that does not resolve
        raise ConfigError(f"{error.full_key}: {error.msg.splitlines()[0]}") from None


def _merge_one(config: Any, merged: DictConfig, layer: DictConfig, source: str, key: str | None) -> DictConfig:
    try:
        return OmegaConf.merge(merged, layer)
    except OmegaConfBaseException as error:
        raise ConfigError(_merge_message(config, error, source, key)) from None


def _merge_message(config: Any, error: OmegaConfBaseException, source: str, key: str | None) -> str:
    """Today's messages for OmegaConf's merge errors: unknown key (with a suggestion), a section set to a
    value, a value of the wrong type (naming the expected one)."""
    full_key = error.full_key or ""
    where = "" if key is not None else f" (in {source})"
    key = key or full_key
    expected = _field_type(type(config), key)
    if isinstance(error, ConfigKeyError) or (expected is None and full_key != key):
        return f"unknown config key {key!r}{_suggestion(config, key)}{where}"
    if dataclasses.is_dataclass(expected):
        return f"{key} is a section; set its keys, e.g. {key}.{dataclasses.fields(expected)[0].name}=...{where}"
    if expected is None:
        return f"unknown config key {key!r}{_suggestion(config, key)}{where}"
    value = source.partition("=")[2] if "=" in source and not where else error.msg.splitlines()[0]
    return f"{key} expects {_type_name(expected)}, got {value!r}{where}"


def _field_type(cls: type, key: str) -> Any | None:
    """The annotated type of the field at dotted ``key`` (``actor.betas[1]`` counts as ``actor.betas``)."""
    target = cls
    for name in re.sub(r"\[\d+\]$", "", key).split("."):
        hints = typing.get_type_hints(target) if dataclasses.is_dataclass(target) else {}
        if name not in hints:
            return None
        target = hints[name]
    return target


def _restore_tuples(config: Any) -> Any:
    """OmegaConf hands tuple fields back as lists: turn them into tuples again (in place)."""
    for name, expected in typing.get_type_hints(type(config)).items():
        value = getattr(config, name)
        if dataclasses.is_dataclass(value):
            _restore_tuples(value)
        elif typing.get_origin(expected) is tuple and isinstance(value, list):
            setattr(config, name, tuple(value))
    return config


def _suggestion(config: Any, key: str) -> str:
    keys = _all_keys(config)
    by_leaf = [k for k in keys if k.rsplit(".", 1)[-1] == key.rsplit(".", 1)[-1]]
    close = by_leaf or difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(repr(k) for k in close)}?" if close else ""


def _optional_inner(expected: Any) -> Any | None:
    """X for Optional[X] / X | None, else None."""
    if typing.get_origin(expected) in (typing.Union, types.UnionType):
        args = [arg for arg in typing.get_args(expected) if arg is not type(None)]
        if len(args) == 1 and len(typing.get_args(expected)) == 2:
            return args[0]
    return None


def _item_types(expected: Any, length: int) -> tuple | None:
    """Per-item types of a list[X] / tuple[X, ...] / tuple[X, Y] value of ``length`` items; None if it cannot fit."""
    args = typing.get_args(expected)
    if typing.get_origin(expected) is list or args[1:] == (Ellipsis,):
        return (args[0],) * length
    return args if len(args) == length else None


def _is_sequence(expected: Any) -> bool:
    return typing.get_origin(expected) in (tuple, list)


def _type_name(expected: Any, plural: bool = False) -> str:
    """'an int', 'a list of 2 floats', 'a string or null', ... for error messages."""
    inner = _optional_inner(expected)
    if inner is not None:
        return f"{_type_name(inner, plural)} or null"
    if _is_sequence(expected):
        args = typing.get_args(expected)
        count = "" if typing.get_origin(expected) is list or args[1:] == (Ellipsis,) else f"{len(args)} "
        return f"a list of {count}{_type_name(args[0], plural=True)}"
    noun = {int: "int", float: "float", bool: "bool", str: "string"}.get(expected, str(expected))
    if plural:
        return noun + "s"
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def _matches(expected: Any, value: Any) -> bool:
    inner = _optional_inner(expected)
    if inner is not None:
        return value is None or _matches(inner, value)
    if _is_sequence(expected):
        # OmegaConf hands tuples back as lists, so either is accepted.
        item_types = _item_types(expected, len(value)) if isinstance(value, (tuple, list)) else None
        return item_types is not None and all(map(_matches, item_types, value))
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, expected)


def _check_types(config: Any, prefix: str) -> None:
    for name, expected in typing.get_type_hints(type(config)).items():
        value = getattr(config, name)
        if dataclasses.is_dataclass(expected):
            if not isinstance(value, expected):
                raise ConfigError(f"{prefix}{name} must be a {expected.__name__}, got {type(value).__name__}")
            _check_types(value, f"{prefix}{name}.")
        elif not _matches(expected, value):
            raise ConfigError(f"{prefix}{name} expects {_type_name(expected)}, got {value!r}")


def _one_of(key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(repr(c) for c in choices)}; got {value!r}")


def _at_least(key: str, value: float, low: float) -> None:
    if not value >= low:  # also rejects NaN
        raise ConfigError(f"{key} must be >= {low}, got {value!r}")


def _finite(key: str, value: float) -> None:
    if not math.isfinite(value):
        raise ConfigError(f"{key} must be finite, got {value!r}")


def _above(key: str, value: float, low: float) -> None:
    if not value > low:  # also rejects NaN
        raise ConfigError(f"{key} must be > {low}, got {value!r}")


def _within(key: str, value: float, low: float, high: float, low_open: bool = False, high_open: bool = False) -> None:
    above_low = value > low if low_open else value >= low
    below_high = value < high if high_open else value <= high
    if not (above_low and below_high):
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ConfigError(f"{key} must lie in {interval}, got {value!r}")
