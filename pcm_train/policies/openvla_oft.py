"""OpenVLA-OFT (SimpleVLA-RL's checkpoints) on current transformers, for RL log-probs and acting.

The checkpoint's ``config.json`` is parsed as JSON (its remote code is never run); the model is a plain
``nn.Module`` whose state-dict keys equal the checkpoint's: ``vision_backbone.featurizer`` (DINOv2) and
``vision_backbone.fused_featurizer`` (SigLIP) ViTs, the 3-layer ``projector`` and a transformers
``LlamaForCausalLM`` as ``language_model``. One chunk is the sequence
``[BOS, 256 patch embeddings, prompt[1:], 56 zero embeddings, STOP]`` with fully bidirectional attention;
its action logits are the LM logits from the prompt's last token (29871) to the second-to-last placeholder,
restricted to the action ids 31744..31999. See /work/shared/spec/OPENVLA-OFT.md.
"""
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from pcm_train.policies.action_tokens import NUM_ACTION_BINS, gripper_to_env, unnormalize
from pcm_train.policies.openvla_processor import (BOS_ID, PAD_ID, PROMPT_END_ID, STOP_ID, OpenVLAProcessor,
                                                  load_normalization)
from pcm_train.policies.openvla_vit import ViTSpec, VisionTower, vit_spec
from pcm_train.policies.lora import LoraLanguageModelMixin
from pcm_train.policies.action_head import (ActionTokensMixin, check_int_tensor as _check_int_tensor,
                                            check_packed_prompts)
from pcm_train.policies.small_vla import Projector, _check_pixels
from pcm_train.policies.varlen_attention import ATTENTION_NAME, key_padding_mask

# Llama-2 7B: the values OpenVLA's text_config leaves unset.
LLAMA_DEFAULTS = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
                  "num_key_value_heads": None, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
                  "max_position_embeddings": 2048, "vocab_size": 32064, "pad_token_id": PAD_ID}
WEIGHT_INDEX = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 5_000_000_000


@dataclass
class OpenVLAOFTConfig:
    """Sizes the trainer reads (``action_chunk``, ``action_dim``, ``num_action_tokens``, ``action_token_start``,
    ``image_size``) plus what the checkpoint defines: the parsed ``config.json`` (``raw``), both towers, the
    Llama config and the action statistics per dataset key (``norm_stats``; ``unnorm_key`` is the default)."""

    raw: dict
    vision: tuple[ViTSpec, ViTSpec]
    llama: LlamaConfig
    norm_stats: dict
    unnorm_key: str
    action_token_start: int = 31744
    action_chunk: int = 8
    action_dim: int = 7
    image_size: int = 224
    image_channels: int = 6

    @property
    def num_action_tokens(self) -> int:
        return self.action_chunk * self.action_dim

    @property
    def vocab_size(self) -> int:
        """End of the action ids (OpenVLA's unpadded 32000-token vocabulary)."""
        return self.action_token_start + NUM_ACTION_BINS

    @property
    def num_patches(self) -> int:
        return self.vision[0].num_patches


def real_size_config() -> dict:
    """``config.json`` fields of the 7B OpenVLA-OFT (DINOv2 ViT-L + SigLIP so400m, Llama-2 7B), with
    placeholder LIBERO action statistics: for ``OpenVLAOFT.random_init``."""
    stats = {"q01": [-1.0] * 7, "q99": [1.0] * 7, "mask": [True] * 6 + [False]}
    return {"model_type": "openvla", "use_fused_vision_backbone": True, "use_proprio": False,
            "timm_model_ids": ["vit_large_patch14_reg4_dinov2.lvd142m", "vit_so400m_patch14_siglip_224"],
            "timm_override_act_layers": [None, None], "image_sizes": [224, 224], "n_action_bins": NUM_ACTION_BINS,
            "pad_to_multiple_of": 64, "pad_token_id": PAD_ID,
            "text_config": {"model_type": "llama", "vocab_size": 32064, "pad_token_id": PAD_ID},
            "norm_stats": {"libero_object_no_noops": {"action": stats}}}


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: {what} is not valid JSON ({err})") from err


