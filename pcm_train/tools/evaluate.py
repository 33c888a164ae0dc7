"""Success of saved policies over decoders x prompt sets, per episode (``pcm_train.training.evaluation``).

    python -m pcm_train.evaluate policy=DIR [suite=libero_object|metaworld] [tasks=[0,1]]
                                 [decoders=[greedy,sample@1.0]] [sets=[held_out]] [episodes=0] [seed=0]
                                 [max_chunks=64] [val_init_states=10] [workers=0] [max_slots=32] [json=FILE]
    python -m pcm_train.evaluate before=DIR after=DIR ...      the two on the same episodes, paired
    python -m pcm_train.evaluate runs=DIR out=DIR [steps=[40,80]] ...   every run's kept policies

Decoders: ``greedy`` (what a user deploys) and ``sample@T`` for any T > 0. Sets: ``train`` (the
placements training draws from), ``held_out`` (placements training never draws: MetaWorld 50-99,
LIBERO the last ``val_init_states`` states) or explicit ids (``40-49``). ``episodes`` per decoder
and set; 0 runs every prompt of a set once. Prints one table (rows: sets, columns: decoders, each
rate with its 95% Wilson interval); ``json=FILE`` writes it with every episode's record (decoder,
set, task, placement, seed, success, episode_steps). Sampled episodes draw from their own seeded
streams, so another policy (``before``/``after``) or another call runs the same draws: the paired
difference per cell comes with Newcombe's 95% interval.

``runs=DIR``: every finished run directory below DIR (``config.json`` + ``checkpoints/``), the policies it kept
after ``steps`` updates (default: every checkpoint at a validation point of the run, and its starting
policy as step 0), each evaluated with the run's suite, tasks, ``rollout.max_chunks``,
``env.val_init_states`` and ``trainer.seed`` (so it repeats the run's own validation of a decoder and set
episode by episode, and every step of a run draws the same streams); one JSON per run and step in
``out/<run path>/step<k>.json``, skipped where it exists (a stopped call resumes). For runs laid out as
a study's (``<variant>/seed<k>``), ``out/summary.md`` and ``summary.json`` then give per set and decoder
the mean over seeds with its 95% t-interval for the start (step 0: the never-updated policy) and each
variant after each step, and paired per seed the change from the start and the difference to ``full``.
"""
from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from pcm_train.cli import run_command
from pcm_train.config import ConfigError, _at_least, parse_overrides
from pcm_train.training.evaluation import (NUM_INIT_STATES, check_set_name, paired_differences, parse_decoders,
                                           plan_episodes, resolve_set, run_episodes, success_counts,
                                           wilson_interval)


