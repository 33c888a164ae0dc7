"""Success of a policy over decoders x prompt sets, per episode: the trainer's validation and the evaluate tool.

A *decoder* is how actions are read from the policy: ``greedy`` (the most likely action bin, what
verl and SimpleVLA-RL validate with and what a user deploys) or ``sample@T`` (bins sampled at
temperature T; ``sample@1.0`` is the policy's own distribution, the RL temperature samples what
training saw). A *prompt set* is a list of placements every task starts from:

- ``train``: the placements training draws from (``0 .. 49 - val_init_states``);
- ``held_out``: placements training never draws (MetaWorld: the extra placements 50-99;
  LIBERO: the last ``val_init_states`` of each task's 50 initial states);
- an explicit list, ``"40-49"`` or ``"3,7,10-12"`` (ids checked against the suite).

Episode i of a set runs task ``tasks[i % n]`` from placement ``placements[(i // n) % P]``, so the
tasks take turns and the placements come in order; sampled episodes past ``n * P`` repeat a prompt
with a fresh seed. Each sampled episode draws from its own stream, seeded from (seed, task,
placement, repeat): its result does not depend on the batch, the decoder list, the slot count or
the policy evaluated, so two policies (or two steps of one run) are compared on the same draws.
"""
from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from pcm_train.training.rollout import Episode, collect_rollouts

NUM_INIT_STATES = 50  # LIBERO's initial states and MetaWorld's training-side placements per task
SET_NAMES = ("train", "held_out")  # named prompt sets; anything else must be an explicit id list
_EXPLICIT = re.compile(r"\d+(-\d+)?(,\d+(-\d+)?)*")
_SEED_TAG = 0x5641_4C31  # keeps evaluation streams apart from training's episode_seed(seed, step, index)


@dataclass(frozen=True)
class Decoder:
    """``greedy`` (temperature None) or ``sample@T``."""

    name: str
    temperature: float | None

    @property
    def greedy(self) -> bool:
        return self.temperature is None


@dataclass(frozen=True)
class PromptSet:
    """A named list of placements, the same for every task."""

    name: str
    placements: tuple[int, ...]


def parse_decoder(text: str, key: str = "decoders") -> Decoder:
    """``"greedy"`` or ``"sample@T"`` (T > 0) -> Decoder; ValueError naming ``key`` otherwise."""
    text = str(text).strip()
    if text == "greedy":
        return Decoder("greedy", None)
    head, at, value = text.partition("@")
    if head != "sample" or not at:
        raise ValueError(f"{key}: unknown decoder {text!r}; expected 'greedy' or 'sample@T' (e.g. sample@1.0)")
    try:
        temperature = float(value)
    except ValueError:
        raise ValueError(f"{key}: decoder {text!r} needs a number after 'sample@', e.g. sample@1.0") from None
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"{key}: decoder {text!r} needs a temperature > 0, got {value}")
    return Decoder(f"sample@{temperature:g}" if temperature != int(temperature) else f"sample@{temperature:.1f}",
                   temperature)


def parse_decoders(texts: Iterable[str], key: str = "decoders") -> list[Decoder]:
    """A non-empty list of distinct decoders."""
    decoders = [parse_decoder(text, f"{key}[{index}]") for index, text in enumerate(texts)]
    if not decoders:
        raise ValueError(f"{key} must name at least one decoder, e.g. [greedy,sample@1.0]")
    names = [d.name for d in decoders]
    if len(set(names)) < len(names):
        raise ValueError(f"{key} names a decoder twice: {names}")
    return decoders


def check_set_name(text: str, key: str = "sets") -> None:
    """ValueError unless ``text`` is ``train``, ``held_out`` or an explicit id list (suite not checked)."""
    if text not in SET_NAMES and not _EXPLICIT.fullmatch(str(text)):
        raise ValueError(f"{key}: unknown prompt set {text!r}; expected one of {list(SET_NAMES)} or placement "
                         "ids such as '40-49' or '3,7,10-12'")


def resolve_set(text: str, suite: str, tasks: Sequence[int], val_init_states: int, key: str = "sets") -> PromptSet:
    """The placements of set ``text`` in ``suite``; ValueError naming ``key`` for an unknown or empty set or one
    with ids the suite does not have (LIBERO has no placements 50-99)."""
    from pcm_train.envs.families import check_init_state, held_out_init_states

    check_set_name(text, key)
    if text == "train":
        placements = tuple(range(NUM_INIT_STATES - val_init_states))
    elif text == "held_out":
        extra = tuple(held_out_init_states(suite, tasks[0]))
        placements = extra or tuple(range(NUM_INIT_STATES - val_init_states, NUM_INIT_STATES))
    else:
        placements = _explicit_ids(text, key)
        for task in tasks:
            for placement in (min(placements), max(placements)):
                try:
                    check_init_state(suite, task, placement)
                except ValueError as error:
                    raise ValueError(f"{key}: set {text!r} is not in {suite}: {error}") from None
    return PromptSet(text, placements)


