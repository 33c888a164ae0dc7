"""A small, randomly initialised VLA shaped like OpenVLA-OFT (see /work/shared/spec/OPENVLA-OFT.md).

Image -> patch encoder (Conv2d patchify + pre-norm ViT blocks) -> 3-layer GELU MLP projector ->
``LlamaForCausalLM`` whose vocabulary ends with 256 action-bin ids. One chunk is the sequence
``[BOS, patch embeddings, prompt[1:], action_chunk * action_dim zero embeddings, STOP]`` with fully
bidirectional attention; the action logits are the LM logits one position before each placeholder,
restricted to the action ids. Built from the config alone (no downloads), with a byte-level
tokenizer: PAD = 0, BOS = 1, STOP = 2, byte b -> 3 + b, action bins = the last 256 ids.

State mode (``observation="state"``, docs/state_mode.md): the observation is the env's privileged
state vector (proprio + object poses) instead of an image; a linear state encoder turns it into
``state_tokens`` tokens that take the patches' place. Prompt, chunking, action tokens, forward
passes and their signatures are the same; the ``pixel_values`` arguments then carry float
[B, state_dim] states.
"""
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM, PretrainedConfig, PreTrainedModel

from pcm_train.policies.action_tokens import NUM_ACTION_BINS, gripper_to_env, unnormalize
from pcm_train.config import OBSERVATIONS
from pcm_train.policies.action_head import (ActionTokensMixin, check_int_tensor as _check_int_tensor,
                                            check_packed_prompts)
from pcm_train.policies.lora import LoraLanguageModelMixin
from pcm_train.policies.varlen_attention import ATTENTION_NAME, key_padding_mask

PAD_ID, BOS_ID, STOP_ID = 0, 1, 2
BYTE_OFFSET = 3
TEXT_VOCAB_SIZE = BYTE_OFFSET + 256


def prompt_text(task: str) -> str:
    """OpenVLA's prompt for a task description."""
    return f"In: What action should the robot take to {task.lower()}?\nOut:"


class SmallVLAConfig(PretrainedConfig):
    """Sizes of the small VLA. ``vocab_size`` and ``action_token_start`` are derived.

    ``action_q01``/``action_q99``/``action_norm_mask`` (length ``action_dim``) un-normalize the
    decoded actions as ``dataset_statistics.json`` does; the defaults (-1, 1, all dims but the
    gripper) leave them in [-1, 1].

    ``observation`` is ``"image"`` (patch encoder over ``image_size``² images) or ``"state"`` (a
    linear encoder over float [state_dim] states -> ``state_tokens`` tokens of ``vision_width``).
    The default ``state_dim`` is LIBERO's privileged state (``pcm_train.envs.PRIVILEGED_STATE_DIM``).
    """

    model_type = "pcm_small_vla"

    image_size: int = 32
    image_channels: int = 3
    patch_size: int = 8
    vision_width: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    intermediate_size: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 512
    initializer_range: float = 0.02
    action_chunk: int = 8
    action_dim: int = 7
    action_q01: list[float] | None = None
    action_q99: list[float] | None = None
    action_norm_mask: list[bool] | None = None
    observation: str = "image"
    state_dim: int = 36
    state_tokens: int = 4

    def __post_init__(self, **kwargs):
        if self.observation not in OBSERVATIONS:
            raise ValueError(f"observation must be one of {OBSERVATIONS}, got {self.observation!r}")
        if self.state_dim < 1 or self.state_tokens < 1:
            raise ValueError(f"state_dim and state_tokens must be >= 1, got {self.state_dim}, {self.state_tokens}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})")
        if self.vision_width % self.vision_heads:
            raise ValueError(f"vision_width ({self.vision_width}) must be a multiple of vision_heads")
        if self.action_q01 is None:
            self.action_q01 = [-1.0] * self.action_dim
        if self.action_q99 is None:
            self.action_q99 = [1.0] * self.action_dim
        if self.action_norm_mask is None:
            self.action_norm_mask = [True] * (self.action_dim - 1) + [False]
        for name in ("action_q01", "action_q99", "action_norm_mask"):
            if len(getattr(self, name)) != self.action_dim:
                raise ValueError(f"{name} must have action_dim={self.action_dim} entries, got {getattr(self, name)}")
        super().__post_init__(**kwargs)

    @property
    def num_patches(self) -> int:
        """Observation tokens per chunk: image patches, or ``state_tokens`` in state mode."""
        if self.observation == "state":
            return self.state_tokens
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_action_tokens(self) -> int:
        return self.action_chunk * self.action_dim

    @property
    def vocab_size(self) -> int:
        return TEXT_VOCAB_SIZE + NUM_ACTION_BINS

    @property
    def action_token_start(self) -> int:
        return TEXT_VOCAB_SIZE

    def llama_config(self) -> LlamaConfig:
        """The language model's config: non-causal, with this package's bidirectional attention."""
        config = LlamaConfig(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
            rms_norm_eps=self.rms_norm_eps, max_position_embeddings=self.max_position_embeddings,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
            initializer_range=self.initializer_range, pad_token_id=PAD_ID, bos_token_id=BOS_ID,
            eos_token_id=STOP_ID, tie_word_embeddings=False, use_cache=False, is_causal=False,
        )
        config._attn_implementation = ATTENTION_NAME
        return config