@dataclass
class EvalConfig:
    """Options of ``python -m pcm_train.evaluate`` (``key=value``)."""

    policy: Optional[str] = None  # a saved small-VLA directory
    before: Optional[str] = None  # with after: two policies compared on the same episodes
    after: Optional[str] = None
    runs: Optional[str] = None  # a folder of run directories: evaluate their kept policies
    out: Optional[str] = None  # with runs: where the per-run JSON files go
    steps: Optional[list[int]] = None  # with runs: trained steps to evaluate (None: every validation point)
    suite: str = "libero_object"
    tasks: Optional[list[int]] = None  # None = every task of the suite
    decoders: list[str] = field(default_factory=lambda: ["greedy", "sample@1.0"])
    sets: list[str] = field(default_factory=lambda: ["held_out"])
    episodes: int = 0  # per decoder and set; 0 = every prompt of a set once
    max_chunks: int = 64
    seed: int = 0
    workers: int = 0  # Ray env workers; 0 = one per core
    max_slots: int = 32  # envs in flight at once
    val_init_states: int = 10
    json: Optional[str] = None

    def validate(self) -> None:
        from pcm_train.envs.families import SUITES, list_tasks

        modes = [name for name, given in (("policy", self.policy), ("before/after", self.before or self.after),
                                          ("runs", self.runs)) if given]
        if len(modes) != 1:
            raise ConfigError("name one of policy=DIR, before=DIR after=DIR or runs=DIR"
                              + (f" (got {' and '.join(modes)})" if modes else ""))
        for key in ("policy", "before", "after"):
            value = getattr(self, key)
            if (value is not None or (key != "policy" and (self.before or self.after))) \
                    and not (value and (Path(value) / "config.json").is_file()):
                raise ConfigError(f"{key}=DIR must name a saved policy directory (with config.json), got {value!r}")
        if self.runs is not None:
            if not Path(self.runs).is_dir():
                raise ConfigError(f"runs=DIR must name a folder of run directories, got {self.runs!r}")
            if not self.out:
                raise ConfigError("runs=DIR needs out=DIR (where each run's evaluation is written)")
        elif self.out or self.steps is not None:
            raise ConfigError("out= and steps= go with runs=DIR")
        if self.steps is not None and (not self.steps or min(self.steps) < 0):
            raise ConfigError(f"steps must be a non-empty list of trained steps >= 0, got {self.steps}")
        if self.suite not in SUITES:
            raise ConfigError(f"suite must be one of {SUITES}, got {self.suite!r}")
        num_tasks = len(list_tasks(self.suite))
        if self.tasks is not None and (not self.tasks or not all(0 <= t < num_tasks for t in self.tasks)):
            raise ConfigError(f"tasks must be a non-empty list of ids in [0, {num_tasks}), got {self.tasks}")
        try:
            parse_decoders(self.decoders, "decoders")
            if not self.sets:
                raise ValueError("sets must name at least one prompt set, e.g. [held_out]")
            for index, name in enumerate(self.sets):
                check_set_name(name, f"sets[{index}]")
        except ValueError as error:
            raise ConfigError(str(error)) from None
        _at_least("episodes", self.episodes, 0)
        _at_least("max_chunks", self.max_chunks, 1)
        _at_least("workers", self.workers, 0)
        _at_least("max_slots", self.max_slots, 1)
        if not 1 <= self.val_init_states < NUM_INIT_STATES:
            raise ConfigError(f"val_init_states must lie in [1, {NUM_INIT_STATES}), got {self.val_init_states}")


@dataclass
class Plan:
    """What one evaluation runs: the suite's tasks and the episodes of every decoder x set."""

    suite: str
    tasks: list[int]
    max_chunks: int
    episodes: list  # PlannedEpisode


def make_plan(cfg: EvalConfig, suite: str | None = None, tasks: list[int] | None = None,
              max_chunks: int | None = None, val_init_states: int | None = None, seed: int | None = None) -> Plan:
    """The episodes ``cfg`` asks for (a run's own suite, tasks, chunks, held-out states and seed where given);
    ValueError naming the key for a set the suite lacks or repeating greedy episodes."""
    from pcm_train.envs.families import list_tasks

    suite = suite or cfg.suite
    tasks = list(tasks or cfg.tasks or [task.task_id for task in list_tasks(suite)])
    held = val_init_states or cfg.val_init_states
    sets = [resolve_set(name, suite, tasks, held, f"sets[{index}]") for index, name in enumerate(cfg.sets)]
    episodes = plan_episodes(parse_decoders(cfg.decoders), sets, tasks, cfg.episodes,
                             cfg.seed if seed is None else seed)
    return Plan(suite, tasks, max_chunks or cfg.max_chunks, episodes)


def open_pool(cfg: EvalConfig, plan: Plan, policy):
    """Ray env workers for ``plan`` and a policy of ``policy``'s observation mode and image size."""
    from pcm_train.envs.workers import EnvWorkerPool

    state_mode = policy.config.observation == "state"
    slots = min(len(plan.episodes), cfg.max_slots)
    workers = min(cfg.workers or os.cpu_count() or 1, slots)
    return EnvWorkerPool(workers, plan.suite, camera=not state_mode, image_size=policy.config.image_size,
                         privileged_state=state_mode, envs_per_worker=math.ceil(slots / workers),
                         max_steps=plan.max_chunks * policy.config.action_chunk)