def resolve_unnorm_key(norm_stats: dict, unnorm_key: str | None) -> str:
    """The dataset key whose action statistics un-normalize actions: ``unnorm_key`` (or ``{key}_no_noops``, as
    SimpleVLA-RL resolves it); None picks the only key. ValueError listing the available keys otherwise."""
    available = sorted(norm_stats)
    if unnorm_key is None:
        if len(available) != 1:
            raise ValueError(f"the checkpoint has action statistics for {available}; pass unnorm_key=")
        return available[0]
    for key in (unnorm_key, f"{unnorm_key}_no_noops"):
        if key in norm_stats:
            return key
    raise ValueError(f"unknown unnorm_key {unnorm_key!r}; available: {available}")


def _llama_config(text_config: dict) -> LlamaConfig:
    """Llama config from OpenVLA's ``text_config`` (unset fields = Llama-2 7B), non-causal, with this
    package's bidirectional attention."""
    if text_config.get("rope_scaling") or text_config.get("hidden_act", "silu") != "silu":
        raise ValueError("text_config: only Llama with SiLU and unscaled RoPE is supported, got "
                         f"hidden_act={text_config.get('hidden_act')!r}, "
                         f"rope_scaling={text_config.get('rope_scaling')}")
    fields = {k: text_config.get(k, default) for k, default in LLAMA_DEFAULTS.items()}
    theta = fields.pop("rope_theta")
    config = LlamaConfig(**fields, rope_parameters={"rope_type": "default", "rope_theta": theta},
                         bos_token_id=BOS_ID, eos_token_id=STOP_ID, tie_word_embeddings=False, use_cache=False,
                         is_causal=False)
    config._attn_implementation = ATTENTION_NAME
    return config


def parse_config(raw: dict, norm_stats: dict, unnorm_key: str | None) -> OpenVLAOFTConfig:
    """Check and interpret a parsed OpenVLA ``config.json``. Raises ValueError for what is not supported."""
    if raw.get("model_type") != "openvla":
        raise ValueError(f"config.json: model_type must be 'openvla', got {raw.get('model_type')!r}")
    if not raw.get("use_fused_vision_backbone", False) or len(raw.get("timm_model_ids", [])) != 2:
        raise ValueError("config.json: only the fused DINOv2 + SigLIP backbone (use_fused_vision_backbone, two "
                         f"timm_model_ids) is supported, got {raw.get('timm_model_ids')}")
    if raw.get("use_proprio", False):
        raise ValueError("config.json: use_proprio=true (a proprio projector) is not supported")
    if any(raw.get("timm_override_act_layers") or []):
        raise ValueError(f"config.json: timm_override_act_layers must be null, got {raw['timm_override_act_layers']}")
    if raw.get("n_action_bins", NUM_ACTION_BINS) != NUM_ACTION_BINS:
        raise ValueError(f"config.json: n_action_bins must be {NUM_ACTION_BINS}, got {raw['n_action_bins']}")
    overrides = raw.get("vit_overrides") or [None, None]
    vision = tuple(vit_spec(timm_id, override) for timm_id, override in zip(raw["timm_model_ids"], overrides))
    if vision[0].num_patches != vision[1].num_patches:
        raise ValueError(f"the two towers must give as many patches, got {[v.num_patches for v in vision]}")
    llama = _llama_config(raw.get("text_config", {}))
    config = OpenVLAOFTConfig(raw=raw, vision=vision, llama=llama, norm_stats=norm_stats,
                              unnorm_key=resolve_unnorm_key(norm_stats, unnorm_key))
    text_vocab = llama.vocab_size - raw.get("pad_to_multiple_of", 64)
    if text_vocab != config.vocab_size:
        raise ValueError(f"config.json: text_config.vocab_size - pad_to_multiple_of must be {config.vocab_size} "
                         f"(Llama-2's vocabulary, action ids {config.action_token_start}..{config.vocab_size - 1}), "
                         f"got {text_vocab}")
    action_stats = norm_stats[config.unnorm_key]["action"]
    for name in ("q01", "q99", "mask"):
        values = action_stats.get(name, [True] * config.action_dim if name == "mask" else None)
        if values is None or len(values) != config.action_dim:
            raise ValueError(f"action statistics {config.unnorm_key!r}: '{name}' must have {config.action_dim} "
                             f"entries, got {values}")
    return config