def _explicit_ids(text: str, key: str) -> tuple[int, ...]:
    ids: list[int] = []
    for part in text.split(","):
        low, _, high = part.partition("-")
        first, last = int(low), int(high or low)
        if last < first:
            raise ValueError(f"{key}: set {text!r} has an empty range {part!r} (write low-high)")
        ids.extend(range(first, last + 1))
    if len(set(ids)) < len(ids):
        raise ValueError(f"{key}: set {text!r} names a placement twice")
    return tuple(ids)


def eval_seed(seed: int, task: int, placement: int, repeat: int) -> int:
    """The seed of a sampled evaluation episode's own stream (uint64 from NumPy's SeedSequence)."""
    return int(np.random.SeedSequence([seed, _SEED_TAG, task, placement, repeat]).generate_state(1, np.uint64)[0])


@dataclass(frozen=True)
class PlannedEpisode:
    """One evaluation episode: where it starts, which decoder, its stream (None for greedy)."""

    decoder: Decoder
    set_name: str
    task: int
    placement: int
    seed: int | None


def plan_episodes(decoders: Sequence[Decoder], sets: Sequence[PromptSet], tasks: Sequence[int], episodes: int,
                  seed: int, key: str = "episodes") -> list[PlannedEpisode]:
    """Every decoder x set x episode, decoder-major. ``episodes`` per decoder and set (0 = each prompt of the set
    once). ValueError naming ``key`` when a greedy decoder would repeat a prompt (it would repeat its result)."""
    if not tasks:
        raise ValueError("tasks must not be empty")
    if episodes < 0:
        raise ValueError(f"{key} must be >= 0 (0 = every prompt of a set once), got {episodes}")
    planned = []
    for decoder in decoders:
        for prompt_set in sets:
            distinct = len(tasks) * len(prompt_set.placements)
            count = episodes or distinct
            if decoder.greedy and count > distinct:
                raise ValueError(f"{key} ({count}) is more than the {distinct} distinct prompts of set "
                                 f"{prompt_set.name!r} ({len(tasks)} tasks x {len(prompt_set.placements)} "
                                 "placements): a greedy episode would repeat its result; lower it or sample")
            for index in range(count):
                task = tasks[index % len(tasks)]
                turn = index // len(tasks)
                placement = prompt_set.placements[turn % len(prompt_set.placements)]
                repeat = turn // len(prompt_set.placements)
                planned.append(PlannedEpisode(decoder, prompt_set.name, task, placement,
                                              None if decoder.greedy else eval_seed(seed, task, placement, repeat)))
    return planned


def run_episodes(policy, pool, planned: Sequence[PlannedEpisode], *, max_chunks: int, desc: str = "evaluate",
                 **rollout_options) -> list[dict]:
    """Rolls ``planned`` out (one ``collect_rollouts`` per decoder); one record per episode, in order:
    ``{decoder, set, task, placement, seed, success, episode_steps}`` (episode_steps: chunks run)."""
    records = []
    for decoder in dict.fromkeys(p.decoder for p in planned):
        part = [p for p in planned if p.decoder == decoder]
        episodes = [Episode(p.task, p.placement, f"{p.set_name}/{i}", seed=p.seed) for i, p in enumerate(part)]
        batch = collect_rollouts(policy, pool, episodes, max_chunks=max_chunks,
                                 temperature=decoder.temperature or 1.0, greedy=decoder.greedy,
                                 desc=f"{desc} ({decoder.name})", **rollout_options)
        for p, done, steps in zip(part, batch.batch["complete"].tolist(), batch.batch["finish_step"].tolist()):
            records.append({"decoder": decoder.name, "set": p.set_name, "task": p.task, "placement": p.placement,
                            "seed": p.seed, "success": bool(done), "episode_steps": int(steps)})
    return records


def success_counts(records: Iterable[dict]) -> dict[tuple[str, str], tuple[int, int]]:
    """``{(set, decoder): (successes, episodes)}`` in first-seen order."""
    counts: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    for record in records:
        cell = counts[record_cell(record)]
        cell[0] += bool(record["success"])
        cell[1] += 1
    return {cell: (wins, total) for cell, (wins, total) in counts.items()}


