"""``python -m bench.gpu_check --dry-run`` (every GPU step's code on the CPU, tiny sizes, interpreter) and
the update comparison's memory plan (``pcm_train.tools.compare_update``): estimator, guard, chunk micro-batches."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pcm_kernels as pk
from pcm_train.tools import compare_update as cu
from pcm_train.runtime.memory import SavedActivations

ROOT = Path(__file__).resolve().parent.parent
STEPS = ("environment", "labels", "sampling", "plackett_luce", "packing", "overflow", "bandwidth", "select_latency",
         "attention", "update_comparison", "update_probe")


def _gpu_check(tmp_path, *flags, env_extra=None, timeout=600):
    report, result_json = tmp_path / "report.md", tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PCM_KERNELS_BACKEND")}
    env.update(env_extra or {})
    run = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--dry-run", "--report", str(report),
                          "--json", str(result_json), *flags], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=timeout)
    data = json.loads(result_json.read_text())
    return run, report.read_text(), {s["name"]: s for s in data["steps"]}, data["meta"]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One dry run of every step, after three injected steps that fail, hang past their timeout and crash."""
    return _gpu_check(tmp_path_factory.mktemp("gpu_check"), "--inject-step", "injected_fail=fail",
                      "--inject-step", "injected_timeout=timeout", "--timeout", "injected_timeout=3",
                      "--inject-step", "injected_crash=crash")


def test_dry_run_runs_every_step_and_writes_the_report(dry_run):
    run, report, steps, meta = dry_run
    assert meta["dry_run"] and list(steps)[3:] == list(STEPS), list(steps)
    expected_skip = set() if "verl" in sys.modules or _importable("verl") else {"update_comparison"}
    for name in STEPS:
        wanted = "skip" if name in expected_skip else "pass"
        assert steps[name]["status"] == wanted, (name, steps[name].get("summary"), steps[name].get("error"),
                                                 steps[name].get("log_tail", "")[-2000:])
        assert f"| {name} | {wanted} |" in report
    assert report.startswith("## GPU check dry run: CPU smoke, TRITON_INTERPRET=1")
    assert "| step | status | s | result | targets |" in report and "Details:" in report
    assert "packed attention path: sdpa_padded" in steps["attention"]["summary"]
    assert steps["labels"]["figures"]["labels_compared"] > 0
    assert steps["sampling"]["figures"]["rows_identical"] > 0
    probe = steps["update_probe"]["figures"]
    assert probe["pcm"]["chunks"] < probe["simplevla_rl"]["chunks"]
    assert "report:" in run.stderr and report.strip() in run.stdout


def test_a_failing_hanging_or_crashing_step_is_recorded_and_the_others_run(dry_run):
    run, report, steps, _ = dry_run
    assert run.returncode == 1, "failed, timed-out or crashed steps make the exit status 1"
    assert steps["injected_fail"]["status"] == "fail" and "injected failure" in steps["injected_fail"]["error"]
    assert steps["injected_timeout"]["status"] == "timeout"
    assert steps["injected_timeout"]["seconds"] < 30 and "3 s timeout" in steps["injected_timeout"]["summary"]
    assert steps["injected_crash"]["status"] == "crash" and "status 3" in steps["injected_crash"]["summary"]
    assert "| injected_fail | fail |" in report and "| injected_timeout | timeout |" in report
    assert "3 failed" not in report and "1 failed, " in report and "1 timed out, 1 crashed" in report
    assert steps["labels"]["status"] == "pass", "later steps still run"


def _importable(name):
    import importlib.util

    return importlib.util.find_spec(name) is not None


