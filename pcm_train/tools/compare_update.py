"""What will PCM save on my model? Full vs PCM actor updates on the same policy and batch.

    python -m pcm_train.compare_update [--budget 12] [--num-prompts 2] [--group-size 4]
        [--hidden 64] [--layers 2] [--device cpu|cuda] [--repeats 3] [--json]
        [--policy openvla_oft --checkpoint DIR | --policy openvla_oft --real-size]
        [--[no-]gradient-checkpointing] [--micro-batch T | --micro-batch-chunks K] [--max-memory-gb G]

Builds a rollout-shaped batch (realistic gripper phases, mixed success in every
group), then times three updates from identical starting weights: SimpleVLA-RL's
(every chunk, padding included), ``full`` (every valid chunk) and ``pcm`` (B per
trajectory), each ``--ppo-mini-batch`` prompts per optimizer step, and PCM's
selection itself (labels, scores, sampling, shrink). Prints a table of medians
and ratios, or one JSON object.

Before anything large is allocated it estimates the update's memory (``estimate_update_memory``:
weights, LoRA + optimizer state, the rollout batch, activations per token per decoder layer x tokens
per micro-batch x layers, with or without gradient checkpointing; the per-token figure is measured
on a 1- and a 2-layer slice of the policy's Llama on the run's device) and refuses a configuration
above ``--max-memory-gb`` (default: the CUDA card's total memory; no limit on the CPU), printing the
estimate and its parts. ``--real-size`` turns gradient checkpointing on and uses one trajectory per
micro-batch if that fits, else chunk micro-batches (``--micro-batch-chunks``: at most K chunks of one
trajectory per forward/backward, the same gradients), and says what it chose (stderr, and ``plan`` in
the JSON).

Micro-batches: without ``--micro-batch``/``--micro-batch-chunks`` every mode runs at its own fastest
micro-batch: one update at each candidate (1, 2, 4, ... trajectories up to the optimizer step's, those
whose memory estimate fits), the fastest is kept for the timed repeats. With ``--real-size`` every mode
runs the memory plan's micro-batch instead (a 7B update per candidate costs too much to search).
Padding makes large micro-batches slow for ``full`` and cheap for ``pcm`` (whose kept rows are all
alike in length), so one fixed micro-batch for both would move the ratio. The output names each mode's
micro-batch and the token ratio (tokens forwarded by ``full`` / by ``pcm``; every chunk row forwards
the same prompt, image and action tokens, so it is the ratio of chunks), the ideal the time ratio
approaches when the update is compute-bound. Activation memory grows with the micro-batch, so the
memory reduction is taken where every mode runs the same, smallest micro-batch
(``activation_memory_micro_batch``). Without checkpointing the 7B shapes keep ~284 KiB per token per
layer: one 64-chunk trajectory (21,568 tokens x 32 layers) would need ~187 GiB.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace

import torch

from pcm_train.cli import argument_parser, run_command

# The trainer's modules (pcm_train.algorithm.*, integrations.simplevla, tools.synthetic) import verl; they
# are imported where the update runs, so the memory plan and its estimator import without verl.

MODES = ("simplevla_rl", "full", "pcm")
GIB = 2**30


def parse_args(argv=None) -> argparse.Namespace:
    ap = argument_parser("pcm_train.compare_update", __doc__)
    ap.add_argument("--budget", type=int, default=12, help="B, chunks kept per trajectory (default 12)")
    ap.add_argument("--num-prompts", type=int, default=2)
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--chunks", type=int, default=64, help="C, chunks per trajectory (default 64)")
    ap.add_argument("--hidden", type=int, default=64, help="small VLA width (default 64)")
    ap.add_argument("--layers", type=int, default=2, help="small VLA decoder layers (default 2)")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--policy", choices=("small_vla", "openvla_oft"), default="small_vla")
    ap.add_argument("--checkpoint", default=None, help="OpenVLA-OFT checkpoint folder (with --policy openvla_oft)")
    ap.add_argument("--real-size", action="store_true",
                    help="with --policy openvla_oft: the 7B model's shapes with random weights (a GPU job)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                    help="policy dtype (default: float32 on the CPU, bfloat16 on CUDA)")
    ap.add_argument("--lora-r", type=int, default=8, help="LoRA rank, 0 = train every weight (default 8)")
    ap.add_argument("--micro-batch", type=int, default=None,
                    help="trajectories per forward/backward, the same for every mode (default: each mode's fastest "
                         "among those whose memory estimate fits)")
    ap.add_argument("--micro-batch-chunks", type=int, default=None,
                    help="at most K chunks of one trajectory per forward/backward (micro-batches smaller than a "
                         "trajectory; same gradients). Default: off, or what --real-size needs to fit")
    ap.add_argument("--ppo-mini-batch", type=int, default=None,
                    help="prompts per optimizer step (default: all of them, one step per update)")
    ap.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                    help="recompute decoder activations in backward (default: on with --real-size, else off)")
    ap.add_argument("--max-memory-gb", type=float, default=None,
                    help="refuse, before allocating, a configuration estimated above this many GiB (default: the "
                         "CUDA card's total memory; no limit on the CPU; 0 = no limit)")
    ap.add_argument("--activation-kib", type=float, default=None,
                    help="activation KiB saved per token per decoder layer for the estimate, instead of measuring "
                         "it on a 1- and 2-layer slice of the policy's Llama on --device")
    ap.add_argument("--repeats", type=int, default=3, help="timed updates per mode, after one warm-up")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = ap.parse_args(argv)
    args.ppo_mini_batch = args.ppo_mini_batch or args.num_prompts
    args.micro_batch_given = args.micro_batch is not None or args.micro_batch_chunks is not None
    args.micro_batch = args.micro_batch or 1  # the memory plan's first candidate when not given
    if args.gradient_checkpointing is None:
        args.gradient_checkpointing = bool(args.real_size)
    for name in ("budget", "num_prompts", "group_size", "chunks", "hidden", "layers", "repeats", "micro_batch",
                 "ppo_mini_batch"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.num_prompts % args.ppo_mini_batch:
        ap.error(f"--ppo-mini-batch ({args.ppo_mini_batch}) must divide --num-prompts ({args.num_prompts})")
    if args.group_size < 2:
        ap.error("--group-size must be >= 2 (GRPO needs a group)")
    if args.micro_batch_chunks is not None and args.micro_batch_chunks < 1:
        ap.error(f"--micro-batch-chunks must be >= 1, got {args.micro_batch_chunks}")
    if args.micro_batch_chunks is not None and args.micro_batch != 1:
        ap.error("--micro-batch-chunks splits single trajectories: use it with --micro-batch 1 (the default)")
    if args.max_memory_gb is not None and not args.max_memory_gb >= 0:
        ap.error(f"--max-memory-gb must be >= 0 (0 = no limit), got {args.max_memory_gb}")
    if args.activation_kib is not None and not args.activation_kib > 0:
        ap.error(f"--activation-kib must be > 0, got {args.activation_kib}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: no CUDA device on this machine")
    if args.policy == "openvla_oft" and (args.checkpoint is None) == (not args.real_size):
        ap.error("--policy openvla_oft needs exactly one of --checkpoint DIR or --real-size")
    if args.policy == "small_vla" and (args.checkpoint or args.real_size):
        ap.error("--checkpoint / --real-size go with --policy openvla_oft")
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    return args


def _policy(args):
    if args.policy == "openvla_oft":
        from pcm_train.policies.openvla_oft import OpenVLAOFT, real_size_config

        dtype = getattr(torch, args.dtype)
        policy = (OpenVLAOFT.random_init(real_size_config(), dtype=dtype, device=args.device, seed=args.seed)
                  if args.real_size else OpenVLAOFT.from_checkpoint(args.checkpoint, dtype=dtype, device=args.device))
    else:
        policy = _small_policy(args)
    if args.lora_r:
        policy.add_lora(args.lora_r, args.lora_r)
    if args.gradient_checkpointing:
        policy.enable_gradient_checkpointing()
    return policy


def _small_config(args):
    from pcm_train.policies import SmallVLAConfig

    heads = max(1, args.hidden // 16)
    return SmallVLAConfig(hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=heads,
                          intermediate_size=args.hidden * 2, image_size=args.image_size)


def _small_policy(args):
    from pcm_train.policies import SmallVLA

    torch.manual_seed(args.seed)
    return SmallVLA(_small_config(args)).to(device=args.device, dtype=getattr(torch, args.dtype))


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


# ----- memory plan: estimate before allocating, refuse what does not fit -----

@dataclass
class ActivationProfile:
    """Bytes autograd saves per token of a packed micro-batch: per decoder layer without and with
    gradient checkpointing (the latter keeps each layer's input), and once for the model (final norm)."""

    per_layer: float
    per_layer_checkpointed: float
    head: float
    source: str  # "measured on ..." or "given"


@dataclass
class MemoryEstimate:
    """An actor update's memory, in bytes, by part (see ``estimate_update_memory``)."""

    weights: int
    trainable_state: int
    batch: int
    activation_per_token_layer: float
    checkpoint_per_token_layer: float
    head_per_token: float
    tokens_per_micro_batch: int
    layers: int
    gradient_checkpointing: bool
    logits_per_token: float = 0.0  # the action head's saved rows, log-softmax output and ids, per token
    margin: float = 0.10  # allocator fragmentation, workspaces, transient buffers

    def saved_in_forward(self, gradient_checkpointing: bool | None = None) -> float:
        """Bytes the largest micro-batch's forward keeps for backward (what ``SavedActivations`` measures)."""
        checkpointing = self.gradient_checkpointing if gradient_checkpointing is None else gradient_checkpointing
        per_layer = self.checkpoint_per_token_layer if checkpointing else self.activation_per_token_layer
        return self.tokens_per_micro_batch * (self.layers * per_layer + self.head_per_token + self.logits_per_token)

    def activations(self, gradient_checkpointing: bool | None = None) -> float:
        """Activation memory of the largest micro-batch: what its forward keeps, and with checkpointing one
        layer's full activations while that layer is recomputed in backward."""
        checkpointing = self.gradient_checkpointing if gradient_checkpointing is None else gradient_checkpointing
        recomputed = self.tokens_per_micro_batch * self.activation_per_token_layer if checkpointing else 0.0
        return self.saved_in_forward(checkpointing) + recomputed

    def total(self, gradient_checkpointing: bool | None = None) -> float:
        return (self.weights + self.trainable_state + self.batch
                + self.activations(gradient_checkpointing)) * (1 + self.margin)

    def lines(self) -> list[str]:
        kib = self.activation_per_token_layer / 1024
        return [
            f"weights {_size(self.weights)}; LoRA/trainable + grads + AdamW + start copy "
            f"{_size(self.trainable_state)}; rollout batch on the device {_size(self.batch)}",
            f"activations: {kib:.1f} KiB per token per layer x {self.tokens_per_micro_batch:,} tokens per "
            f"micro-batch x {self.layers} layers = {_size(self.activations(False))} without checkpointing; "
            f"with checkpointing {self.checkpoint_per_token_layer / 1024:.1f} KiB per token per layer kept + one "
            f"layer recomputed = {_size(self.activations(True))}",
            f"total with {self.margin:.0%} margin: {_size(self.total(False))} without, "
            f"{_size(self.total(True))} with gradient checkpointing "
            f"({'on' if self.gradient_checkpointing else 'off'} here)",
        ]


def _size(nbytes: float) -> str:
    return f"{nbytes / GIB:.2f} GiB" if nbytes >= GIB else f"{nbytes / 2**20:.1f} MiB"


def estimate_update_memory(*, weight_bytes: int, trainable_params: int, trainable_bytes_per_param: int,
                           batch_bytes: int, profile: ActivationProfile, tokens_per_micro_batch: int,
                           layers: int, gradient_checkpointing: bool,
                           logits_bytes_per_token: float = 0.0) -> MemoryEstimate:
    """Memory of an actor update: weights + trainable state (params x (param + grad + 2 AdamW moments +
    the comparison's start copy)) + the rollout batch + the largest micro-batch's activations
    (``profile`` per token per layer x tokens x layers, plus the model's head and the action logits per
    token; with checkpointing the kept layer inputs plus one layer recomputed), plus a 10% margin."""
    return MemoryEstimate(weights=int(weight_bytes), trainable_state=int(trainable_params * trainable_bytes_per_param),
                          batch=int(batch_bytes), activation_per_token_layer=profile.per_layer,
                          checkpoint_per_token_layer=profile.per_layer_checkpointed, head_per_token=profile.head,
                          tokens_per_micro_batch=int(tokens_per_micro_batch), layers=int(layers),
                          gradient_checkpointing=gradient_checkpointing, logits_per_token=logits_bytes_per_token)


def measure_activation_profile(llama_config, *, dtype: torch.dtype, device, lora_r: int, tokens_per_chunk: int,
                               chunks: int = 2, seed: int = 0) -> ActivationProfile:
    """Saved-activation bytes per token of the policy's decoder on ``device``: a 1- and a 2-layer slice of
    ``llama_config`` (same width, attention implementation, dtype and LoRA), one packed forward of
    ``chunks`` chunks each, with and without gradient checkpointing; per layer = the difference."""
    import copy as _copy

    from transformers import LlamaModel

    from pcm_train.runtime.memory import SavedActivations
    from pcm_train.policies.lora import LORA_TARGET_MODULES

    device = torch.device(device)
    total = chunks * tokens_per_chunk
    cu = torch.arange(0, total + 1, tokens_per_chunk, dtype=torch.int32, device=device)
    positions = (torch.arange(total, device=device) % tokens_per_chunk).unsqueeze(0)
    saved = {}
    for layers in (1, 2):
        config = _copy.deepcopy(llama_config)
        config.num_hidden_layers = layers
        torch.manual_seed(seed)
        with torch.device(device):
            model = LlamaModel(config).to(dtype)
        base = model
        if lora_r:
            from peft import LoraConfig, get_peft_model

            model.requires_grad_(False)
            lora = LoraConfig(r=lora_r, lora_alpha=lora_r, target_modules=list(LORA_TARGET_MODULES))
            model = get_peft_model(model, lora)
            base = model.get_base_model()
        model.train()
        inputs = torch.randn(1, total, config.hidden_size, device=device, dtype=dtype)
        for checkpointing in (False, True):
            if checkpointing:
                base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            with SavedActivations(model) as probe:
                out = base(inputs_embeds=inputs, position_ids=positions, use_cache=False, cu_seq_lens_q=cu,
                           cu_seq_lens_k=cu, max_length_q=tokens_per_chunk, max_length_k=tokens_per_chunk)
            del out
            saved[layers, checkpointing] = probe.bytes
        del model, base, inputs
        if device.type == "cuda":
            torch.cuda.empty_cache()
    per_layer = max(saved[2, False] - saved[1, False], 0) / total
    per_layer_ckpt = max(saved[2, True] - saved[1, True], 0) / total
    head = max(saved[1, False] / total - per_layer, 0.0)
    return ActivationProfile(per_layer, per_layer_ckpt, head,
                             f"measured on {device.type} ({dtype}, LoRA r={lora_r}, {chunks} chunks x "
                             f"{tokens_per_chunk} tokens)")


def logits_bytes_per_token(action_tokens: int, hidden_size: int, element_size: int, tokens_per_chunk: int) -> float:
    """Bytes the action head saves per token of a chunk: the hidden rows of its action tokens (the head's
    matmul input), the float32 log-softmax over the 256 bins and the int64 bin ids."""
    return action_tokens * (hidden_size * element_size + 256 * 4 + 8) / tokens_per_chunk


def _meta_policy(args):
    """The policy's module tree on the meta device (sizes only, nothing allocated) and its prompt length."""
    if args.policy == "openvla_oft":
        from pathlib import Path

        from pcm_train.policies import openvla_oft as oft
        from pcm_train.policies.openvla_processor import OpenVLAProcessor, load_normalization

        if args.real_size:
            raw = oft.real_size_config()
            config = oft.parse_config(raw, raw["norm_stats"], None)
            processor = OpenVLAProcessor(*load_normalization("<none>"), None)
            prompt_len = 24  # synthetic_rollout_batch's placeholder prompts (no tokenizer with random weights)
        else:
            path = Path(args.checkpoint)
            raw = oft._read_json(path / "config.json", "config.json")
            config = oft.parse_config(raw, oft._read_norm_stats(path, raw), None)
            processor = OpenVLAProcessor.from_checkpoint(path)
            try:
                from pcm_train.tools.synthetic import TASKS
            except ImportError:  # verl missing: the trainer's task strings are not importable
                TASKS = ("pick up the alphabet soup and place it in the basket",)
            try:
                prompt_len = int(processor.encode_prompts(list(TASKS))[0].shape[1])
            except FileNotFoundError:
                prompt_len = 24
        with torch.device("meta"):
            model = oft.OpenVLAOFT(config, processor, Path("<meta>"))
        unused = {id(p) for p in model.unused_parameters()}
        return model, config.llama, prompt_len, unused
    from pcm_train.policies import SmallVLA
    from pcm_train.policies.small_vla import prompt_text

    config = _small_config(args)
    with torch.device("meta"):
        model = SmallVLA(config)
    # byte tokens of synthetic_rollout_batch's longest task prompt, plus BOS
    prompt_len = len(prompt_text("pick up the alphabet soup and place it in the basket").encode("utf-8")) + 1
    return model, config.llama_config(), prompt_len, set()


def _trainable_counts(model, llama_config, args, unused: set) -> tuple[int, int]:
    """(trainable parameters, bytes per trainable parameter: param + grad + 2 AdamW moments + start copy)."""
    if args.lora_r:
        from pcm_train.policies.lora import LORA_TARGET_MODULES

        count = 0
        for name, module in model.language_model.named_modules():
            if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in LORA_TARGET_MODULES:
                count += args.lora_r * (module.in_features + module.out_features)
        return count, 4 * 5  # peft keeps adapters in float32 on a bf16/fp16 base
    count = sum(p.numel() for p in model.parameters() if id(p) not in unused)
    return count, torch.empty(0, dtype=getattr(torch, args.dtype)).element_size() * 4  # weights counted apart


def memory_plan(args, *, probe: ActivationProfile | None = None) -> dict:
    """Choose gradient checkpointing and micro-batches that fit, or refuse. Nothing large is allocated
    (the policy is built on the meta device; the activation probe runs a 1- and 2-layer slice).

    Returns {"fits": bool, "limit_bytes", "estimate": MemoryEstimate, "settings": str, "notes": [...]};
    with ``--real-size`` and no micro-batch flag it sets ``args.micro_batch_chunks`` when one trajectory
    per micro-batch does not fit.
    """
    model, llama, prompt_len, unused = _meta_policy(args)
    cfg = model.config
    tokens_per_chunk = prompt_len + cfg.num_patches + cfg.num_action_tokens + 1
    dtype = getattr(torch, args.dtype)
    weight_bytes = sum(p.numel() for p in model.parameters()) * torch.empty(0, dtype=dtype).element_size()
    trainable, per_param = _trainable_counts(model, llama, args, unused)  # LoRA adapters: in the trainable state
    trajectories = args.num_prompts * args.group_size
    A = cfg.num_action_tokens
    per_chunk = (cfg.image_channels * cfg.image_size ** 2 * 4 + 2 * prompt_len * 8 + A * 8 + 2 * A * 4 + A)
    batch_bytes = trajectories * per_chunk * (3 * args.chunks + args.budget)  # rollout + the three kept copies
    if probe is None:
        if args.activation_kib is not None:
            per = args.activation_kib * 1024
            probe = ActivationProfile(per, llama.hidden_size * torch.empty(0, dtype=dtype).element_size(),
                                      0.0, "given (--activation-kib)")
        else:
            probe = measure_activation_profile(llama, dtype=dtype, device=args.device, lora_r=args.lora_r,
                                               tokens_per_chunk=tokens_per_chunk)
    if args.max_memory_gb is not None:
        limit = None if args.max_memory_gb == 0 else int(args.max_memory_gb * GIB)
    elif args.device.startswith("cuda"):
        limit = int(torch.cuda.get_device_properties(torch.device(args.device)).total_memory)
    else:
        limit = None

    element = torch.empty(0, dtype=dtype).element_size()
    logits_per_token = logits_bytes_per_token(A, llama.hidden_size, element, tokens_per_chunk)

    def estimate(chunks_per_micro_batch: int) -> MemoryEstimate:
        return estimate_update_memory(weight_bytes=weight_bytes, trainable_params=trainable,
                                      trainable_bytes_per_param=per_param, batch_bytes=batch_bytes, profile=probe,
                                      tokens_per_micro_batch=chunks_per_micro_batch * tokens_per_chunk,
                                      layers=llama.num_hidden_layers,
                                      gradient_checkpointing=args.gradient_checkpointing,
                                      logits_bytes_per_token=logits_per_token)

    def micro_chunks() -> int:  # largest micro-batch of any mode: SimpleVLA-RL forwards every chunk
        if args.micro_batch_chunks:
            return min(args.micro_batch_chunks, args.chunks)
        return args.micro_batch * args.chunks

    notes = [f"activation profile {probe.source}"]
    init_peak = 0
    est = estimate(micro_chunks())
    fits = limit is None or est.total() <= limit
    if args.real_size:  # random_init builds the float32 model, then casts it: both copies exist for a moment
        params = weight_bytes // element
        init_peak = params * 4 + (params * element if dtype != torch.float32 else 0)
        notes.append(f"random init peaks at {init_peak / GIB:.1f} GiB (float32 weights"
                     f"{'' if dtype == torch.float32 else f' + their {args.dtype} copy'})")
        if limit is not None and init_peak > limit:
            fits = False
            notes.append("the random init alone does not fit")
    if not fits and args.real_size and not args.micro_batch_given and (limit is None or init_peak <= limit):
        for k in range(args.chunks - 1, 0, -1):
            if estimate(k).total() <= limit:
                args.micro_batch_chunks = k
                notes.append(f"one trajectory per micro-batch ({args.chunks} chunks) is estimated at "
                             f"{est.total() / GIB:.1f} GiB > {limit / GIB:.1f} GiB: chunk micro-batches of {k}")
                est, fits = estimate(k), True
                break
        else:
            notes.append("no micro-batch fits, not even one chunk: the weights, optimizer state and batch alone "
                         f"are estimated at {(est.weights + est.trainable_state + est.batch) / GIB:.1f} GiB")
    candidates = [args.micro_batch]
    if fits and not args.micro_batch_given and not args.micro_batch_chunks and not args.real_size:
        candidates = [m for m in micro_batch_candidates(args.ppo_mini_batch * args.group_size)
                      if limit is None or estimate(m * args.chunks).total() <= limit]
        est = estimate(candidates[-1] * args.chunks)
    if args.micro_batch_chunks:
        micro = f"micro-batches of at most {args.micro_batch_chunks} chunks of one trajectory"
    elif len(candidates) > 1:
        micro = f"each mode's fastest micro-batch of {candidates} trajectories (memory estimated at the largest)"
    else:
        micro = f"{args.micro_batch} {'trajectory' if args.micro_batch == 1 else 'trajectories'} per micro-batch"
    settings = (f"{args.policy}{' real-size' if args.real_size else ''} {args.dtype} on {args.device}, LoRA r="
                f"{args.lora_r}, gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}, {micro}, "
                f"{tokens_per_chunk} tokens per chunk, {trajectories} trajectories x {args.chunks} chunks, "
                f"{args.repeats} timed repeat(s)")
    return {"fits": fits, "limit_bytes": limit, "estimate": est, "settings": settings, "notes": notes,
            "tokens_per_chunk": tokens_per_chunk, "required_bytes": max(est.total(), init_peak),
            "micro_batch_candidates": candidates}


def micro_batch_candidates(trajectories_per_step: int) -> list[int]:
    """Trajectories per micro-batch to try: 1, 2, 4, ... and the optimizer step's trajectories."""
    sizes = [1 << i for i in range(trajectories_per_step.bit_length()) if 1 << i < trajectories_per_step]
    return sizes + [trajectories_per_step]


def describe_plan(plan: dict) -> str:
    limit = plan["limit_bytes"]
    lines = [f"settings: {plan['settings']}",
             *[f"  {line}" for line in plan["estimate"].lines()],
             f"  limit: {'none' if limit is None else f'{limit / GIB:.1f} GiB'}"
             f"{'' if plan['fits'] else ' -- REFUSED: the estimate does not fit'}",
             *[f"  note: {n}" for n in plan["notes"]]]
    return "\n".join(lines)


# ----- the comparison -----

def _kept_batches(policy, batch, args):
    """The three shrunk batches (every chunk, every valid chunk, PCM's selection) and the median time
    of PCM's selection (labels + scores + sampling + shrink) over ``args.repeats`` calls after a warm-up."""
    from pcm_train.algorithm.batch import shrink_batch
    from pcm_train.config import load_config
    from pcm_train.algorithm.controller import PCMController
    from pcm_train.integrations.simplevla import pcm_shrink_batch

    overrides = [f"pcm.budget={args.budget}", f"actor.micro_batch_trajectories={args.micro_batch}",
                 f"rollout.prompts_per_step={args.num_prompts}", f"actor.ppo_mini_batch={args.ppo_mini_batch}"]
    cfg = load_config(overrides)
    L, D = policy.config.action_chunk, policy.config.action_dim
    start = policy.config.action_token_start
    times = []
    for _ in range(args.repeats + 1):
        controller = PCMController(cfg.pcm, seed=args.seed)
        _sync(args.device)
        started = time.perf_counter()
        pcm_kept, selection = pcm_shrink_batch(batch, controller, action_token_start=start, action_chunk=L,
                                               action_dim=D)
        _sync(args.device)
        times.append(time.perf_counter() - started)
    full_cfg = load_config(overrides + ["pcm.strategy=full"])
    full_kept, _ = pcm_shrink_batch(batch, PCMController(full_cfg.pcm), action_token_start=start,
                                    action_chunk=L, action_dim=D)
    N, C = batch.batch["finish_step"].shape[0], args.chunks
    every = torch.arange(C, device=batch.batch["responses"].device).expand(N, C)
    padded_kept = shrink_batch(batch, every, action_chunk=L, action_dim=D)
    kept = {"simplevla_rl": padded_kept, "full": full_kept, "pcm": pcm_kept}
    return cfg, kept, selection, statistics.median(times[1:])


def update_in_chunk_micro_batches(policy, optimizer, kept, cfg, chunks_per_micro_batch: int, *,
                                  mini_batch_trajectories: int | None = None, generator: torch.Generator | None = None):
    """``pcm_train.algorithm.actor.update_actor`` (one process) with micro-batches of at most ``chunks_per_micro_batch``
    kept chunks of one trajectory: each is a share of its mini-batch's loss (``accumulate_gradients`` with
    the mini-batch's norm), so the gradients, optimizer steps and weights are the trajectory micro-batches'
    (up to float summation order). Returns the ``UpdateStats``."""
    from pcm_train.algorithm.actor import UpdateStats, accumulate_gradients, mini_batch_norm, mini_batches
    from pcm_train.runtime.memory import peak_memory_bytes, reset_peak_memory

    num_traj = int(kept.meta_info["num_traj"])
    traj_index = kept.batch["traj_index"]
    device = kept.batch["responses"].device
    reset_peak_memory(device)
    _sync(str(device))
    started = time.perf_counter()
    bounds = torch.searchsorted(traj_index, torch.arange(num_traj + 1, device=device)).tolist()
    trainable = [p for p in policy.parameters() if p.requires_grad]
    forward_s = backward_s = 0.0
    activation_peak = tokens = 0
    grad_norms, losses = [], []
    for _ in range(cfg.ppo_epochs):
        epoch_activation = 0
        for trajectories in mini_batches(num_traj, mini_batch_trajectories, shuffle=cfg.shuffle, generator=generator):
            norm = mini_batch_norm(kept, trajectories)
            optimizer.zero_grad(set_to_none=True)
            loss = 0.0
            for t in sorted(trajectories):
                for first in range(bounds[t], bounds[t + 1], chunks_per_micro_batch):
                    rows = torch.arange(first, min(first + chunks_per_micro_batch, bounds[t + 1]), device=device)
                    acc, _ = accumulate_gradients(policy, kept, cfg, rows, norm)
                    forward_s += acc.forward_s
                    backward_s += acc.backward_s
                    activation_peak = max(activation_peak, acc.activation_peak)
                    epoch_activation += acc.activation_total
                    tokens += acc.tokens
                    loss += acc.loss
            for p in trainable:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            grad_norms.append(float(torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)))
            optimizer.step()
            losses.append(loss)
    optimizer.zero_grad(set_to_none=True)
    _sync(str(device))
    steps = len(grad_norms)
    return UpdateStats(update_time_s=time.perf_counter() - started, forward_time_s=forward_s,
                       backward_time_s=backward_s, chunks=int(traj_index.shape[0]),
                       tokens=int(kept.batch["response_mask"].sum()), activation_bytes=activation_peak,
                       activation_bytes_total=epoch_activation, peak_memory_bytes=peak_memory_bytes(device),
                       grad_norm=sum(grad_norms) / max(steps, 1), loss=sum(losses) / max(steps, 1),
                       optimizer_steps=steps)