def evaluate_policies(cfg: EvalConfig, paths: list[str], plan: Plan) -> list[list[dict]]:
    """Each saved policy of ``paths`` over ``plan`` (one env pool for all); their episode records."""
    from pcm_train.policies.small_vla import SmallVLA

    policies = [SmallVLA.from_pretrained(path) for path in paths]
    with open_pool(cfg, plan, policies[0]) as pool:
        threads = max(1, (os.cpu_count() or 1) - len(pool.workers))  # the cores the env workers leave free
        return [run_episodes(policy, pool, plan.episodes, max_chunks=plan.max_chunks, desc=f"evaluate {path}",
                             pipeline=2, policy_threads=threads)
                for path, policy in zip(paths, policies)]


def summarize(records: list[dict]) -> dict:
    """``{"<set>": {"<decoder>": {"successes", "episodes", "rate", "interval"}}}``."""
    out: dict[str, dict] = {}
    for (set_name, decoder), (wins, total) in success_counts(records).items():
        out.setdefault(set_name, {})[decoder] = {"successes": wins, "episodes": total, "rate": wins / total,
                                                 "interval": list(wilson_interval(wins, total))}
    return out


def table(summary: dict) -> str:
    """Markdown: rows = sets, columns = decoders, ``rate [low, high] (wins/episodes)``."""
    decoders = list(dict.fromkeys(d for cells in summary.values() for d in cells))
    lines = ["| set | " + " | ".join(decoders) + " |", "|---|" + "---|" * len(decoders)]
    for set_name, cells in summary.items():
        row = []
        for decoder in decoders:
            c = cells.get(decoder)
            row.append("—" if c is None else f"{c['rate']:.3f} [{c['interval'][0]:.3f}, {c['interval'][1]:.3f}] "
                                              f"({c['successes']}/{c['episodes']})")
        lines.append(f"| {set_name} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def paired_table(cells: dict) -> str:
    """Markdown of ``paired_differences``: before, after, after - before with its 95% interval."""
    lines = ["| set | decoder | episodes | before | after | after − before [95% CI] |", "|---|---|---|---|---|---|"]
    for (set_name, decoder), c in cells.items():
        lines.append(f"| {set_name} | {decoder} | {c['episodes']} | {c['before']:.3f} | {c['after']:.3f} | "
                     f"{c['difference']:+.3f} [{c['interval'][0]:+.3f}, {c['interval'][1]:+.3f}] |")
    return "\n".join(lines)


def run_policies(directory: Path, steps: list[int] | None) -> dict[int, Path]:
    """``{trained steps: policy dir}`` a run kept: its starting policy (0, when saved in the run) and the
    checkpoints after ``steps`` updates (default: every validation point the run's config names)."""
    config = json.loads((directory / "config.json").read_text())
    trainer = config["trainer"]
    found = {}
    start = Path(config["policy"]["path"]) if config["policy"].get("path") else directory / "base_policy"
    if (start / "config.json").is_file():
        found[0] = start
    for ckpt in sorted((directory / "checkpoints").glob("step_*")):
        if (ckpt / "policy" / "config.json").is_file():
            found[int(ckpt.name.split("_")[1]) + 1] = ckpt / "policy"
    if steps is None:
        every, total = trainer["val_every"], trainer["total_steps"]
        wanted = {0} | {k for k in found if every and (k % every == 0 or k == total)}
        return {k: found[k] for k in sorted(wanted & set(found))}
    missing = [k for k in steps if k not in found]
    if missing:
        raise ValueError(f"runs: {directory} kept no policy after {missing} steps (it has {sorted(found)})")
    return {k: found[k] for k in steps}


def evaluate_runs(cfg: EvalConfig) -> list[Path]:
    """``runs=DIR``: every run's kept policies -> ``out/<run>/step<k>.json``; returns the files written."""
    root, out = Path(cfg.runs), Path(cfg.out)
    directories = sorted(p.parent for p in root.rglob("config.json") if (p.parent / "checkpoints").is_dir())
    if not directories:
        raise ValueError(f"runs: no run directory (config.json + checkpoints/) below {root}")
    written = []
    for directory in directories:
        config = json.loads((directory / "config.json").read_text())
        latest = directory / "checkpoints" / "latest"
        last = int(latest.read_text().strip().split("_")[1]) + 1 if latest.is_file() else 0
        if last < config["trainer"]["total_steps"]:
            print(f"{directory}: skipped, not finished ({last} of {config['trainer']['total_steps']} steps)")
            continue
        plan = make_plan(cfg, config["env"]["suite"], config["env"]["task_ids"], config["rollout"]["max_chunks"],
                         config["env"]["val_init_states"], config["trainer"]["seed"])
        todo = {k: p for k, p in run_policies(directory, cfg.steps).items()
                if not (out / directory.relative_to(root) / f"step{k}.json").is_file()}
        if not todo:
            continue
        for (steps, path), records in zip(todo.items(), evaluate_policies(cfg, [str(p) for p in todo.values()], plan)):
            target = out / directory.relative_to(root) / f"step{steps}.json"
            target.parent.mkdir(parents=True, exist_ok=True)
            result = {"run": str(directory), "trained_steps": steps, "policy": str(path), "suite": plan.suite,
                      "tasks": plan.tasks, "max_chunks": plan.max_chunks, "seed": config["trainer"]["seed"],
                      "settings": asdict(cfg),
                      "summary": summarize(records), "records": records}
            target.write_text(json.dumps(result, indent=0))
            print(f"{directory} after {steps} steps:\n{table(result['summary'])}\n", flush=True)
            written.append(target)
    return written


def collect_run_results(out: Path) -> dict[str, dict[int, dict[int, list[dict]]]]:
    """``out/<variant>/seed<k>/step<n>.json`` -> ``{variant: {seed: {steps: records}}}``."""
    found: dict[str, dict[int, dict[int, list[dict]]]] = {}
    for path in sorted(Path(out).glob("*/seed*/step*.json")):
        variant, seed, steps = path.parent.parent.name, path.parent.name[4:], path.stem[4:]
        if seed.isdigit() and steps.isdigit():
            records = json.loads(path.read_text())["records"]
            found.setdefault(variant, {}).setdefault(int(seed), {})[int(steps)] = records
    return found


def _rates(records: list[dict]) -> dict[tuple[str, str], float]:
    return {cell: wins / total for cell, (wins, total) in success_counts(records).items()}


def _over_seeds(per_seed: dict[int, float]) -> dict:
    from pcm_train.tools.study_stats import t_interval

    mean, low, high, n = t_interval([per_seed[seed] for seed in sorted(per_seed)])
    return {"mean": mean, "low": low, "high": high, "seeds": n, "per_seed": dict(sorted(per_seed.items()))}


def runs_summary(results: dict[str, dict[int, dict[int, list[dict]]]]) -> dict:
    """Per prompt set and decoder, over seeds (95% t-intervals): the start (step 0 of a seed's runs: the
    never-updated policy, the frozen control, on that seed's streams), each variant after each evaluated
    step, and paired per seed its change from the start and (variants other than ``full``) its difference
    to ``full`` after the same steps."""
    start: dict[int, dict] = {}
    for seeds in results.values():
        for seed, by_step in seeds.items():
            if 0 in by_step:
                start.setdefault(seed, _rates(by_step[0]))
    rates = {variant: {steps: {seed: _rates(by_step[steps]) for seed, by_step in seeds.items() if steps in by_step}
                       for steps in sorted({k for by_step in seeds.values() for k in by_step} - {0})}
             for variant, seeds in results.items()}
    cells = dict.fromkeys(cell for by_cell in start.values() for cell in by_cell)
    cells.update(dict.fromkeys(cell for variant in rates.values() for per_seed in variant.values()
                               for by_cell in per_seed.values() for cell in by_cell))
    rows = []
    for cell in cells:
        if start:
            rows.append({"set": cell[0], "decoder": cell[1], "policy": "start", "steps": 0,
                         **_over_seeds({seed: r[cell] for seed, r in start.items() if cell in r})})
        for variant, by_steps in rates.items():
            for steps, per_seed in by_steps.items():
                values = {seed: r[cell] for seed, r in per_seed.items() if cell in r}
                row = {"set": cell[0], "decoder": cell[1], "policy": variant, "steps": steps, **_over_seeds(values),
                       "minus_start": _over_seeds({seed: v - start[seed][cell] for seed, v in values.items()
                                                   if cell in start.get(seed, {})})}
                full = rates.get("full", {}).get(steps, {})
                if variant != "full" and full:
                    row["minus_full"] = _over_seeds({seed: v - full[seed][cell] for seed, v in values.items()
                                                     if cell in full.get(seed, {})})
                rows.append(row)
    return {"rows": rows}


def _mean_interval(c: dict | None, signed: bool = False) -> str:
    if not c or not c["seeds"]:
        return "—"
    f = "{:+.3f}" if signed else "{:.3f}"
    text = f.format(c["mean"])
    return text if c["seeds"] < 2 else f"{text} [{f.format(c['low'])}, {f.format(c['high'])}]"


def runs_table(summary: dict) -> str:
    """Markdown of ``runs_summary``: one line per set, decoder, policy and step count."""
    lines = ["| set | decoder | policy | steps | seeds | success, mean over seeds [95% CI] | − start, paired "
             "| − full, paired |", "|---|---|---|---|---|---|---|---|"]
    for row in summary["rows"]:
        change = _mean_interval(row.get("minus_start"), True) if row["steps"] else ""
        versus_full = _mean_interval(row.get("minus_full"), True) if "minus_full" in row else ""
        lines.append(f"| {row['set']} | {row['decoder']} | {row['policy']} | {row['steps']} | {row['seeds']} "
                     f"| {_mean_interval(row)} | {change} | {versus_full} |")
    return "\n".join(lines)


def write_runs_summary(out: Path) -> list[Path]:
    """``out/summary.json`` and ``out/summary.md`` from every run evaluated into ``out``."""
    summary = runs_summary(collect_run_results(out))
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "summary.md").write_text(runs_table(summary) + "\n")
    return [out / "summary.json", out / "summary.md"]


