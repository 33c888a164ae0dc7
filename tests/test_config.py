"""Configuration defaults, command-line overrides, presets and validation errors."""
import dataclasses
import math

import pytest
from omegaconf import OmegaConf

from pcm_train.config import (PRESETS, SFT_POLICY, ConfigError, PCMTrainConfig, apply_overrides, config_to_dict,
                              load_config, preset_overrides, save_config, validate)

PAPER_DEFAULTS = {  # PCM.md §7 and §2
    "preset": None,
    "pcm": {
        "strategy": "pcm", "budget": 12, "refresh_every": 5, "p_min": 0.1, "num_phases": 5,
        "close_above": 0.0, "sustain": 0.75, "grip": 0.5, "low": 0.1, "window": 3, "estimator": "biased",
        "gripper_signal": "command",
    },
    "actor": {
        "clip_ratio_low": 0.2, "clip_ratio_high": 0.4, "clip_ratio_c": None, "lr": 1e-5, "betas": (0.9, 0.999),
        "weight_decay": 0.0, "grad_clip": 2.0, "ppo_mini_batch": 2, "ppo_epochs": 1, "shuffle": True,
        "temperature": 1.6, "loss_agg_mode": "seq-mean-token-mean", "micro_batch_trajectories": 1,
        "gradient_checkpointing": False, "kl_coef": 0.0, "kl_type": "low_var_kl",
    },
    "rollout": {
        "prompts_per_step": 8, "group_size": 10, "action_chunk": 8, "action_dim": 7, "max_chunks": 64,
        "num_steps_wait": 10,
    },
    "policy": {"name": "small_vla", "path": None, "hidden_size": 64, "num_layers": 2, "image_size": 32,
               "observation": "image", "lora_r": 32, "lora_alpha": 32, "dtype": "float32"},
    "trainer": {
        "total_steps": 200, "val_every": 1, "val_episodes": 50, "val_decoders": ["greedy", "sample@1.0"],
        "val_sets": ["held_out"], "val_before_train": True, "save_every": 10, "diagnostics_every": 0, "output_dir": None, "seed": 0,
        "device": "auto", "num_threads": 0, "overwrite": False, "allow_partial_log": False, "overlap": False,
        "loggers": ["tensorboard"],
        "wandb_project": "pcm", "wandb_mode": None,
    },
    "env": {
        "suite": "libero_object", "task_ids": None, "val_init_states": 10, "camera": True, "num_workers": 0, "max_slots": 32,
        "ray_address": None, "step_timeout_s": 120.0, "ray_dashboard": False, "pipeline_groups": 2, "policy_threads": 0,
    },
    "resume": None,
}


def test_defaults_match_paper():
    assert config_to_dict(load_config()) == PAPER_DEFAULTS
    assert config_to_dict(load_config([])) == config_to_dict(PCMTrainConfig())


@pytest.mark.parametrize(
    "override, section, name, value",
    [
        ("pcm.budget=8", "pcm", "budget", 8),
        ("pcm.p_min=0.25", "pcm", "p_min", 0.25),
        ("actor.lr=3e-6", "actor", "lr", 3e-6),
        ("actor.weight_decay=1", "actor", "weight_decay", 1.0),
        ("actor.gradient_checkpointing=true", "actor", "gradient_checkpointing", True),
        ("actor.gradient_checkpointing=False", "actor", "gradient_checkpointing", False),
        ("pcm.strategy=top_phase", "pcm", "strategy", "top_phase"),
        ("trainer.output_dir='runs/a b'", "trainer", "output_dir", "runs/a b"),
        ("trainer.output_dir=runs/x=1", "trainer", "output_dir", "runs/x=1"),
        ("policy.path=/ckpt/sft", "policy", "path", "/ckpt/sft"),
        ("policy.path=null", "policy", "path", None),
        ("policy.path=None", "policy", "path", None),
        ("actor.clip_ratio_c=3", "actor", "clip_ratio_c", 3.0),
        ("actor.betas=[0.9,0.95]", "actor", "betas", (0.9, 0.95)),
        ("actor.betas=(0.8, 0.9)", "actor", "betas", (0.8, 0.9)),
        (" trainer.device = cuda:1 ", "trainer", "device", "cuda:1"),
        ("trainer.overlap=true", "trainer", "overlap", True),
    ],
)
def test_override_parses_by_field_type(override, section, name, value):
    parsed = getattr(getattr(load_config([override]), section), name)
    assert parsed == value and type(parsed) is type(value)