class VisionBlock(nn.Module):
    """Pre-norm transformer block over patch tokens [N, P, W]."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.fc1 = nn.Linear(width, 4 * width)
        self.fc2 = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, p, w = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(n, p, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, p, w))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class PatchEncoder(nn.Module):
    """Images [N, C, H, W] -> patch features [N, num_patches, vision_width]."""

    def __init__(self, config: SmallVLAConfig):
        super().__init__()
        self.patchify = nn.Conv2d(config.image_channels, config.vision_width, config.patch_size, config.patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_patches, config.vision_width))
        self.blocks = nn.ModuleList(VisionBlock(config.vision_width, config.vision_heads)
                                    for _ in range(config.vision_layers))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patchify(pixel_values).flatten(2).transpose(1, 2) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return x


class StateEncoder(nn.Module):
    """States float [N, state_dim] -> ``state_tokens`` tokens [N, state_tokens, vision_width]: standardize
    with the ``mean``/``std`` buffers (float [state_dim], saved with the weights; 0 / 1 until
    ``set_normalization``), then one linear map."""

    def __init__(self, config: SmallVLAConfig):
        super().__init__()
        self.register_buffer("mean", torch.zeros(config.state_dim))
        self.register_buffer("std", torch.ones(config.state_dim))
        self.tokens, self.width = config.state_tokens, config.vision_width
        self.linear = nn.Linear(config.state_dim, config.state_tokens * config.vision_width)

    @torch.no_grad()
    def set_normalization(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Standardize future inputs with float [state_dim] ``mean`` and ``std`` (> 0)."""
        if mean.shape != self.mean.shape or std.shape != self.std.shape or not bool((std > 0).all()):
            raise ValueError(f"mean and std must be float [{self.mean.numel()}] with std > 0, "
                             f"got {tuple(mean.shape)} and {tuple(std.shape)}")
        self.mean.copy_(mean)
        self.std.copy_(std)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        standardized = (states.float() - self.mean.float()) / self.std.float()  # before any low-precision cast
        return self.linear(standardized.to(self.linear.weight.dtype)).view(-1, self.tokens, self.width)


class Projector(nn.Module):
    """OpenVLA's fc1 -> GELU -> fc2 -> GELU -> fc3 (exact-erf GELU): [..., vision_width] -> [..., hidden]."""

    def __init__(self, vision_width: int, hidden_size: int):
        super().__init__()
        self.fc1 = nn.Linear(vision_width, 4 * vision_width)
        self.fc2 = nn.Linear(4 * vision_width, hidden_size)
        self.fc3 = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(F.gelu(self.fc2(F.gelu(self.fc1(x)))))


def _check_pixels(name: str, pixel_values, rows: int, config: SmallVLAConfig) -> None:
    expected = (rows, config.image_channels, config.image_size, config.image_size)
    if not isinstance(pixel_values, torch.Tensor) or not pixel_values.is_floating_point() \
            or tuple(pixel_values.shape) != expected:
        raise ValueError(f"{name} must be a float tensor [N, C, H, W] = {expected}, got "
                         f"{getattr(pixel_values, 'dtype', type(pixel_values))} "
                         f"{tuple(getattr(pixel_values, 'shape', ()))}")


