"""OpenVLA-OFT inputs: task strings -> prompt token ids, camera images -> the fused backbone's pixels.

Pixels: PIL bicubic resize to 224, /255, normalize with each tower's mean/std from the checkpoint's
``preprocessor_config.json`` (``tvf_normalize_params``), stack DINOv2's 3 channels then SigLIP's.
Prompts: ``tokenizers.Tokenizer.from_file(tokenizer.json)`` on OpenVLA's prompt text, BOS first, token
29871 appended, padded with 32000. See /work/shared/spec/OPENVLA-OFT.md ("Preprocessing", "Tokenizer").
"""
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer

from pcm_train.policies.small_vla import prompt_text

BOS_ID, STOP_ID, PAD_ID = 1, 2, 32000
PROMPT_END_ID = 29871  # SimpleVLA-RL appends it to every prompt ("▁")
IMAGE_SIZE = 224
# Used when preprocessor_config.json is absent: DINOv2's ImageNet stats as saved (rounded to bf16), SigLIP's 0.5.
DEFAULT_NORMALIZE_PARAMS = (
    {"mean": [0.484375, 0.455078125, 0.40625], "std": [0.228515625, 0.2236328125, 0.224609375]},
    {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
)


def load_normalization(checkpoint_dir) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (mean, std), float32 [6] each (DINOv2's 3 then SigLIP's 3), from the checkpoint's
    ``preprocessor_config.json`` ``tvf_normalize_params``, else ``DEFAULT_NORMALIZE_PARAMS``."""
    path = Path(checkpoint_dir) / "preprocessor_config.json"
    params = json.loads(path.read_text()).get("tvf_normalize_params") if path.is_file() else None
    params = params or DEFAULT_NORMALIZE_PARAMS
    if len(params) != 2 or any(len(p["mean"]) != 3 or len(p["std"]) != 3 for p in params):
        raise ValueError(f"{path}: tvf_normalize_params must hold 2 towers x 3 channels of mean/std, got {params}")
    mean = torch.tensor([m for p in params for m in p["mean"]], dtype=torch.float32)
    std = torch.tensor([s for p in params for s in p["std"]], dtype=torch.float32)
    return mean, std


def pixel_values_from_images(images, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 RGB images [B, H, W, 3] (numpy or torch, any H, W) -> float32 [B, 6, 224, 224]: PIL bicubic
    resize to 224, /255, then ``(x - mean) / std`` with mean/std float [6] (channels 0-2 DINOv2, 3-5 SigLIP)."""
    images = np.asarray(images.cpu() if isinstance(images, torch.Tensor) else images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 [B, H, W, 3], got {images.dtype} {images.shape}")
    resized = np.stack([np.asarray(Image.fromarray(image).resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC))
                        for image in images])
    pixels = torch.from_numpy(resized).permute(0, 3, 1, 2).float().div(255.0)
    return (pixels.repeat(1, 2, 1, 1) - mean.view(1, 6, 1, 1)) / std.view(1, 6, 1, 1)


def _tf_crop_and_resize(image: np.ndarray, box: tuple[float, float, float, float], size: int) -> np.ndarray:
    """``tf.image.crop_and_resize`` (bilinear) of one float32 image [H, W, C] with the normalized box
    (y1, x1, y2, x2) to [size, size, C]: samples at ``y1 * (H - 1) + i * (y2 - y1) * (H - 1) / (size - 1)``."""
    def sample_points(start, end, extent):
        points = start * (extent - 1) + np.arange(size, dtype=np.float32) * ((end - start) * (extent - 1) / (size - 1))
        low = np.floor(points).astype(np.int64)
        return low, np.minimum(np.ceil(points).astype(np.int64), extent - 1), (points - low).astype(np.float32)

    (top, bottom, dy), (left, right, dx) = (sample_points(np.float32(box[0]), np.float32(box[2]), image.shape[0]),
                                            sample_points(np.float32(box[1]), np.float32(box[3]), image.shape[1]))
    dx = dx[None, :, None]
    upper = image[top][:, left] + (image[top][:, right] - image[top][:, left]) * dx
    lower = image[bottom][:, left] + (image[bottom][:, right] - image[bottom][:, left]) * dx
    return upper + (lower - upper) * dy[:, None, None]


def libero_policy_image(render, crop_area: float = 0.9) -> np.ndarray:
    """SimpleVLA-RL's LIBERO view: uint8 agentview render [H, W, 3] -> uint8 [224, 224, 3].

    Rotate 180 degrees (``img[::-1, ::-1]``), resize to 224 (PIL Lanczos; SimpleVLA-RL uses a JPEG round
    trip + TF Lanczos3, not reproduced bit for bit), then center-crop ``crop_area`` of the area and resize
    back to 224 exactly as SimpleVLA-RL's ``center_crop_image`` (TF bilinear ``crop_and_resize``, then
    ``convert_image_dtype``'s ``trunc(x * 255.5)``)."""
    render = np.asarray(render)
    if render.ndim != 3 or render.shape[-1] != 3 or render.dtype != np.uint8:
        raise ValueError(f"render must be uint8 [H, W, 3], got {render.dtype} {render.shape}")
    if not 0.0 < crop_area <= 1.0:
        raise ValueError(f"crop_area must be in (0, 1], got {crop_area}")
    image = Image.fromarray(np.ascontiguousarray(render[::-1, ::-1]))
    image = np.asarray(image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS))
    side = np.float32(np.sqrt(crop_area))
    offset = (np.float32(1.0) - side) / 2
    scaled = image.astype(np.float32) * np.float32(1.0 / 255.0)
    cropped = _tf_crop_and_resize(scaled, (offset, offset, offset + side, offset + side), IMAGE_SIZE)
    return np.clip(np.clip(cropped, 0.0, 1.0) * np.float32(255.5), 0, 255).astype(np.uint8)


