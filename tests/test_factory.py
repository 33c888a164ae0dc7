"""Building the trained policy from the config, and saving it as checkpoints do."""
from pathlib import Path

import pytest
import torch

from pcm_train.training.checkpoint import save_policy
from pcm_train.config import load_config
from pcm_train.policies.factory import build_policy

TINY_OFT = Path(__file__).resolve().parents[2] / "shared" / "golden" / "openvla-oft-tiny" / "checkpoint"


def test_small_vla_from_config_and_saved_path(tmp_path):
    cfg = load_config(["policy.hidden_size=16", "policy.num_layers=1", "policy.lora_r=0"]).policy
    torch.manual_seed(0)
    policy = build_policy(cfg, device=torch.device("cpu"))
    assert policy.config.hidden_size == 16 and not policy.has_lora
    save_policy(policy, tmp_path / "p")
    cfg.path, cfg.lora_r = str(tmp_path / "p"), 4
    again = build_policy(cfg, device=torch.device("cpu"))
    assert again.has_lora
    with pytest.raises(FileNotFoundError, match="policy.path"):
        cfg.path = str(tmp_path)
        build_policy(cfg, device=torch.device("cpu"))


@pytest.mark.skipif(not TINY_OFT.is_dir(), reason="the tiny OpenVLA-OFT checkpoint lives in ../shared/golden")
def test_openvla_oft_from_config_and_saved_full_weights(tmp_path):
    cfg = load_config(["policy.name=openvla_oft", f"policy.path={TINY_OFT}", "policy.lora_r=0"]).policy
    policy = build_policy(cfg, device=torch.device("cpu"))
    assert policy.config.action_token_start == 31744
    save_policy(policy, tmp_path / "saved")
    cfg.path = str(tmp_path / "saved")
    reloaded = build_policy(cfg, device=torch.device("cpu"))
    for (name, a), (_, b) in zip(policy.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), name
    cfg.path = None
    with pytest.raises(FileNotFoundError, match="policy.path is required"):
        build_policy(cfg, device=torch.device("cpu"))


@pytest.mark.skipif(not TINY_OFT.is_dir(), reason="the tiny OpenVLA-OFT checkpoint lives in ../shared/golden")
def test_compare_update_on_the_tiny_openvla_oft(capsys):
    import json

    from pcm_train.tools import compare_update

    assert compare_update.main(["--policy", "openvla_oft", "--checkpoint", str(TINY_OFT), "--chunks", "6",
                                "--num-prompts", "1", "--group-size", "2", "--repeats", "1", "--budget", "2",
                                "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["policy"]["name"] == "openvla_oft" and report["modes"]["pcm"]["chunks"] <= 4
    assert report["modes"]["full"]["activation_bytes"] > report["modes"]["pcm"]["activation_bytes"] > 0
    with pytest.raises(SystemExit):
        compare_update.parse_args(["--policy", "openvla_oft"])


@pytest.mark.skipif(not TINY_OFT.is_dir(), reason="the tiny OpenVLA-OFT checkpoint lives in ../shared/golden")
def test_merge_lora_cli_writes_a_checkpoint_with_the_trained_logits(tmp_path):
    from pcm_train.tools import merge_lora
    from pcm_train.policies.openvla_oft import OpenVLAOFT

    trained = OpenVLAOFT.from_checkpoint(TINY_OFT, dtype=torch.float32, lora=(4, 4))
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    trained.save_lora(str(tmp_path / "adapters"))
    assert merge_lora.main([str(TINY_OFT), str(tmp_path / "adapters"), str(tmp_path / "merged"),
                            "--dtype", "float32"]) == 0
    merged = OpenVLAOFT.from_checkpoint(tmp_path / "merged", dtype=torch.float32)
    ids = torch.tensor([[1, 450, 3, 29871]])
    pixels = torch.randn(1, 6, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = trained.action_logits(ids, torch.ones_like(ids), pixels)
        torch.testing.assert_close(merged.action_logits(ids, torch.ones_like(ids), pixels), expected,
                                   rtol=1e-4, atol=1e-4)
    assert merge_lora.main([str(TINY_OFT), str(tmp_path), str(tmp_path / "m2")]) == 2
