"""LoRA adapters (peft) on a policy's ``language_model``, shared by every policy class."""
from __future__ import annotations

import contextlib

from transformers import LlamaForCausalLM

LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoraLanguageModelMixin:
    """For an ``nn.Module`` whose Llama is ``self.language_model``: LoRA on its linear layers, adapter
    save/load/merge, and gradient checkpointing. ``lm_head`` is never a target: the action heads slice
    its weight rows directly."""

    @property
    def has_lora(self) -> bool:
        """Whether the language model is wrapped in a peft ``PeftModel``."""
        return hasattr(self.language_model, "get_base_model")

    def _causal_lm(self) -> LlamaForCausalLM:
        """The Llama model itself (LoRA layers, if added, are injected into it in place)."""
        return self.language_model.get_base_model() if self.has_lora else self.language_model

    def enable_gradient_checkpointing(self) -> None:
        """Recompute the decoder layers' activations during backward (less memory, more compute)."""
        self._causal_lm().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def add_lora(self, r: int = 32, alpha: float = 32, dropout: float = 0.0,
                 target_modules: tuple[str, ...] = LORA_TARGET_MODULES) -> None:
        """Wrap the language model in a peft ``PeftModel`` with LoRA on ``target_modules`` and freeze every
        other weight. With a bf16/fp16 base, peft keeps the adapters in float32."""
        from peft import LoraConfig, get_peft_model

        if self.has_lora:
            raise ValueError("add_lora: the language model already has LoRA adapters")
        if not isinstance(r, int) or r <= 0 or not alpha > 0 or not 0.0 <= dropout < 1.0:
            raise ValueError(f"add_lora needs r > 0 (int), alpha > 0, 0 <= dropout < 1; got {r}, {alpha}, {dropout}")
        if not target_modules or "lm_head" in target_modules:
            raise ValueError(f"target_modules must be non-empty and exclude 'lm_head', got {target_modules}")
        self.requires_grad_(False)
        lora = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules))
        self.language_model = get_peft_model(self.language_model, lora)

    @contextlib.contextmanager
    def adapters_disabled(self):
        """Within this context the policy is its base model (the KL reference); adapters return after."""
        if not self.has_lora:
            raise ValueError("adapters_disabled: no LoRA adapters; the base policy is the policy itself")
        with self.language_model.disable_adapter():
            yield

    def save_lora(self, path: str) -> None:
        """Write the LoRA adapters (peft ``adapter_config.json`` + ``adapter_model.safetensors``) to ``path``."""
        if not self.has_lora:
            raise ValueError("save_lora: no LoRA adapters; call add_lora or load_lora first")
        self.language_model.save_pretrained(path)

    def load_lora(self, path: str, trainable: bool = False) -> None:
        """Attach adapters saved by ``save_lora`` to this (base) model; ``trainable`` keeps them trainable,
        with every other weight frozen as in ``add_lora``."""
        from peft import PeftModel

        if self.has_lora:
            raise ValueError("load_lora: the language model already has LoRA adapters")
        self.requires_grad_(False)
        self.language_model = PeftModel.from_pretrained(self.language_model, path, is_trainable=trainable)

    def merge_lora(self) -> None:
        """Fold the adapters into the Llama weights and drop the peft wrapper. Trainability flags stay."""
        if not self.has_lora:
            raise ValueError("merge_lora: no LoRA adapters to merge")
        self.language_model = self.language_model.merge_and_unload()