def test_without_verl_and_peft_the_update_comparison_skips_and_the_probe_runs(tmp_path):
    """The lent GPU machine has no verl (nor Ray) and maybe no peft: the comparison says why it skips, the
    verl-free probe trains the decoder's norm weights instead of LoRA."""
    run, report, steps, _ = _gpu_check(tmp_path, "--only", "environment,update_comparison,update_probe",
                                       env_extra={"PCM_GPU_CHECK_BLOCK_IMPORTS": "verl,peft"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert steps["environment"]["status"] == "pass" and steps["environment"]["figures"]["verl"] is None
    assert any("verl" in line for line in steps["environment"]["details"])
    skipped = steps["update_comparison"]
    assert skipped["status"] == "skip" and "missing verl" in skipped["summary"], skipped
    probe = steps["update_probe"]
    assert probe["status"] == "pass", probe.get("error")
    assert "RMSNorm" in probe["figures"]["trained"] and "| update_comparison | skip |" in report


# ----- compare_update's memory plan -----

def test_estimator_matches_measured_saved_activations():
    """The per-token-per-layer profile (1- and 2-layer slices) predicts what a 3-layer policy's packed
    forward saves, with and without gradient checkpointing."""
    for checkpointing in (False, True):
        args = cu.parse_args(["--hidden", "64", "--layers", "3"] + (["--gradient-checkpointing"] if checkpointing
                                                                    else []))
        plan = cu.memory_plan(args)
        policy = cu._policy(args)
        policy.train()
        K = 4
        ids, attn = policy.encode_prompts(["pick up the alphabet soup and place it in the basket"] * K)
        prompts = pk.gather_chunks(ids.view(K, 1, -1), torch.zeros(K, 1, dtype=torch.int64),
                                   attn.sum(-1).view(K, 1))
        cfg = policy.config
        with SavedActivations(policy) as saved:
            logits = policy.action_logits_packed(prompts.values, prompts.cu_seqlens,
                                                 torch.rand(K, cfg.image_channels, cfg.image_size, cfg.image_size))
            policy.log_probs(logits, torch.randint(cfg.action_token_start, cfg.vocab_size,
                                                   (K, cfg.num_action_tokens)), 1.6)
        estimate = plan["estimate"]
        estimate.tokens_per_micro_batch = K * plan["tokens_per_chunk"]
        assert plan["tokens_per_chunk"] == prompts.values.numel() // K + cfg.num_patches + cfg.num_action_tokens + 1
        assert saved.bytes == pytest.approx(estimate.saved_in_forward(checkpointing), rel=0.15), checkpointing


def test_memory_plan_arithmetic_at_the_7b_shapes():
    """284 KiB per token per layer (measured on a bf16 LoRA slice of Llama-7B): one 64-chunk trajectory
    (64 x 337 tokens, 32 layers) needs ~187 GiB without checkpointing, ~11 GiB with it."""
    base = ["--policy", "openvla_oft", "--real-size", "--dtype", "bfloat16", "--activation-kib", "284",
            "--max-memory-gb", "80"]
    plan = cu.memory_plan(cu.parse_args(base))
    est, tokens = plan["estimate"], 64 * 337
    assert plan["tokens_per_chunk"] == 337 and est.tokens_per_micro_batch == tokens and est.layers == 32
    assert est.gradient_checkpointing and plan["fits"] and "gradient checkpointing on" in plan["settings"]
    layers_only = tokens * 32 * 284 * 1024
    assert layers_only / 2**30 == pytest.approx(186.9, abs=0.1)
    assert est.activations(False) == pytest.approx(layers_only + tokens * est.logits_per_token)
    kept = tokens * 32 * 4096 * 2  # each layer's bf16 input
    assert est.activations(True) == pytest.approx(kept + tokens * 284 * 1024 + tokens * est.logits_per_token)
    assert 10.5 < est.activations(True) / 2**30 < 11.5
    assert 13.5 < est.weights / 2**30 < 15  # ~7.5e9 bf16 parameters
    assert est.total(True) < 80 * 2**30 < est.total(False)
    # one trajectory per micro-batch without checkpointing: refused before anything is allocated
    refused = cu.memory_plan(cu.parse_args(base + ["--no-gradient-checkpointing", "--micro-batch", "1"]))
    assert not refused["fits"] and "REFUSED" in cu.describe_plan(refused)
    # --real-size without a micro-batch flag: chunk micro-batches that fit
    args = cu.parse_args(base + ["--no-gradient-checkpointing"])
    chosen = cu.memory_plan(args)
    assert chosen["fits"] and 1 <= args.micro_batch_chunks < 64 and chosen["estimate"].total() <= 80 * 2**30
    assert f"at most {args.micro_batch_chunks} chunks" in chosen["settings"]


def test_guard_refuses_before_allocating(monkeypatch, capsys):
    def no_policy(args):
        raise AssertionError("the policy must not be built")

    monkeypatch.setattr(cu, "_policy", no_policy)
    assert cu.main(["--max-memory-gb", "0.0001", "--activation-kib", "4", "--json"]) == 2
    err = capsys.readouterr().err
    assert "REFUSED" in err and "refusing to start" in err
    for part in ("weights", "LoRA/trainable + grads + AdamW", "rollout batch", "KiB per token per layer",
                 "tokens per micro-batch", "without checkpointing", "with checkpointing"):
        assert part in err, part


def test_chunk_micro_batches_give_the_trajectory_micro_batch_update():
    pytest.importorskip("verl")
    from pcm_train.algorithm.actor import make_optimizer, update_actor
    from pcm_train.tools.synthetic import synthetic_rollout_batch

    args = cu.parse_args(["--hidden", "32", "--layers", "1", "--chunks", "8", "--num-prompts", "2",
                          "--group-size", "2", "--ppo-mini-batch", "1", "--repeats", "1"])
    policy = cu._policy(args)
    batch = synthetic_rollout_batch(policy, num_prompts=2, group_size=2, num_chunks=8, seed=0)
    cfg, kept, _, _ = cu._kept_batches(policy, batch, args)
    start = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
    after = []
    for chunks in (None, 3):
        with torch.no_grad():
            for n, p in policy.named_parameters():
                if n in start:
                    p.copy_(start[n])
        optimizer = make_optimizer(policy, cfg.actor)
        generator = torch.Generator().manual_seed(0)
        if chunks is None:
            stats, _, _ = update_actor(policy, optimizer, kept["full"], cfg.actor, mini_batch_trajectories=2,
                                       generator=generator)
        else:
            stats = cu.update_in_chunk_micro_batches(policy, optimizer, kept["full"], cfg.actor, chunks,
                                                     mini_batch_trajectories=2, generator=generator)
        after.append(({n: p.detach().clone() for n, p in policy.named_parameters() if n in start}, stats))
    (ref, ref_stats), (got, got_stats) = after
    assert got_stats.optimizer_steps == ref_stats.optimizer_steps == 2
    assert (got_stats.chunks, got_stats.tokens) == (ref_stats.chunks, ref_stats.tokens)
    assert got_stats.loss == pytest.approx(ref_stats.loss, rel=1e-5, abs=1e-7)
    assert got_stats.activation_bytes < ref_stats.activation_bytes, "smaller micro-batches save less at once"
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(ref[n], start[n]) for n in ref), "the update must move the weights"