def _one_update(policy, kept, cfg, args, micro_batch: int):
    from pcm_train.algorithm.actor import make_optimizer, update_actor

    cfg = replace(cfg, actor=replace(cfg.actor, micro_batch_trajectories=micro_batch))
    optimizer = make_optimizer(policy, cfg.actor)
    generator = torch.Generator().manual_seed(args.seed)
    mini = args.ppo_mini_batch * args.group_size
    if args.micro_batch_chunks:
        return update_in_chunk_micro_batches(policy, optimizer, kept, cfg.actor, args.micro_batch_chunks,
                                             mini_batch_trajectories=mini, generator=generator)
    stats, _, _ = update_actor(policy, optimizer, kept, cfg.actor, mini_batch_trajectories=mini, generator=generator)
    return stats


def run(args, plan: dict | None = None) -> dict:
    from tqdm import tqdm

    from pcm_train.tools.synthetic import synthetic_rollout_batch

    policy = _policy(args)
    batch = synthetic_rollout_batch(policy, num_prompts=args.num_prompts, group_size=args.group_size,
                                    num_chunks=args.chunks, seed=args.seed)
    cfg, kept, selection, select_time = _kept_batches(policy, batch, args)
    # only the trainable weights change: keep their start values (a full copy would double a 7B model)
    initial = {name: p.detach().clone() for name, p in policy.named_parameters() if p.requires_grad}
    params = dict(policy.named_parameters())
    candidates = (plan or {}).get("micro_batch_candidates") or [args.micro_batch]
    searched = len(candidates) > 1
    results = {}
    progress = tqdm(total=len(MODES) * (args.repeats + 1 + (len(candidates) if searched else 0)), desc="updates",
                    disable=args.json, file=sys.stderr)

    def update(mode: str, micro_batch: int):
        with torch.no_grad():
            for name, value in initial.items():
                params[name].copy_(value)
        stats = _one_update(policy, kept[mode], cfg, args, micro_batch)
        progress.update()
        return stats

    for mode in MODES:
        update(mode, candidates[0])  # warm-up, not timed
        search = {m: update(mode, m) for m in candidates} if searched else {}
        chosen = min(search, key=lambda m: search[m].update_time_s) if searched else candidates[0]
        timed = [update(mode, chosen) for _ in range(args.repeats)]
        smallest = search[candidates[0]] if searched else timed[0]  # activations at the leanest micro-batch
        results[mode] = {
            "micro_batch_trajectories": None if args.micro_batch_chunks else chosen,
            "micro_batch_chunks": args.micro_batch_chunks,
            **({"micro_batch_search_s": {m: stats.update_time_s for m, stats in search.items()}} if searched else {}),
            "update_time_s": statistics.median(s.update_time_s for s in timed),
            "forward_time_s": statistics.median(s.forward_time_s for s in timed),
            "backward_time_s": statistics.median(s.backward_time_s for s in timed),
            "activation_bytes": max(s.activation_bytes for s in timed),
            "activation_bytes_at_smallest_micro_batch": smallest.activation_bytes,
            "peak_memory_bytes": max(s.peak_memory_bytes for s in timed),
            "chunks": timed[0].chunks, "tokens": timed[0].tokens, "optimizer_steps": timed[0].optimizer_steps,
        }
    progress.close()
    if args.micro_batch_chunks:
        micro_batch = f"given: every mode at micro-batches of at most {args.micro_batch_chunks} chunks of one trajectory"
    elif searched:
        micro_batch = (f"searched: each mode at its fastest of {candidates} trajectories per micro-batch "
                       "(one timed update each)")
    else:
        micro_batch = f"given: every mode at {candidates[0]} trajectories per micro-batch"
    full, pcm, padded = results["full"], results["pcm"], results["simplevla_rl"]
    report = {
        "device": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda")
        else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "budget": args.budget, "trajectories": args.num_prompts * args.group_size, "chunks_per_trajectory": args.chunks,
        "valid_chunks_per_trajectory": selection.metrics["pcm/valid_chunks_per_traj"],
        "policy": {"name": args.policy, "checkpoint": args.checkpoint, "real_size": args.real_size,
                   "dtype": args.dtype, "lora_r": args.lora_r, "gradient_checkpointing": args.gradient_checkpointing,
                   **({"hidden": args.hidden, "layers": args.layers, "image_size": args.image_size}
                      if args.policy == "small_vla" else {})},
        "micro_batch": micro_batch, "ppo_mini_batch": args.ppo_mini_batch, "repeats": args.repeats,
        "modes": results,
        "select_time_s": select_time,
        "select_share_of_pcm_update": select_time / pcm["update_time_s"],
        "update_time_ratio": full["update_time_s"] / pcm["update_time_s"],
        "token_ratio": full["chunks"] / pcm["chunks"],  # forwarded tokens: the same per chunk row
        # activation memory grows with the micro-batch: compared where both modes run the same one, the smallest
        "activation_memory_micro_batch": None if args.micro_batch_chunks else candidates[0],
        "activation_memory_reduction": 1 - pcm["activation_bytes_at_smallest_micro_batch"]
                                       / full["activation_bytes_at_smallest_micro_batch"],
        "peak_memory_reduction": 1 - pcm["peak_memory_bytes"] / full["peak_memory_bytes"],
        "update_time_ratio_vs_simplevla_rl": padded["update_time_s"] / pcm["update_time_s"],
        "token_ratio_vs_simplevla_rl": padded["chunks"] / pcm["chunks"],
        "activation_memory_reduction_vs_simplevla_rl": 1 - pcm["activation_bytes_at_smallest_micro_batch"]
                                                       / padded["activation_bytes_at_smallest_micro_batch"],
    }
    if plan is not None:
        report["plan"] = {"settings": plan["settings"], "notes": plan["notes"], "limit_bytes": plan["limit_bytes"],
                          "estimate": {**asdict(plan["estimate"]),
                                       "activations_bytes": plan["estimate"].activations(),
                                       "total_bytes": plan["estimate"].total()}}
    return report