class PromptTokenizer:
    """OpenVLA prompts -> token ids with the checkpoint's ``tokenizer.json`` (``tokenizers``, no transformers)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    @classmethod
    def from_checkpoint(cls, checkpoint_dir) -> "PromptTokenizer":
        """Load ``tokenizer.json``; FileNotFoundError if the checkpoint has none."""
        path = Path(checkpoint_dir) / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{checkpoint_dir}: no tokenizer.json; OpenVLA-OFT prompts need the checkpoint's "
                                    "tokenizer (copy tokenizer.json from the original Hugging Face checkpoint)")
        return cls(Tokenizer.from_file(str(path)))

    def prompt_ids(self, task: str) -> list[int]:
        """Token ids of one task's prompt: BOS (added here if the tokenizer's post-processor did not), the
        prompt text, then 29871 unless the text already ends with it."""
        ids = self.tokenizer.encode(prompt_text(task)).ids
        if not ids or ids[0] != BOS_ID:
            ids = [BOS_ID] + ids
        return ids if ids[-1] == PROMPT_END_ID else ids + [PROMPT_END_ID]

    def encode(self, tasks: list[str], padding_side: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids int64 [B, P], attention_mask int64 [B, P]) padded with PAD_ID on ``padding_side``
        ("left" as SimpleVLA-RL's rollout, or "right")."""
        if not isinstance(tasks, (list, tuple)) or not tasks or not all(isinstance(t, str) for t in tasks):
            raise ValueError(f"tasks must be a non-empty list of str, got {tasks!r}")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        rows = [self.prompt_ids(task) for task in tasks]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), PAD_ID, dtype=torch.int64)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.int64)
        for i, row in enumerate(rows):
            span = slice(width - len(row), width) if padding_side == "left" else slice(0, len(row))
            input_ids[i, span] = torch.tensor(row)
            attention_mask[i, span] = 1
        return input_ids, attention_mask


class OpenVLAProcessor:
    """A checkpoint's image normalization and (when it ships ``tokenizer.json``) its prompt tokenizer."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, tokenizer: PromptTokenizer | None,
                 checkpoint_dir: str = "<memory>"):
        self.mean, self.std, self.tokenizer = mean, std, tokenizer
        self.checkpoint_dir = str(checkpoint_dir)

    @classmethod
    def from_checkpoint(cls, checkpoint_dir) -> "OpenVLAProcessor":
        mean, std = load_normalization(checkpoint_dir)
        has_tokenizer = (Path(checkpoint_dir) / "tokenizer.json").is_file()
        tokenizer = PromptTokenizer.from_checkpoint(checkpoint_dir) if has_tokenizer else None
        return cls(mean, std, tokenizer, checkpoint_dir)

    def encode_prompts(self, tasks: list[str], padding_side: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
        """``PromptTokenizer.encode``; FileNotFoundError when the checkpoint had no tokenizer.json."""
        if self.tokenizer is None:
            raise FileNotFoundError(f"{self.checkpoint_dir}: no tokenizer.json, so prompts cannot be encoded "
                                    "(copy tokenizer.json from the original Hugging Face checkpoint)")
        return self.tokenizer.encode(tasks, padding_side)

    def pixel_values(self, images) -> torch.Tensor:
        """uint8 images [B, H, W, 3] -> float32 [B, 6, 224, 224] (``pixel_values_from_images``)."""
        return pixel_values_from_images(images, self.mean, self.std)