def rate_metrics(records: Iterable[dict], prefix: str = "val") -> dict[str, float]:
    """``{"<prefix>/<set>/<decoder>/success_rate": rate}`` for a metrics row."""
    return {metric_key(set_name, decoder, prefix): wins / total
            for (set_name, decoder), (wins, total) in success_counts(records).items()}


def metric_key(set_name: str, decoder: str, prefix: str = "val") -> str:
    return f"{prefix}/{set_name}/{decoder}/success_rate"


def wilson_interval(successes: int, trials: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial rate ((0, 1) for no trials)."""
    if trials == 0:
        return (0.0, 1.0)
    rate = successes / trials
    centre = (rate + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * math.sqrt(rate * (1 - rate) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return (max(0.0, centre - half), min(1.0, centre + half))


def paired_interval(before: Sequence[bool], after: Sequence[bool], z: float = 1.96) -> tuple[float, float, float]:
    """(after - before success rate, 95% interval) over episodes paired one to one: Bonett and Price's
    adjusted Wald interval for a difference of paired proportions (one success and one failure added to the
    discordant pairs' counts), which keeps its coverage with few discordant pairs and never collapses to a
    point."""
    if len(before) != len(after) or not before:
        raise ValueError(f"paired_interval needs two equally long, non-empty outcome lists, got {len(before)} "
                         f"and {len(after)}")
    b = np.asarray(before, dtype=bool)
    a = np.asarray(after, dtype=bool)
    n = len(a)
    gained, lost = int((a & ~b).sum()), int((~a & b).sum())  # the discordant pairs
    p_gained, p_lost = (gained + 1) / (n + 2), (lost + 1) / (n + 2)
    centre = p_gained - p_lost
    half = z * math.sqrt((p_gained + p_lost - centre ** 2) / (n + 2))
    return (gained - lost) / n, max(-1.0, centre - half), min(1.0, centre + half)


def episode_key(record: dict) -> tuple:
    """What makes two records the same episode: decoder, set, prompt and stream."""
    set_name, decoder = record_cell(record)
    return (decoder, set_name, record["task"], record["placement"], record.get("seed"))


def paired_differences(before: Sequence[dict], after: Sequence[dict]) -> dict[tuple[str, str], dict]:
    """Per (set, decoder) both have: ``{"before", "after", "difference", "interval", "episodes"}``, pairing
    episodes by ``episode_key``. ValueError if an episode appears twice or a cell's episodes do not match."""
    def index(records, name):
        table = {}
        for record in records:
            if episode_key(record) in table:
                raise ValueError(f"{name}: episode {episode_key(record)} appears twice")
            table[episode_key(record)] = bool(record["success"])
        return table

    first, second = index(before, "before"), index(after, "after")
    cells = {}
    for cell in success_counts(before):
        set_name, decoder = cell
        keys = [k for k in first if (k[1], k[0]) == cell]
        other = [k for k in second if (k[1], k[0]) == cell]
        if not other:
            continue
        if set(keys) != set(other):
            raise ValueError(f"before and after ran different episodes for set {set_name!r}, decoder {decoder!r} "
                             "(evaluate both with the same tasks, sets, episodes and seed)")
        diff, low, high = paired_interval([first[k] for k in keys], [second[k] for k in keys])
        cells[cell] = {"before": float(np.mean([first[k] for k in keys])),
                       "after": float(np.mean([second[k] for k in keys])),
                       "difference": diff, "interval": [low, high], "episodes": len(keys)}
    return cells


def record_cell(row: dict) -> tuple[str, str]:
    """(set, decoder) of a ``validation.jsonl`` row; rows written before decoders and sets were recorded
    come from the greedy validation on held-out prompts."""
    return row.get("set", "held_out"), row.get("decoder", "greedy")


def validation_curves(rows: Iterable[dict]) -> dict[tuple[str, str], list[tuple[int, float, int]]]:
    """``validation.jsonl`` rows -> ``{(set, decoder): [(trained_steps, success rate, episodes), ...]}`` by
    trained steps (rows without ``trained_steps`` count ``step + 1``)."""
    counts: dict[tuple[str, str], dict[int, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    for row in rows:
        cell = counts[record_cell(row)][row.get("trained_steps", row["step"] + 1)]
        cell[0] += bool(row["success"])
        cell[1] += 1
    return {key: [(steps, wins / total, total) for steps, (wins, total) in sorted(points.items())]
            for key, points in counts.items()}


def held_out_greedy_rate(row: dict) -> float | None:
    """A ``metrics.jsonl`` row's greedy success on held-out prompts (``val/success_rate`` in rows written
    before decoders and sets were recorded); None where the step did not validate it."""
    value = row.get(metric_key("held_out", "greedy"))
    return row.get("val/success_rate") if value is None else value