def format_table(report: dict) -> str:
    mib = 1 / 2**20
    lines = [f"device: {report['device']}; {report['trajectories']} trajectories x "
             f"{report['chunks_per_trajectory']} chunks ({report['valid_chunks_per_trajectory']:.1f} valid on "
             f"average), B = {report['budget']}",
             f"micro-batches: {report['micro_batch']}",
             f"{'mode':<14}{'micro':>6}{'update s':>10}{'fwd s':>9}{'bwd s':>9}{'act MiB':>10}{'peak MiB':>10}"
             f"{'chunks':>8}{'tokens':>9}"]
    for mode, r in report["modes"].items():
        micro = r["micro_batch_trajectories"] or f"{r['micro_batch_chunks']}c"
        lines.append(f"{mode:<14}{micro:>6}{r['update_time_s']:>10.3f}{r['forward_time_s']:>9.3f}"
                     f"{r['backward_time_s']:>9.3f}{r['activation_bytes'] * mib:>10.1f}"
                     f"{r['peak_memory_bytes'] * mib:>10.1f}{r['chunks']:>8}{r['tokens']:>9}")
    lines.append(f"full / pcm update time: {report['update_time_ratio']:.2f}x (token ratio "
                 f"{report['token_ratio']:.2f}x); activation memory at equal micro-batches "
                 f"-{report['activation_memory_reduction']:.0%}; "
                 f"peak memory -{report['peak_memory_reduction']:.0%}")
    lines.append(f"SimpleVLA-RL (all chunks) / pcm update time: {report['update_time_ratio_vs_simplevla_rl']:.2f}x "
                 f"(token ratio {report['token_ratio_vs_simplevla_rl']:.2f}x); activation memory "
                 f"-{report['activation_memory_reduction_vs_simplevla_rl']:.0%}")
    lines.append(f"pcm selection (labels + scores + sampling + shrink): {report['select_time_s'] * 1e3:.2f} ms, "
                 f"{report['select_share_of_pcm_update']:.2%} of the pcm update")
    if report["policy"]["gradient_checkpointing"]:
        lines.append("act MiB with gradient checkpointing: the bytes saved in forward (each layer's input); "
                     "a layer's activations are recomputed during backward")
    return "\n".join(lines)


def main(argv=None) -> int:
    return run_command(__doc__, _main, argv, own_help=False)


def _main(argv: list[str]) -> int:
    args = parse_args(argv)
    plan = memory_plan(args)
    print(describe_plan(plan), file=sys.stderr, flush=True)
    if not plan["fits"]:
        limit = plan["limit_bytes"]
        print(f"error: refusing to start: the update is estimated at {plan['required_bytes'] / GIB:.1f} GiB, "
              f"above --max-memory-gb ({limit / GIB:.1f} GiB); nothing was allocated. Turn on "
              "--gradient-checkpointing, lower --micro-batch or set --micro-batch-chunks, or raise --max-memory-gb",
              file=sys.stderr)
        return 2
    report = run(args, plan)
    print(json.dumps(report) if args.json else format_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
