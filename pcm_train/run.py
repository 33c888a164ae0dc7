"""Train a VLA policy with GRPO (+ PCM) on LIBERO.

    python -m pcm_train.run [--config my.yaml] [key=value ...]

With no arguments it runs the built-in default (``preset=quick``): LIBERO-Object,
the shipped small VLA in state mode, a few short steps that fit a 2-core CPU machine. Naming
another policy without a preset (``policy.name=openvla_oft policy.path=CKPT``) keeps quick's run
size but not its policy settings: the paper's observation mode (images, rendered envs) and
LoRA r = 32 unless set. ``preset=paper`` is the paper's configuration (OpenVLA-OFT on GPUs). Any config key can be set,
e.g. ``pcm.strategy=full pcm.budget=8 trainer.total_steps=20
trainer.output_dir=runs/full``. ``resume=RUN_DIR`` continues a run from its last
checkpoint (its saved config, then your overrides). Ctrl-C saves and exits.
``--config FILE`` reads a YAML file of sections (``pcm:``, ``actor:``, ``rollout:``, ...; the
presets in ``pcm_train/configs/`` and every run's ``config.yaml`` are such files), then the
overrides on top, as in verl.

Several GPUs: ``torchrun --nproc_per_node=K -m pcm_train.run ...``. Every rank rolls
out its share of a step's episodes with its own Ray env workers; rank 0 gathers them,
runs the controller once and broadcasts the kept chunks; each rank trains its share of
the trajectories and the gradients are summed, so K GPUs train as one
(``pcm_train.runtime.distributed``). Run
directories must be on a filesystem every rank can read.
Outputs in the run directory: ``metrics.jsonl``, ``validation.jsonl`` (every validation episode),
``tensorboard/``, ``checkpoints/``, ``report/`` (plots and summary.md). At the end it prints the
validation of the starting policy and of the last one on the same episodes, per prompt set and decoder
(``trainer.val_sets``, ``trainer.val_decoders``: held-out prompts, greedy and sampled at T = 1.0 by
default), with the change and its 95% interval.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from pcm_train.cli import run_command
from pcm_train.config import ConfigError, PCMTrainConfig, config_to_dict, load_config

DEFAULT_PRESET = "quick"
# What the default preset sets for its shipped small VLA (state mode, camera-less envs, no LoRA, its
# weights). A run that names another policy and no preset leaves these at their defaults unless it sets them.
SHIPPED_POLICY_KEYS = ("policy.path", "policy.observation", "policy.lora_r", "env.camera")


def _flatten(prefix: str, value) -> list[str]:
    if isinstance(value, dict):
        return [item for k, v in value.items() for item in _flatten(f"{prefix}{k}.", v)]
    if value is None:
        text = "null"
    elif isinstance(value, (list, tuple)):
        text = "[" + ",".join(str(v) for v in value) + "]"
    else:
        text = str(value)
    return [f"{prefix[:-1]}={text}"]


def resolve_overrides(argv: list[str], config_file: str | None = None) -> list[str]:
    """The user's overrides, after the saved config of ``resume=DIR`` or the default preset (none
    with a ``--config`` file: the file names its preset, if any). With the default preset, naming a
    policy other than small_vla resets the ``SHIPPED_POLICY_KEYS`` the user did not set to their
    defaults: ``policy.name=openvla_oft`` runs on images from rendered envs with LoRA r = 32."""
    keys = [a.partition("=")[0].strip() for a in argv]
    if "resume" in keys:
        run_dir = Path(argv[keys.index("resume")].partition("=")[2].strip())
        saved = run_dir / "config.json"
        if not saved.is_file():
            raise ConfigError(f"resume={run_dir}: no config.json there (not a pcm_train run directory)")
        try:
            config = json.loads(saved.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ConfigError(f"resume={run_dir}: {saved} is not valid JSON ({error}); it is truncated or "
                              "corrupt: restore it, e.g. from a checkpoint's trainer_state.pt 'config'") from None
        if not isinstance(config, dict):
            raise ConfigError(f"resume={run_dir}: {saved} holds no configuration (expected a JSON object)")
        config.pop("resume", None)
        preset = config.pop("preset", None)
        base = [f"preset={'null' if preset is None else preset}"] + _flatten("", config)
        return base + argv
    if "preset" in keys or config_file is not None:
        return argv
    names = [a.partition("=")[2].strip() for a, key in zip(argv, keys) if key == "policy.name"]
    base = [f"preset={DEFAULT_PRESET}"]
    if names and names[-1] != "small_vla":
        defaults = dict(item.split("=", 1) for item in _flatten("", config_to_dict(PCMTrainConfig())))
        base += [f"{key}={defaults[key]}" for key in SHIPPED_POLICY_KEYS if key not in keys]
    return base + argv


def split_config_file(argv: list[str]) -> tuple[str | None, list[str]]:
    """(``--config FILE`` or ``--config=FILE``, the other arguments)."""
    config_file, rest = None, []
    items = iter(argv)
    for arg in items:
        if arg == "--config":
            config_file = next(items, None)
            if config_file is None:
                raise ConfigError("--config needs a YAML file: --config my.yaml")
        elif arg.startswith("--config="):
            config_file = arg.partition("=")[2]
        else:
            rest.append(arg)
    return config_file, rest


def _check_device(name: str) -> None:
    import torch

    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"trainer.device={name} but this machine has no CUDA device; use trainer.device=cpu")


def validation_change(run_dir: Path) -> str | None:
    """The run's validation of its starting policy and of its last validated one, per prompt set and decoder,
    paired episode by episode: a markdown table with the change and its 95% interval (None without both)."""
    from pcm_train.tools.evaluate import paired_table
    from pcm_train.training.evaluation import paired_differences
    from pcm_train.training.metrics_log import VALIDATION_FILE, read_metrics

    path = run_dir / VALIDATION_FILE
    rows = read_metrics(path) if path.is_file() else []
    steps = sorted({row["trained_steps"] for row in rows})
    if len(steps) < 2 or steps[0] != 0:
        return None
    before = [row for row in rows if row["trained_steps"] == 0]
    after = [row for row in rows if row["trained_steps"] == steps[-1]]
    return (f"validation success before training and after {steps[-1]} steps (the same episodes; greedy is what "
            f"a deployed policy does):\n{paired_table(paired_differences(before, after))}")


def main(argv: list[str] | None = None) -> int:
    return run_command(__doc__, _main, argv)


def _main(argv: list[str]) -> int:
    config_file, argv = split_config_file(argv)
    cfg = load_config(resolve_overrides(argv, config_file), config_file=config_file)
    _check_device(cfg.trainer.device)  # before the slow imports below
    from pcm_train.runtime.distributed import init_distributed
    from pcm_train.training.trainer import Trainer, make_env_pool

    dist_info = init_distributed()
    if cfg.env.camera and dist_info.is_main:
        from pcm_train.envs.libero import choose_renderer

        choose_renderer()
    trainer = Trainer(cfg, make_env_pool, dist_info)
    if dist_info.is_main:
        print(f"run directory: {trainer.run_dir.resolve()}", file=sys.stderr)
    try:
        finished = trainer.run()
    finally:
        trainer.close()
    if not dist_info.is_main:
        return 0 if finished else 130
    from pcm_train.tools.report import write_report

    try:
        report = write_report([trainer.run_dir])
    except ValueError:
        report = []
    change = validation_change(trainer.run_dir)
    if change:
        print(change)
    print(f"{'finished' if finished else 'stopped'} at step {trainer.step}; outputs in {trainer.run_dir.resolve()}:")
    for path in [trainer.run_dir / "metrics.jsonl", trainer.run_dir / "checkpoints", *report]:
        print(f"  {path}")
    return 0 if finished else 130


if __name__ == "__main__":
    sys.exit(main())