def test_later_override_wins():
    assert load_config(["pcm.budget=8", "pcm.budget=16"]).pcm.budget == 16


def test_paper_preset_sets_openvla_and_yields_to_explicit_overrides():
    config = load_config(["preset=paper"])
    assert config.preset == "paper"
    assert (config.policy.name, config.policy.dtype) == ("openvla_oft", "bfloat16")
    assert config.trainer.device == "cuda"
    assert config.pcm == load_config().pcm and config.rollout == load_config().rollout  # paper numbers already
    assert load_config(["policy.dtype=float32", "preset=paper"]).policy.dtype == "float32"


def test_unknown_keys_suggest_the_right_one():
    with pytest.raises(ConfigError, match=r"unknown config key 'pcm\.budgte'.*'pcm\.budget'"):
        load_config(["pcm.budgte=3"])
    with pytest.raises(ConfigError, match=r"'budget'.*did you mean 'pcm\.budget'"):
        load_config(["budget=3"])
    with pytest.raises(ConfigError, match=r"'actor\.seed'.*'trainer\.seed'"):
        load_config(["actor.seed=3"])
    with pytest.raises(ConfigError, match=r"unknown config key 'pcm\.budget\.x'"):
        load_config(["pcm.budget.x=3"])
    with pytest.raises(ConfigError, match="unknown config key 'zzz'"):
        load_config(["zzz=1"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("pcm.budget=abc", "pcm.budget expects an int, got 'abc'"),
        ("pcm.budget=1.5", "pcm.budget expects an int"),
        ("actor.lr=fast", "actor.lr expects a float"),
        ("actor.gradient_checkpointing=maybe", "actor.gradient_checkpointing expects a bool"),
        ("actor.betas=[0.9]", "actor.betas expects a list of 2 floats"),
        ("actor.betas=[0.9,x]", "actor.betas expects a list of 2 floats"),
        ("actor.clip_ratio_c=high", "actor.clip_ratio_c expects a float or null"),
        ("pcm=3", "pcm is a section"),
        ("pcm.budget", "must look like key=value"),
        ("=3", "must look like key=value"),
    ],
)
def test_malformed_overrides(override, message):
    with pytest.raises(ConfigError) as error:
        load_config([override])
    assert message in str(error.value)


