"""The two ViT towers of OpenVLA's fused DINOv2 + SigLIP backbone, with timm's module names.

timm cannot be imported here (it pulls in torchvision), so the towers are rebuilt from plain modules whose
state-dict keys equal timm's (``patch_embed.proj``, ``pos_embed``, ``cls_token``/``reg_token``,
``blocks.N.{norm1, attn.qkv, attn.proj, ls1.scale_factor, norm2, mlp.fc1, mlp.fc2, ls2.scale_factor}``,
``norm``, ``attn_pool.*``). OpenVLA reads the output of the second-to-last block without the final norm
(timm's ``get_intermediate_layers(n={depth - 2})``), so the last block, ``norm`` and ``attn_pool`` are
loaded and saved but never run. See /work/shared/spec/OPENVLA-OFT.md ("Vision features").
"""
from dataclasses import dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class ViTSpec:
    """Sizes of one tower. ``mlp_ratio`` gives the MLP width ``int(embed_dim * mlp_ratio)`` as in timm."""

    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float
    patch_size: int = 14
    image_size: int = 224
    class_token: bool = False
    reg_tokens: int = 0
    layer_scale: bool = False
    attn_pool: bool = False

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.class_token) + self.reg_tokens


# timm model ids used by OpenVLA's "dinosiglip-vit-so-224px" backbone, at OpenVLA's 224 px input.
TIMM_VIT_SPECS = {
    "vit_large_patch14_reg4_dinov2.lvd142m": ViTSpec(embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4.0,
                                                     class_token=True, reg_tokens=4, layer_scale=True),
    "vit_so400m_patch14_siglip_224": ViTSpec(embed_dim=1152, depth=27, num_heads=16, mlp_ratio=3.7362,
                                             attn_pool=True),
}


def vit_spec(timm_id: str, overrides: dict | None = None) -> ViTSpec:
    """The tower for a timm model id, with ``overrides`` (field -> value, e.g. ``vit_overrides`` of a test
    checkpoint) applied. Raises ValueError for an unknown id or override field."""
    if timm_id not in TIMM_VIT_SPECS:
        raise ValueError(f"vision tower {timm_id!r} is not supported; known timm ids: {sorted(TIMM_VIT_SPECS)}")
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - {f.name for f in fields(ViTSpec)})
    if unknown:
        raise ValueError(f"vit_overrides for {timm_id!r} has unknown fields {unknown}")
    return replace(TIMM_VIT_SPECS[timm_id], **overrides)


class LayerScale(nn.Module):
    """Per-channel scale; the parameter is saved as ``scale_factor`` (timm's ``gamma``, renamed by OpenVLA)."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale_factor = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale_factor


class Mlp(nn.Module):
    """fc1 -> exact GELU -> fc2."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Attention(nn.Module):
    """Multi-head self-attention with a fused, biased qkv projection: [N, L, D] -> [N, L, D]."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, dim = x.shape
        q, k, v = self.qkv(x).view(n, length, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, length, dim))


class Block(nn.Module):
    """Pre-norm transformer block (LayerNorm eps 1e-6), optional LayerScale on both branches."""

    def __init__(self, spec: ViTSpec):
        super().__init__()
        dim = spec.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, spec.num_heads)
        self.ls1 = LayerScale(dim) if spec.layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * spec.mlp_ratio))
        self.ls2 = LayerScale(dim) if spec.layer_scale else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class AttentionPoolWeights(nn.Module):
    """SigLIP's attention-pooling head (timm ``AttentionPoolLatent``). OpenVLA never runs it; its weights
    are kept so the checkpoint loads strictly and saves back unchanged."""

    def __init__(self, spec: ViTSpec):
        super().__init__()
        dim = spec.embed_dim
        self.latent = nn.Parameter(torch.zeros(1, 1, dim))
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * spec.mlp_ratio))


class PatchEmbed(nn.Module):
    """Non-overlapping patches: images [N, 3, H, W] -> [N, num_patches, D]."""

    def __init__(self, spec: ViTSpec):
        super().__init__()
        self.proj = nn.Conv2d(3, spec.embed_dim, spec.patch_size, spec.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTower(nn.Module):
    """One timm ViT as OpenVLA uses it: images float [N, 3, H, W] -> patch features [N, num_patches, D],
    the second-to-last block's output with the prefix (class/register) tokens dropped, no final norm."""

    def __init__(self, spec: ViTSpec):
        super().__init__()
        if spec.depth < 2:
            raise ValueError(f"a tower needs depth >= 2 (OpenVLA reads the second-to-last block), got {spec.depth}")
        self.spec = spec
        dim = spec.embed_dim
        self.patch_embed = PatchEmbed(spec)
        self.pos_embed = nn.Parameter(torch.zeros(1, spec.num_patches, dim))
        if spec.class_token:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        if spec.reg_tokens:
            self.reg_token = nn.Parameter(torch.zeros(1, spec.reg_tokens, dim))
        self.blocks = nn.ModuleList(Block(spec) for _ in range(spec.depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        if spec.attn_pool:
            self.attn_pool = AttentionPoolWeights(spec)

    def unused_parameters(self) -> list[nn.Parameter]:
        """Parameters that never affect the output: the last block, ``norm`` and ``attn_pool``."""
        unused = [self.blocks[-1], self.norm] + ([self.attn_pool] if self.spec.attn_pool else [])
        return [p for module in unused for p in module.parameters()]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images) + self.pos_embed  # position embedding on patches only
        prefix = ([self.cls_token] if self.spec.class_token else []) + \
                 ([self.reg_token] if self.spec.reg_tokens else [])
        x = torch.cat([p.expand(x.shape[0], -1, -1) for p in prefix] + [x], dim=1)
        for block in self.blocks[:-1]:
            x = block(x)
        return x[:, self.spec.num_prefix_tokens:]