def _check_observations(name: str, values, rows: int, config: SmallVLAConfig) -> None:
    """Images [rows, C, H, W] in image mode, states [rows, state_dim] in state mode (float tensors)."""
    if config.observation == "image":
        _check_pixels(name, values, rows, config)
    elif not isinstance(values, torch.Tensor) or not values.is_floating_point() \
            or tuple(values.shape) != (rows, config.state_dim):
        raise ValueError(f"{name} must be a float tensor of states [N, state_dim] = {(rows, config.state_dim)} "
                         f"(state-mode policy), got {getattr(values, 'dtype', type(values))} "
                         f"{tuple(getattr(values, 'shape', ()))}")


class SmallVLA(ActionTokensMixin, LoraLanguageModelMixin, PreTrainedModel):
    """Small OpenVLA-OFT-shaped policy emitting ``action_chunk * action_dim`` action tokens per chunk.

    Fine-tuning: either train all weights, or call ``add_lora`` (LoRA adapters on the language model
    only; the patch or state encoder, projector and all base weights frozen). Checkpoints: ``save_pretrained``
    / ``from_pretrained`` for the full model (merge adapters first with ``merge_lora``), or
    ``save_lora`` / ``load_lora`` for just the adapters on top of a base checkpoint.
    """

    config_class = SmallVLAConfig
    main_input_name = "input_ids"

    def __init__(self, config: SmallVLAConfig):
        super().__init__(config)
        if config.observation == "state":
            self.state_encoder = StateEncoder(config)
        else:
            self.patch_encoder = PatchEncoder(config)
        self.projector = Projector(config.vision_width, config.hidden_size)
        self.language_model = LlamaForCausalLM(config.llama_config())
        self.post_init()

    # ----- tokenizer -----

    def encode_prompts(self, tasks: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Byte-tokenize OpenVLA prompts: (input_ids int64 [B, P], attention_mask int64 [B, P]), BOS first,
        right-padded with PAD, on the model's device."""
        if not isinstance(tasks, (list, tuple)) or not tasks or not all(isinstance(t, str) for t in tasks):
            raise ValueError(f"tasks must be a non-empty list of str, got {tasks!r}")
        rows = [[BOS_ID] + [BYTE_OFFSET + b for b in prompt_text(t).encode("utf-8")] for t in tasks]
        width = max(len(r) for r in rows)
        input_ids = torch.tensor([r + [PAD_ID] * (width - len(r)) for r in rows], device=self.device)
        attention_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=self.device)
        return input_ids, attention_mask

    def pixel_values_from_images(self, images) -> torch.Tensor:
        """uint8 images [B, H, W, C] (numpy or torch) of the config's size -> float32 [B, C, H, W] in [-1, 1]."""
        images = torch.tensor(np.asarray(images))  # a copy: frames from Ray are read-only
        expected = (self.config.image_size, self.config.image_size, self.config.image_channels)
        if images.dim() != 4 or tuple(images.shape[1:]) != expected or images.dtype != torch.uint8:
            raise ValueError(f"images must be uint8 [B, {expected[0]}, {expected[1]}, {expected[2]}], "
                             f"got {images.dtype} {tuple(images.shape)}")
        return images.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)

    def observations_to_inputs(self, observations: list[dict]) -> torch.Tensor:
        """Env observation dicts -> the ``pixel_values`` rows for them, on the CPU: image mode float32
        [B, C, H, W] from ``obs["image"]``; state mode float32 [B, state_dim] from ``obs["state"]``."""
        if self.config.observation == "image":
            return self.pixel_values_from_images(np.stack([o["image"] for o in observations]))
        states = torch.tensor(np.stack([o["state"] for o in observations]), dtype=torch.float32)
        if tuple(states.shape[1:]) != (self.config.state_dim,):
            raise ValueError(f"state-mode observations need obs['state'] float [{self.config.state_dim}] (LIBERO: "
                             f"privileged_state=True), got shape {tuple(states.shape[1:])}")
        return states

    def _encode_observations(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``pixel_values`` rows (images or states) -> observation features [M, num_patches, vision_width]."""
        if self.config.observation == "state":
            return self.state_encoder(pixel_values)
        return self.patch_encoder(pixel_values.to(self.dtype))

    # ----- forward passes -----

    def _assemble(self, prompt_ids, prompt_chunk, prompt_offset, pixel_values, chunk_starts, prompt_lengths, total):
        """Scatter chunks into a flat sequence [total, hidden]; return it and the action-logit rows [M, A].

        prompt_ids/prompt_chunk/prompt_offset [T]: each real prompt token, its chunk and its index in the
        chunk's prompt (0 = BOS). chunk_starts/prompt_lengths [M]: where each chunk begins, its prompt length.
        """
        cfg = self.config
        num_patches, num_actions = cfg.num_patches, cfg.num_action_tokens
        embed = self._causal_lm().get_input_embeddings()
        patches = self.projector(self._encode_observations(pixel_values))  # [M, Np, hidden]
        sequence = patches.new_zeros(total, cfg.hidden_size)
        # BOS at 0, patches at 1..Np, prompt[1:] after them; placeholders stay zero; STOP last.
        prompt_pos = chunk_starts[prompt_chunk] + prompt_offset + num_patches * (prompt_offset > 0)
        sequence[prompt_pos] = embed(prompt_ids).to(sequence.dtype)
        patch_pos = chunk_starts[:, None] + 1 + torch.arange(num_patches, device=sequence.device)
        sequence[patch_pos.flatten()] = patches.flatten(0, 1)
        first_action = chunk_starts + num_patches + prompt_lengths  # first placeholder
        sequence[first_action + num_actions] = embed.weight[STOP_ID].to(sequence.dtype)
        logit_rows = first_action[:, None] - 1 + torch.arange(num_actions, device=sequence.device)
        return sequence, logit_rows

    def _action_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states [..., hidden] -> logits over the 256 action ids [..., 256]."""
        start = self.config.action_token_start
        weight = self._causal_lm().get_output_embeddings().weight[start:start + NUM_ACTION_BINS]
        return hidden @ weight.t()

    def action_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      pixel_values: torch.Tensor) -> torch.Tensor:
        """Padded per-chunk forward. input_ids/attention_mask int [B, P] (right-padded, BOS first),
        pixel_values float [B, C, H, W] (state mode: [B, state_dim]) -> action logits float [B, A, 256]
        (A = action_chunk * action_dim). Independent of the amount of right padding."""
        _check_int_tensor("input_ids", input_ids, 2, "[B, P]")
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}, "
                             f"got {tuple(getattr(attention_mask, 'shape', ()))}")
        _check_observations("pixel_values", pixel_values, input_ids.shape[0], self.config)
        real = attention_mask.bool()
        if bool((real[:, 1:] & ~real[:, :-1]).any() | ~real[:, 0].all() | (input_ids[:, 0] != BOS_ID).any()):
            raise ValueError("input_ids must start with BOS and attention_mask must be right-padded (1s then 0s)")

        batch, width = input_ids.shape
        cfg = self.config
        row_len = width + cfg.num_patches + cfg.num_action_tokens + 1
        prompt_lengths = real.sum(1)
        prompt_chunk, prompt_offset = real.nonzero(as_tuple=True)
        chunk_starts = torch.arange(batch, device=input_ids.device) * row_len
        sequence, logit_rows = self._assemble(input_ids[real], prompt_chunk, prompt_offset, pixel_values,
                                              chunk_starts, prompt_lengths, batch * row_len)
        positions = torch.arange(row_len, device=input_ids.device)
        sequence_lengths = prompt_lengths + cfg.num_patches + cfg.num_action_tokens + 1
        hidden = self._causal_lm().model(inputs_embeds=sequence.view(batch, row_len, -1),
                                         attention_mask=key_padding_mask(sequence_lengths, row_len),
                                         position_ids=positions.expand(batch, row_len),
                                         use_cache=False).last_hidden_state
        return self._action_head(hidden.flatten(0, 1)[logit_rows])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                pixel_values: torch.Tensor) -> torch.Tensor:
        """Same as ``action_logits`` (so DDP/FSDP wrappers that hook ``forward`` see a call)."""
        return self.action_logits(input_ids, attention_mask, pixel_values)

    def action_logits_packed(self, prompt_ids: torch.Tensor, prompt_cu_seqlens: torch.Tensor,
                             pixel_values: torch.Tensor) -> torch.Tensor:
        """One forward over M packed chunks. prompt_ids int [Tp] (each chunk's unpadded prompt, BOS first,
        concatenated), prompt_cu_seqlens int32 [M+1] (chunk m's prompt is prompt_ids[cu[m]:cu[m+1]]),
        pixel_values float [M, C, H, W] (state mode: [M, state_dim]) -> action logits float [M, A, 256];
        equals ``action_logits``."""
        lengths = check_packed_prompts(prompt_ids, prompt_cu_seqlens)
        num_chunks = len(lengths)
        _check_observations("pixel_values", pixel_values, num_chunks, self.config)
        if bool((prompt_ids[prompt_cu_seqlens[:-1].long()] != BOS_ID).any()):
            raise ValueError("every chunk's prompt in prompt_ids must start with BOS")

        cfg = self.config
        extra = cfg.num_patches + cfg.num_action_tokens + 1  # tokens each chunk adds to its prompt
        prompt_lengths = prompt_cu_seqlens.diff().long()
        seq_cu = (prompt_cu_seqlens + extra * torch.arange(num_chunks + 1, device=prompt_ids.device)).int()
        total = prompt_ids.numel() + num_chunks * extra
        max_length = max(lengths) + extra
        prompt_chunk = torch.repeat_interleave(torch.arange(num_chunks, device=prompt_ids.device), prompt_lengths,
                                               output_size=prompt_ids.numel())
        token_index = torch.arange(prompt_ids.numel(), device=prompt_ids.device)
        prompt_offset = token_index - prompt_cu_seqlens[:-1].long()[prompt_chunk]
        chunk_starts = seq_cu[:-1].long()
        sequence, logit_rows = self._assemble(prompt_ids, prompt_chunk, prompt_offset, pixel_values,
                                              chunk_starts, prompt_lengths, total)
        sequence_chunk = torch.repeat_interleave(torch.arange(num_chunks, device=prompt_ids.device),
                                                 prompt_lengths + extra, output_size=total)
        positions = torch.arange(total, device=prompt_ids.device) - chunk_starts[sequence_chunk]
        hidden = self._causal_lm().model(inputs_embeds=sequence.unsqueeze(0), position_ids=positions.unsqueeze(0),
                                         use_cache=False, cu_seq_lens_q=seq_cu, cu_seq_lens_k=seq_cu,
                                         max_length_q=max_length, max_length_k=max_length).last_hidden_state
        return self._action_head(hidden[0][logit_rows])

    # ----- log-probs and acting -----

    @torch.no_grad()
    def act(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor, *,
            temperature: float = 1.6, greedy: bool = False,
            generator: torch.Generator | list[torch.Generator] | None = None) -> dict[str, torch.Tensor]:
        """Sample (or argmax) one action chunk per row. Inputs as ``action_logits``. Returns
        responses int64 [B, A] token ids, log_probs float32 [B, A] (at ``temperature``, also when greedy),
        normalized_actions float32 [B, action_chunk, action_dim] in [-1, 1] and env_actions (same shape:
        un-normalized with the config's q01/q99/mask, gripper = last dim mapped to the env's +1 close / -1 open).
        ``generator``: one shared by all rows, or one CPU generator per row (``action_head.sample_bins``)."""
        cfg = self.config
        logits, responses, normalized = self._sample(input_ids, attention_mask, pixel_values, temperature, greedy,
                                                     generator)
        env_actions = unnormalize(normalized, torch.tensor(cfg.action_q01, device=normalized.device),
                                  torch.tensor(cfg.action_q99, device=normalized.device),
                                  torch.tensor(cfg.action_norm_mask, device=normalized.device))
        env_actions[..., -1] = gripper_to_env(normalized[..., -1])
        return {"responses": responses, "log_probs": self.log_probs(logits, responses, temperature),
                "normalized_actions": normalized, "env_actions": env_actions}

    def save_pretrained(self, save_directory, *args, **kwargs):
        """``PreTrainedModel.save_pretrained``, refused while LoRA adapters are attached: their peft key
        names would not load back into a plain ``SmallVLA`` (use ``save_lora`` or ``merge_lora`` first)."""
        if self.has_lora:
            raise ValueError("save_pretrained: LoRA adapters attached; call save_lora(path) or merge_lora() first")
        return super().save_pretrained(save_directory, *args, **kwargs)