@pytest.mark.parametrize(
    "override, key",
    [
        ("pcm.strategy=mask_all", "pcm.strategy"),
        ("pcm.budget=0", "pcm.budget"),
        ("pcm.refresh_every=0", "pcm.refresh_every"),
        ("pcm.p_min=0", "pcm.p_min"),
        ("pcm.p_min=1.5", "pcm.p_min"),
        ("pcm.num_phases=4", "pcm.num_phases"),
        ("pcm.close_above=2", "pcm.close_above"),
        ("pcm.gripper_signal=sensor", "pcm.gripper_signal"),
        ("pcm.gripper_signal=fingers", "pcm.gripper_signal=fingers needs an env that reports its fingers"),
        ("pcm.sustain=1.2", "pcm.sustain"),
        ("pcm.grip=-0.1", "pcm.grip"),
        ("pcm.low=nan", "pcm.low"),
        ("pcm.low=0.6", "pcm.low <= pcm.grip <= pcm.sustain"),
        ("pcm.grip=0.8", "pcm.low <= pcm.grip <= pcm.sustain"),
        ("pcm.window=-1", "pcm.window"),
        ("actor.clip_ratio_low=0", "actor.clip_ratio_low"),
        ("actor.clip_ratio_low=1", "actor.clip_ratio_low"),
        ("actor.clip_ratio_high=0", "actor.clip_ratio_high"),
        ("actor.clip_ratio_c=1", "actor.clip_ratio_c"),
        ("actor.lr=-1e-5", "actor.lr"),
        ("actor.betas=[0.9,1.0]", "actor.betas[1]"),
        ("actor.weight_decay=-0.1", "actor.weight_decay"),
        ("actor.grad_clip=0", "actor.grad_clip"),
        ("actor.ppo_epochs=0", "actor.ppo_epochs"),
        ("actor.temperature=0", "actor.temperature"),
        ("actor.loss_agg_mode=seq-sum", "actor.loss_agg_mode"),
        ("actor.ppo_mini_batch=0", "actor.ppo_mini_batch"),
        ("actor.ppo_mini_batch=3", "actor.ppo_mini_batch"),  # does not divide 8 prompts
        ("actor.lr=inf", "actor.lr"),
        ("actor.kl_coef=inf", "actor.kl_coef"),
        ("actor.kl_type=k9", "actor.kl_type"),
        ("pcm.estimator=ht", "pcm.estimator"),
        ("actor.micro_batch_trajectories=0", "actor.micro_batch_trajectories"),
        ("actor.kl_coef=-1", "actor.kl_coef"),
        ("rollout.prompts_per_step=0", "rollout.prompts_per_step"),
        ("rollout.group_size=1", "rollout.group_size"),
        ("rollout.action_chunk=0", "rollout.action_chunk"),
        ("rollout.action_dim=0", "rollout.action_dim"),
        ("rollout.max_chunks=0", "rollout.max_chunks"),
        ("rollout.num_steps_wait=-1", "rollout.num_steps_wait"),
        ("policy.name=", "policy.name"),
        ("policy.lora_r=-1", "policy.lora_r"),
        ("policy.lora_alpha=0", "policy.lora_alpha"),
        ("policy.dtype=int8", "policy.dtype"),
        ("trainer.total_steps=0", "trainer.total_steps"),
        ("trainer.val_every=-1", "trainer.val_every"),
        ("trainer.save_every=-1", "trainer.save_every"),
        ("trainer.diagnostics_every=-1", "trainer.diagnostics_every"),
        ("trainer.output_dir=", "trainer.output_dir"),
        ("trainer.seed=-1", "trainer.seed"),
        ("trainer.device=gpu", "trainer.device"),
        ("trainer.loggers=[tensorboard,mlflow]", "trainer.loggers[1]"),
        ("trainer.wandb_mode=cloud", "trainer.wandb_mode"),
        ("preset=fast", "preset"),
    ],
)
def test_out_of_range_values_name_their_key(override, key):
    with pytest.raises(ConfigError) as error:
        load_config([override])
    assert str(error.value).startswith(key)


def test_budget_covering_every_chunk_warns_it_is_full():
    with pytest.warns(UserWarning, match=r"pcm.budget \(64\) >= rollout.max_chunks \(64\).*pcm.strategy=full"):
        load_config(["pcm.budget=64"])


def test_kl_needs_lora_for_its_reference():
    with pytest.raises(ConfigError, match="actor.kl_coef > 0 needs LoRA"):
        load_config(["actor.kl_coef=0.01", "policy.lora_r=0"])
    assert load_config(["actor.kl_coef=0.01"]).actor.kl_coef == 0.01


def test_choice_errors_list_the_choices():
    with pytest.raises(ConfigError, match="'full', 'random', 'top_phase', 'pcm'"):
        load_config(["pcm.strategy=mask_all"])


def test_boundaries_that_are_allowed():
    config = load_config(["pcm.p_min=1", "pcm.window=0", "pcm.low=0.5", "policy.lora_r=0", "trainer.val_every=0"])
    assert (config.pcm.p_min, config.pcm.window, config.pcm.low) == (1.0, 0, 0.5)


