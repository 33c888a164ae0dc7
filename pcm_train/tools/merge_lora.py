"""Fold trained LoRA adapters into an OpenVLA-OFT checkpoint, in the original layout.

    python -m pcm_train.merge_lora BASE_CHECKPOINT ADAPTERS OUT [--dtype bfloat16]

BASE_CHECKPOINT is the folder training started from (``policy.path``), ADAPTERS
a run's ``checkpoints/step_N/policy`` folder. OUT gets ``config.json``, the
safetensors shards under the original key names and the other files of the
base folder: SimpleVLA-RL / OpenVLA-OFT load it like the base checkpoint.
"""
from __future__ import annotations
from pcm_train.cli import argument_parser, run_command

import sys
from pathlib import Path

import torch


def merge(base: Path, adapters: Path, out: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    from pcm_train.policies.openvla_oft import OpenVLAOFT

    if not (Path(adapters) / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapters}: no adapter_config.json (a run's checkpoints/step_N/policy folder "
                                "written with LoRA is expected)")
    policy = OpenVLAOFT.from_checkpoint(base, dtype=dtype)
    policy.load_lora(str(adapters))
    policy.save_merged(out)
    return Path(out)


def main(argv=None) -> int:
    return run_command(__doc__, _main, argv, own_help=False)


def _main(argv: list[str]) -> int:
    ap = argument_parser("pcm_train.merge_lora", __doc__)
    ap.add_argument("base", type=Path)
    ap.add_argument("adapters", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    args = ap.parse_args(argv)
    out = merge(args.base, args.adapters, args.out, getattr(torch, args.dtype))
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