def parse_args(argv: list[str]) -> EvalConfig:
    """``key=value`` overrides of EvalConfig; ConfigError for unknown keys or bad values."""
    return parse_overrides(EvalConfig, argv)


def main(argv: list[str] | None = None) -> int:
    return run_command(__doc__, _main, argv)


def _main(argv: list[str]) -> int:
    cfg = parse_args(argv)
    if cfg.runs:
        written = evaluate_runs(cfg) + write_runs_summary(Path(cfg.out))
        print((Path(cfg.out) / "summary.md").read_text())
        print("\n".join(str(p) for p in written))
        return 0
    plan = make_plan(cfg)
    if cfg.policy:
        [records] = evaluate_policies(cfg, [cfg.policy], plan)
        result = {"policy": cfg.policy, "summary": summarize(records), "settings": asdict(cfg), "records": records}
        print(table(result["summary"]))
    else:
        before, after = evaluate_policies(cfg, [cfg.before, cfg.after], plan)
        cells = paired_differences(before, after)
        result = {"before": {"policy": cfg.before, "summary": summarize(before), "records": before},
                  "after": {"policy": cfg.after, "summary": summarize(after), "records": after},
                  "paired": [{"set": s, "decoder": d, **c} for (s, d), c in cells.items()], "settings": asdict(cfg)}
        print(paired_table(cells))
    if cfg.json:
        Path(cfg.json).write_text(json.dumps(result, indent=0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