def test_validate_checks_programmatic_configs():
    config = PCMTrainConfig()
    config.pcm.budget = "12"
    with pytest.raises(ConfigError, match="pcm.budget expects an int, got '12'"):
        validate(config)
    config = PCMTrainConfig()
    config.actor.gradient_checkpointing = 1
    with pytest.raises(ConfigError, match="actor.gradient_checkpointing expects a bool"):
        validate(config)
    config = PCMTrainConfig()
    config.actor.lr = math.nan
    with pytest.raises(ConfigError, match="actor.lr"):
        validate(config)
    config = PCMTrainConfig()
    config.actor.lr = 1  # an int is a valid float
    validate(config)


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_omegaconf_structured_round_trip():
    structured = OmegaConf.merge(OmegaConf.structured(PCMTrainConfig), OmegaConf.from_dotlist(["pcm.budget=8"]))
    config = OmegaConf.to_object(structured)
    validate(config)  # OmegaConf returns tuples as lists
    assert config.pcm.budget == 8 and list(config.actor.betas) == [0.9, 0.999]
    assert OmegaConf.to_container(OmegaConf.structured(load_config())) == {
        **PAPER_DEFAULTS, "actor": {**PAPER_DEFAULTS["actor"], "betas": [0.9, 0.999]}
    }


def test_new_sections_need_no_parser_change():
    @dataclasses.dataclass
    class EnvSection:
        suite: str = "libero_object"
        cameras: list[str] = dataclasses.field(default_factory=lambda: ["agentview"])
        max_steps: int | None = None

    @dataclasses.dataclass
    class ExtendedConfig(PCMTrainConfig):
        env: EnvSection = dataclasses.field(default_factory=EnvSection)

    config = ExtendedConfig()
    apply_overrides(config, ["env.suite=libero_10", "env.cameras=[agentview, wrist]", "env.max_steps=300"])
    validate(config)
    assert config.env == EnvSection("libero_10", ["agentview", "wrist"], 300)
    with pytest.raises(ConfigError, match="env.max_steps expects an int or null"):
        apply_overrides(config, ["env.max_steps=many"])
    with pytest.raises(ConfigError, match="'env.suit'.*'env.suite'"):
        apply_overrides(config, ["env.suit=x"])


def test_yaml_config_file_then_overrides(tmp_path):
    path = tmp_path / "my.yaml"
    path.write_text("preset: quick\npcm:\n  strategy: random\n  budget: 6\nactor: {lr: 2.0e-5, betas: [0.8, 0.9]}\n")
    config = load_config(["pcm.budget=5"], config_file=path)
    assert (config.preset, config.pcm.strategy, config.pcm.budget) == ("quick", "random", 5)  # override wins
    assert config.actor.lr == 2e-5 and config.actor.betas == (0.8, 0.9)
    assert config.rollout.prompts_per_step == 2  # from the file's preset
    assert config.policy.path == SFT_POLICY  # the preset's ${pcm_asset:...} resolved


def test_saved_config_yaml_loads_back_identically(tmp_path):
    config = load_config(["preset=quick", "pcm.budget=3", "actor.betas=[0.8,0.95]", "env.task_ids=[1,2]"])
    save_config(config, tmp_path / "config.yaml")
    assert load_config(config_file=tmp_path / "config.yaml") == config


@pytest.mark.parametrize("text, message", [
    ("pcm:\n  budgte: 3\n", r"unknown config key 'pcm\.budgte'.*'pcm\.budget'.*\(in .*bad\.yaml\)"),
    ("pcm:\n  budget: many\n", r"pcm\.budget expects an int.*\(in .*bad\.yaml\)"),
    ("pcm: [1, 2\n", r"bad\.yaml is not valid YAML"),
    ("- 1\n- 2\n", r"bad\.yaml must hold a mapping"),
    ("preset: fast\n", r"preset must be one of"),
])
def test_bad_config_files_name_the_file_and_key(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(config_file=path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(config_file=tmp_path / "missing.yaml")


def test_presets_are_yaml_files():
    assert set(PRESETS) >= {"quick", "quick_image", "paper", "study"}
    assert "policy.observation=state" in preset_overrides("study")
    assert load_config(["preset=study"]).actor.ppo_mini_batch == 4


def test_cli_config_flag():
    from pcm_train.run import split_config_file

    assert split_config_file(["--config", "a.yaml", "pcm.budget=3"]) == ("a.yaml", ["pcm.budget=3"])
    assert split_config_file(["--config=b.yaml"]) == ("b.yaml", [])
    with pytest.raises(ConfigError, match="--config needs a YAML file"):
        split_config_file(["--config"])