def _read_norm_stats(path: Path, raw: dict) -> dict:
    """``dataset_statistics.json`` if present, else ``config.json``'s ``norm_stats``."""
    stats_file = path / "dataset_statistics.json"
    stats = _read_json(stats_file, "dataset_statistics.json") if stats_file.is_file() else raw.get("norm_stats")
    if not stats:
        raise ValueError(f"{path}: no action statistics (neither dataset_statistics.json nor config.json norm_stats)")
    return stats


def _shard_paths(path: Path) -> list[Path]:
    index = path / WEIGHT_INDEX
    if index.is_file():
        names = sorted(set(_read_json(index, WEIGHT_INDEX)["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        names = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{path}: no {WEIGHT_INDEX} or model.safetensors")
    missing = [n for n in names if not (path / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{path}: missing weight shards {missing} (listed in {WEIGHT_INDEX})")
    return [path / n for n in names]


def _load_state_dict(path: Path, expected: dict[str, tuple], dtype: torch.dtype, device) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors shards, checked against ``expected`` (key -> shape) before any is read,
    as ``dtype`` on ``device``. ValueError naming the first missing/unexpected keys or shape mismatches."""
    shards = _shard_paths(path)
    shapes = {}
    for shard in shards:
        with safe_open(shard, framework="pt") as f:
            shapes.update({key: tuple(f.get_slice(key).get_shape()) for key in f.keys()})
    missing, unexpected = sorted(set(expected) - set(shapes)), sorted(set(shapes) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint keys do not match the OpenVLA-OFT module tree: {len(missing)} missing "
                         f"(first: {missing[:5]}), {len(unexpected)} unexpected (first: {unexpected[:5]})")
    wrong = [f"{k}: checkpoint {shapes[k]} vs model {expected[k]}" for k in expected if shapes[k] != expected[k]]
    if wrong:
        raise ValueError(f"{path}: {len(wrong)} tensor shapes differ from config.json's sizes (first: {wrong[:5]})")
    state = {}
    for shard in shards:
        with safe_open(shard, framework="pt") as f:
            state.update({key: f.get_tensor(key).to(device=device, dtype=dtype) for key in f.keys()})
    return state


class FusedVisionBackbone(nn.Module):
    """pixel_values float [N, 6, H, W] (channels 0-2 DINOv2, 3-5 SigLIP) -> patches [N, P, D_dino + D_siglip]."""

    def __init__(self, dino: ViTSpec, siglip: ViTSpec):
        super().__init__()
        self.featurizer = VisionTower(dino)
        self.fused_featurizer = VisionTower(siglip)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.featurizer(pixel_values[:, :3]), self.fused_featurizer(pixel_values[:, 3:])], dim=2)


class OpenVLAOFT(ActionTokensMixin, LoraLanguageModelMixin, nn.Module):
    """OpenVLA-OFT policy with the small policy's interface (``pcm_train.policies.SmallVLA``): one action
    chunk = 56 action tokens (8 steps x 7 dims) per prompt + image.

    Build with ``from_checkpoint``. Fine-tuning: full (the parameters that never affect the output — last ViT
    blocks, final ViT norms, SigLIP's ``attn_pool`` — are frozen) or LoRA on the language model
    (``add_lora``; everything else frozen). ``save_merged`` writes a checkpoint in the original layout.
    """

    def __init__(self, config: OpenVLAOFTConfig, processor: OpenVLAProcessor, checkpoint_dir: Path):
        super().__init__()
        self.config = config
        self.processor = processor
        self.checkpoint_dir = Path(checkpoint_dir)
        self.vision_backbone = FusedVisionBackbone(*config.vision)
        self.projector = Projector(sum(v.embed_dim for v in config.vision), config.llama.hidden_size)
        self.language_model = LlamaForCausalLM(config.llama)

    @classmethod
    def from_checkpoint(cls, path, *, dtype: torch.dtype = torch.bfloat16, device="cpu", unnorm_key: str | None = None,
                        lora: tuple[int, float] | None = None) -> "OpenVLAOFT":
        """Load a checkpoint folder (``config.json``, safetensors shards, ``dataset_statistics.json``, optional
        ``preprocessor_config.json``/``tokenizer.json``) strictly, as ``dtype`` on ``device``, in eval mode.
        ``unnorm_key`` picks the action statistics (None: the only ones); ``lora=(r, alpha)`` adds adapters."""
        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}: no config.json (an OpenVLA-OFT Hugging Face checkpoint folder "
                                    "is expected)")
        raw = _read_json(path / "config.json", "config.json")
        config = parse_config(raw, _read_norm_stats(path, raw), unnorm_key)
        processor = OpenVLAProcessor.from_checkpoint(path)
        with torch.device("meta"):  # no memory or init time for weights that are loaded next
            model = cls(config, processor, path)
        expected = {key: tuple(t.shape) for key, t in model.state_dict().items()}
        model.load_state_dict(_load_state_dict(path, expected, dtype, device), strict=True, assign=True)
        model.language_model.model.rotary_emb = LlamaRotaryEmbedding(config.llama, device=device)
        for parameter in model.unused_parameters():
            parameter.requires_grad_(False)
        model.eval()
        if lora is not None:
            model.add_lora(*lora)
        return model

    @classmethod
    def random_init(cls, raw: dict, *, dtype: torch.dtype = torch.bfloat16, device="cpu",
                    seed: int = 0) -> "OpenVLAOFT":
        """A model of ``raw``'s sizes (a parsed ``config.json``, e.g. ``real_size_config()``) with random
        weights and default image normalization, for timing and memory measurements."""
        config = parse_config(raw, raw["norm_stats"], None)
        processor = OpenVLAProcessor(*load_normalization("<none>"), None)
        torch.manual_seed(seed)
        with torch.device(device):
            model = cls(config, processor, Path("<random>")).to(dtype)
        for parameter in model.unused_parameters():
            parameter.requires_grad_(False)
        return model.eval()

    def placeholder_prompts(self, count: int, length: int = 24, generator: torch.Generator | None = None):
        """(input_ids int64 [count, length], attention_mask) of made-up text ids, BOS ... 29871, for
        measurements on a checkpoint without tokenizer files."""
        ids = torch.randint(3, PROMPT_END_ID, (count, length), generator=generator)
        ids[:, 0], ids[:, -1] = BOS_ID, PROMPT_END_ID
        return ids.to(self.device), torch.ones_like(ids, device=self.device)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def unused_parameters(self) -> list[nn.Parameter]:
        """Parameters that never affect the action logits (see ``VisionTower.unused_parameters``)."""
        return self.vision_backbone.featurizer.unused_parameters() + \
            self.vision_backbone.fused_featurizer.unused_parameters()

    # ----- inputs -----

    def encode_prompts(self, tasks: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Task strings -> (input_ids int64 [B, P], attention_mask int64 [B, P]), left-padded, BOS ... 29871,
        on the model's device. Needs the checkpoint's tokenizer.json."""
        input_ids, attention_mask = self.processor.encode_prompts(tasks)
        return input_ids.to(self.device), attention_mask.to(self.device)

    def pixel_values_from_images(self, images) -> torch.Tensor:
        """uint8 RGB images [B, H, W, 3] -> float32 [B, 6, 224, 224] on the CPU (see ``OpenVLAProcessor``)."""
        return self.processor.pixel_values(images)

    def observations_to_inputs(self, observations: list[dict]) -> torch.Tensor:
        """Env observation dicts -> float32 [B, 6, 224, 224] ``pixel_values`` from ``obs["image"]``."""
        return self.pixel_values_from_images([o["image"] for o in observations])

    # ----- forward passes -----

    def _check_prompt_bounds(self, prompt_ids: torch.Tensor, prompt_lengths: torch.Tensor) -> None:
        ends = prompt_lengths.cumsum(0)
        if bool((prompt_ids[ends - prompt_lengths] != BOS_ID).any() | (prompt_ids[ends - 1] != PROMPT_END_ID).any()):
            raise ValueError(f"every prompt must start with BOS ({BOS_ID}) and end with {PROMPT_END_ID}, as "
                             "SimpleVLA-RL's prompts do (see OpenVLAProcessor.encode_prompts)")

    def _flatten_prompts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """Left- or right-padded prompts [B, P] -> (real tokens int64 [T] row by row, lengths int64 [B])."""
        _check_int_tensor("input_ids", input_ids, 2, "[B, P]")
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}, "
                             f"got {tuple(getattr(attention_mask, 'shape', ()))}")
        real = attention_mask.bool()
        lengths = real.sum(1)
        columns = torch.arange(input_ids.shape[1], device=input_ids.device)
        right_padded = (real == (columns < lengths[:, None])).all(1)
        left_padded = (real == (columns >= input_ids.shape[1] - lengths[:, None])).all(1)
        if not bool(((right_padded | left_padded) & (lengths > 0)).all()):
            raise ValueError("attention_mask must mark one non-empty run of tokens per row (left or right padding)")
        prompt_ids = input_ids[real].long()
        self._check_prompt_bounds(prompt_ids, lengths)
        return prompt_ids, lengths

    def _assemble(self, prompt_ids, prompt_lengths, pixel_values, chunk_starts, total):
        """Scatter M chunks into a flat sequence float [total, hidden]; also return the action-logit rows [M, 56].

        prompt_ids int64 [T]: the chunks' prompts concatenated; prompt_lengths/chunk_starts int64 [M]: each
        prompt's length and where its chunk begins in the flat sequence. Placeholders stay zero."""
        cfg = self.config
        num_patches, num_actions, device = cfg.num_patches, cfg.num_action_tokens, prompt_ids.device
        prompt_chunk = torch.repeat_interleave(torch.arange(len(prompt_lengths), device=device), prompt_lengths,
                                               output_size=prompt_ids.numel())
        prompt_offset = torch.arange(prompt_ids.numel(), device=device) - \
            (prompt_lengths.cumsum(0) - prompt_lengths)[prompt_chunk]
        embed = self._causal_lm().get_input_embeddings()
        patches = self.projector(self.vision_backbone(pixel_values.to(self.dtype)))  # [M, P, hidden]
        sequence = patches.new_zeros(total, patches.shape[-1])
        # BOS at 0, patches at 1..P, prompt[1:] after them, placeholders zero, STOP last.
        sequence[chunk_starts[prompt_chunk] + prompt_offset + num_patches * (prompt_offset > 0)] = \
            embed(prompt_ids).to(sequence.dtype)
        patch_rows = chunk_starts[:, None] + 1 + torch.arange(num_patches, device=device)
        sequence[patch_rows.flatten()] = patches.flatten(0, 1)
        first_action = chunk_starts + num_patches + prompt_lengths
        sequence[first_action + num_actions] = embed(torch.full_like(prompt_lengths, STOP_ID)).to(sequence.dtype)
        logit_rows = first_action[:, None] - 1 + torch.arange(num_actions, device=device)
        return sequence, logit_rows

    def _logits(self, hidden: torch.Tensor, full_vocab: bool) -> torch.Tensor:
        """Hidden states [..., hidden] -> logits over the 256 action ids (or the full vocabulary)."""
        head = self._causal_lm().get_output_embeddings()
        if full_vocab:
            return head(hidden)
        return hidden @ head.weight[self.config.action_token_start:self.config.vocab_size].t()

    def action_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor, *,
                      full_vocab: bool = False) -> torch.Tensor:
        """Batched forward. input_ids/attention_mask int [B, P] (left- or right-padded, BOS ... 29871),
        pixel_values float [B, 6, 224, 224] -> action logits [B, 56, 256] in the model's dtype
        ([B, 56, vocab] with ``full_vocab``). Independent of the padding."""
        prompt_ids, lengths = self._flatten_prompts(input_ids, attention_mask)
        _check_pixels("pixel_values", pixel_values, input_ids.shape[0], self.config)
        cfg = self.config
        batch, extra = len(lengths), cfg.num_patches + cfg.num_action_tokens + 1
        row_len = int(lengths.max()) + extra
        chunk_starts = torch.arange(batch, device=input_ids.device) * row_len
        sequence, logit_rows = self._assemble(prompt_ids, lengths, pixel_values, chunk_starts, batch * row_len)
        positions = torch.arange(row_len, device=input_ids.device)
        hidden = self._causal_lm().model(inputs_embeds=sequence.view(batch, row_len, -1),
                                         attention_mask=key_padding_mask(lengths + extra, row_len),
                                         position_ids=positions.expand(batch, row_len),
                                         use_cache=False).last_hidden_state
        return self._logits(hidden.flatten(0, 1)[logit_rows], full_vocab)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                pixel_values: torch.Tensor) -> torch.Tensor:
        """Same as ``action_logits`` (so DDP/FSDP wrappers that hook ``forward`` see a call)."""
        return self.action_logits(input_ids, attention_mask, pixel_values)

    def action_logits_packed(self, prompt_ids: torch.Tensor, prompt_cu_seqlens: torch.Tensor,
                             pixel_values: torch.Tensor) -> torch.Tensor:
        """One forward over M packed chunks, block-diagonal non-causal attention. prompt_ids int [Tp] (each
        chunk's unpadded prompt, BOS ... 29871, concatenated), prompt_cu_seqlens int32 [M+1], pixel_values
        float [M, 6, 224, 224] -> action logits [M, 56, 256]; equals ``action_logits`` per chunk."""
        num_chunks = len(check_packed_prompts(prompt_ids, prompt_cu_seqlens))
        lengths = prompt_cu_seqlens.diff().long()
        _check_pixels("pixel_values", pixel_values, num_chunks, self.config)
        prompt_ids = prompt_ids.long()
        self._check_prompt_bounds(prompt_ids, lengths)

        cfg = self.config
        device = prompt_ids.device
        extra = cfg.num_patches + cfg.num_action_tokens + 1
        seq_cu = (prompt_cu_seqlens + extra * torch.arange(num_chunks + 1, device=device)).int()
        total, max_length = prompt_ids.numel() + num_chunks * extra, int(lengths.max()) + extra
        chunk_starts = seq_cu[:-1].long()
        sequence, logit_rows = self._assemble(prompt_ids, lengths, pixel_values, chunk_starts, total)
        sequence_chunk = torch.repeat_interleave(torch.arange(num_chunks, device=device), lengths + extra,
                                                 output_size=total)
        positions = torch.arange(total, device=device) - chunk_starts[sequence_chunk]
        hidden = self._causal_lm().model(inputs_embeds=sequence.unsqueeze(0), position_ids=positions.unsqueeze(0),
                                         use_cache=False, cu_seq_lens_q=seq_cu, cu_seq_lens_k=seq_cu,
                                         max_length_q=max_length, max_length_k=max_length).last_hidden_state
        return self._logits(hidden[0][logit_rows], full_vocab=False)

    # ----- log-probs and acting -----

    def action_bounds(self, unnorm_key: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(q01 float32 [7], q99 float32 [7], mask bool [7]) of ``unnorm_key`` (default: the loaded one)."""
        key = self.config.unnorm_key if unnorm_key is None else resolve_unnorm_key(self.config.norm_stats, unnorm_key)
        stats = self.config.norm_stats[key]["action"]
        mask = stats.get("mask", [True] * self.config.action_dim)  # OpenVLA: no mask = un-normalize every dim
        return (torch.tensor(stats["q01"], dtype=torch.float32), torch.tensor(stats["q99"], dtype=torch.float32),
                torch.tensor(mask, dtype=torch.bool))

    @torch.no_grad()
    def predict_action(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor, *,
                       greedy: bool = False, temperature: float = 1.6, unnorm_key: str | None = None,
                       generator: torch.Generator | list[torch.Generator] | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample (or argmax) one chunk per row over the 256 action bins. Returns responses int64 [B, 56] and
        actions float32 [B, 8, 7] un-normalized with ``unnorm_key``'s q01/q99 where its mask is true (the
        gripper stays raw, 1 = open)."""
        _, responses, normalized = self._sample(input_ids, attention_mask, pixel_values, temperature, greedy, generator)
        q01, q99, mask = (t.to(normalized.device) for t in self.action_bounds(unnorm_key))
        return responses, unnormalize(normalized, q01, q99, mask)

    @torch.no_grad()
    def act(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor, *,
            temperature: float = 1.6, greedy: bool = False,
            generator: torch.Generator | list[torch.Generator] | None = None) -> dict[str, torch.Tensor]:
        """Like ``SmallVLA.act``: responses int64 [B, 56], log_probs float32 [B, 56] (at ``temperature``, also
        when greedy), normalized_actions float32 [B, 8, 7] in [-1, 1] and env_actions (same shape, un-normalized
        with the loaded statistics, gripper mapped to the env's +1 close / -1 open)."""
        logits, responses, normalized = self._sample(input_ids, attention_mask, pixel_values, temperature, greedy,
                                                     generator)
        q01, q99, mask = (t.to(normalized.device) for t in self.action_bounds())
        env_actions = unnormalize(normalized, q01, q99, mask)
        env_actions[..., -1] = gripper_to_env(normalized[..., -1])
        return {"responses": responses, "log_probs": self.log_probs(logits, responses, temperature),
                "normalized_actions": normalized, "env_actions": env_actions}

    # ----- saving -----

    def merged_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict under the checkpoint's key names, LoRA adapters (if any) folded into the Llama weights
        as ``merge_lora`` would; detached tensors in the model's dtype. The model itself is unchanged."""
        from peft.tuners.lora import LoraLayer

        llm = self._causal_lm()
        llm_state = {key.replace(".base_layer.", "."): tensor.detach()
                     for key, tensor in llm.state_dict().items() if ".lora_" not in key}
        for name, module in llm.named_modules():
            if isinstance(module, LoraLayer) and not module.merged:
                delta = sum(module.get_delta_weight(adapter) for adapter in module.active_adapters)
                weight = llm_state[f"{name}.weight"]
                llm_state[f"{name}.weight"] = (weight + delta).to(weight.dtype).detach()  # as peft's in-place merge
        return {**{k: v.detach() for k, v in self.vision_backbone.state_dict(prefix="vision_backbone.").items()},
                **{k: v.detach() for k, v in self.projector.state_dict(prefix="projector.").items()},
                **{f"language_model.{k}": v for k, v in llm_state.items()}}

    def save_merged(self, path, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
        """Write a full checkpoint in the original layout to the new or empty folder ``path``: safetensors shards
        of at most ``max_shard_bytes`` with the original key names (adapters merged) + ``model.safetensors.index.json``,
        every other file of the source checkpoint copied (config.json, tokenizer, processor, ...), and
        ``dataset_statistics.json``. ``from_checkpoint(path)`` reloads it with identical logits."""
        path = Path(path)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise ValueError(f"save_merged: {path} must be a new or empty folder")
        path.mkdir(parents=True, exist_ok=True)
        shards, size = [[]], 0
        state = self.merged_state_dict()
        for key, tensor in state.items():
            nbytes = tensor.numel() * tensor.element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards, size = shards + [[]], 0
            shards[-1].append(key)
            size += nbytes
        weight_map = {}
        for i, keys in enumerate(shards, start=1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file({k: state[k].cpu().contiguous() for k in keys}, str(path / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(keys, name))
        total = sum(t.numel() * t.element_size() for t in state.values())
        (path / WEIGHT_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                    indent=2))
        for source in self.checkpoint_dir.iterdir():
            is_weights = source.name == WEIGHT_INDEX or source.suffix in (".safetensors", ".bin")
            if source.is_file() and not is_weights:
                shutil.copyfile(source, path / source.name)
        if not (path / "dataset_statistics.json").exists():
            (path / "dataset_statistics.json").write_text(json.dumps(self.config.norm_stats, indent=2))
