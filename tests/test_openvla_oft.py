"""OpenVLA-OFT on current transformers: the tiny checkpoint against the original stack's outputs, padding and
packing invariance, LoRA and merged-checkpoint round trips, the processor, and the loading errors."""
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from pcm_train.policies.action_tokens import tokens_to_normalized
from pcm_train.policies.openvla_oft import WEIGHT_INDEX, OpenVLAOFT
from pcm_train.policies.openvla_processor import (DEFAULT_NORMALIZE_PARAMS, PAD_ID, PROMPT_END_ID, OpenVLAProcessor,
                                                  libero_policy_image, load_normalization, pixel_values_from_images)
from pcm_train.policies.small_vla import prompt_text

GOLDEN = Path(__file__).parents[2] / "shared/golden/openvla-oft-tiny"
CHECKPOINT = GOLDEN / "checkpoint"
pytestmark = pytest.mark.skipif(not (CHECKPOINT / "config.json").is_file(),
                                reason=f"tiny OpenVLA-OFT checkpoint not found at {CHECKPOINT}")


def load(path=CHECKPOINT, **kwargs) -> OpenVLAOFT:
    return OpenVLAOFT.from_checkpoint(path, dtype=torch.float32, **kwargs)


@pytest.fixture(scope="module")
def golden():
    return torch.load(GOLDEN / "logprob_forward.pt", weights_only=False)


@pytest.fixture(scope="module")
def model():
    return load()


@pytest.fixture(scope="module")
def prompts(golden):
    """Three prompts of lengths 18, 10 and 14 (BOS ... 29871), their images and responses."""
    ids = golden["A_input_ids"]
    rows = [ids[0], torch.cat([ids[1, :9], ids[1, -1:]]), torch.cat([ids[2, :13], ids[2, -1:]])]
    return rows, golden["A_pixel_values"], golden["A_responses"]


def padded(rows, side: str):
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), PAD_ID)
    attention_mask = torch.zeros(len(rows), width, dtype=torch.int64)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        input_ids[i, span], attention_mask[i, span] = row, 1
    return input_ids, attention_mask


def copy_checkpoint(dest: Path, skip=(), edit_config=None) -> Path:
    """Symlink the tiny checkpoint's files into ``dest`` (minus ``skip``), optionally editing config.json."""
    dest.mkdir(parents=True, exist_ok=True)
    for source in CHECKPOINT.iterdir():
        if source.name in skip:
            continue
        if source.name == "config.json" and edit_config is not None:
            config = json.loads(source.read_text())
            edit_config(config)
            (dest / source.name).write_text(json.dumps(config))
        else:
            (dest / source.name).symlink_to(source)
    return dest


def write_test_tokenizer(path: Path) -> Tokenizer:
    """A word-level tokenizer whose post-processor prepends BOS, like Llama's (no real vocabulary offline)."""
    words = ["In", ":", "What", "action", "should", "the", "robot", "take", "to", "?", "Out", "open", "drawer",
             "pick", "up", "bowl"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: 3 + i for i, w in enumerate(words)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer.save(str(path / "tokenizer.json"))
    return tokenizer


# ----- the original stack's outputs -----

def test_loads_strictly_with_the_checkpoint_keys(model):
    index = json.loads((CHECKPOINT / WEIGHT_INDEX).read_text())["weight_map"]
    assert set(model.state_dict()) == set(index)
    frozen = {id(p) for p in model.unused_parameters()}
    assert frozen and all(p.requires_grad == (id(p) not in frozen) for p in model.parameters())
    cfg = model.config
    assert (cfg.action_chunk, cfg.action_dim, cfg.num_action_tokens, cfg.action_token_start, cfg.image_size) == \
        (8, 7, 56, 31744, 224)
    assert cfg.unnorm_key == "libero_object_no_noops"


def test_reproduces_the_original_forward(model, golden):
    with torch.no_grad():
        bins = model.action_logits(golden["A_input_ids"], golden["A_attention_mask"], golden["A_pixel_values"])
        full = model.action_logits(golden["A_input_ids"][:1], golden["A_attention_mask"][:1],
                                   golden["A_pixel_values"][:1], full_vocab=True)
    log_probs = model.log_probs(bins, golden["A_responses"], golden["A_temperature"])
    assert (bins - golden["A_logits_bins"]).abs().max() <= 1e-5
    assert (full[0] - golden["A_logits0_full"]).abs().max() <= 1e-5
    assert (log_probs - golden["A_logprobs"]).abs().max() <= 1e-5


# ----- padding and packing -----

def test_left_and_right_padding_and_packing_agree(model, prompts):
    rows, pixels, responses = prompts
    with torch.no_grad():
        single = torch.cat([model.action_logits(r[None], torch.ones(1, len(r), dtype=torch.int64), pixels[i:i + 1])
                            for i, r in enumerate(rows)])
        left = model.action_logits(*padded(rows, "left"), pixels)
        right = model.action_logits(*padded(rows, "right"), pixels)
        cu_seqlens = torch.tensor([0] + [len(r) for r in rows]).cumsum(0).int()
        packed = model.action_logits_packed(torch.cat(rows), cu_seqlens, pixels)
    torch.testing.assert_close(left, single, rtol=0, atol=1e-5)
    torch.testing.assert_close(right, single, rtol=0, atol=1e-5)
    torch.testing.assert_close(model.log_probs(packed, responses, 1.6), model.log_probs(right, responses, 1.6),
                               rtol=0, atol=1e-5)


def test_bad_prompts_are_refused(model, prompts):
    rows, pixels, _ = prompts
    input_ids, attention_mask = padded(rows, "right")
    with pytest.raises(ValueError, match="29871"):
        model.action_logits(input_ids[:, :-1], attention_mask[:, :-1], pixels)  # row 0 loses its 29871
    holes = attention_mask.clone()
    holes[0, 3] = 0
    with pytest.raises(ValueError, match="left or right padding"):
        model.action_logits(input_ids, holes, pixels)
    with pytest.raises(ValueError, match="BOS"):
        model.action_logits_packed(rows[0][1:], torch.tensor([0, 17], dtype=torch.int32), pixels[:1])
    cu_seqlens = torch.tensor([0] + [len(r) for r in rows]).cumsum(0).int()
    with pytest.raises(ValueError, match=r"prompt_cu_seqlens must start at 0, increase strictly and end at "
                                         r"len\(prompt_ids\)"):
        model.action_logits_packed(torch.cat(rows)[:-1], cu_seqlens, pixels)
    with pytest.raises(ValueError, match="prompt_cu_seqlens must be an int32 tensor"):
        model.action_logits_packed(torch.cat(rows), cu_seqlens.long(), pixels)


# ----- acting -----

def test_predict_action_and_act(model, prompts):
    rows, pixels, _ = prompts
    input_ids, attention_mask = padded(rows, "left")
    responses, actions = model.predict_action(input_ids, attention_mask, pixels, greedy=True,
                                              unnorm_key="libero_object")
    with torch.no_grad():
        logits = model.action_logits(input_ids, attention_mask, pixels)
    assert torch.equal(responses, logits.argmax(-1) + 31744)
    normalized = tokens_to_normalized(responses, 31744).view(3, 8, 7)
    q01, q99, _ = model.action_bounds()
    torch.testing.assert_close(actions[..., :6], 0.5 * (normalized[..., :6] + 1) * (q99 - q01 + 1e-8)[:6] + q01[:6])
    assert torch.equal(actions[..., 6], normalized[..., 6])

    first = model.act(input_ids, attention_mask, pixels, generator=torch.Generator().manual_seed(0))
    again = model.act(input_ids, attention_mask, pixels, generator=torch.Generator().manual_seed(0))
    assert torch.equal(first["responses"], again["responses"])
    torch.testing.assert_close(first["log_probs"], model.log_probs(logits, first["responses"], 1.6))
    assert set(first["env_actions"][..., 6].unique().tolist()) <= {-1.0, 1.0}


# ----- LoRA and saving -----

def randomize_adapters(model: OpenVLAOFT) -> None:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)


def test_adapters_and_merged_checkpoint_round_trip(prompts, tmp_path):
    rows, pixels, responses = prompts
    inputs = (*padded(rows, "right"), pixels)
    tuned = load(lora=(8, 16))
    assert {n for n, p in tuned.named_parameters() if p.requires_grad} == \
        {n for n in dict(tuned.named_parameters()) if "lora_" in n}
    randomize_adapters(tuned)
    tuned.save_lora(tmp_path / "adapters")
    reloaded = load()
    reloaded.load_lora(tmp_path / "adapters")
    tuned.save_merged(tmp_path / "merged", max_shard_bytes=2_000_000)
    merged = load(tmp_path / "merged")
    with torch.no_grad():
        expected = tuned.action_logits(*inputs)
        assert torch.equal(reloaded.action_logits(*inputs), expected)
        torch.testing.assert_close(merged.action_logits(*inputs), expected, rtol=0, atol=1e-5)
        assert (expected - load().action_logits(*inputs)).abs().max() > 1e-3  # the adapters do change the logits

    index = json.loads((tmp_path / "merged" / WEIGHT_INDEX).read_text())["weight_map"]
    assert set(index) == set(json.loads((CHECKPOINT / WEIGHT_INDEX).read_text())["weight_map"])
    assert len(set(index.values())) > 1
    assert (tmp_path / "merged/config.json").read_text() == (CHECKPOINT / "config.json").read_text()
    assert (tmp_path / "merged/dataset_statistics.json").is_file()
    expected_state = tuned.merged_state_dict()
    tuned.merge_lora()
    for key, tensor in tuned.state_dict().items():
        torch.testing.assert_close(expected_state[key], tensor, rtol=0, atol=0)


def test_save_merged_without_adapters_is_identical(model, golden, tmp_path):
    model.save_merged(tmp_path / "copy")
    copy = load(tmp_path / "copy")
    inputs = (golden["A_input_ids"], golden["A_attention_mask"], golden["A_pixel_values"])
    with torch.no_grad():
        assert torch.equal(copy.action_logits(*inputs), model.action_logits(*inputs))
    with pytest.raises(ValueError, match="new or empty"):
        model.save_merged(tmp_path / "copy")


def test_actor_update_on_packed_chunks_matches_rollout_log_probs(tmp_path):
    from pcm_train.algorithm.actor import make_optimizer, update_actor
    from pcm_train.config import load_config
    from pcm_train.algorithm.controller import PCMController
    from pcm_train.algorithm.grpo import token_mask
    from pcm_train.integrations.simplevla import pcm_shrink_batch
    from pcm_train.tools.synthetic import synthetic_rollout_batch

    write_test_tokenizer(copy_checkpoint(tmp_path / "ckpt"))
    policy = load(tmp_path / "ckpt", lora=(4, 8))
    policy.enable_gradient_checkpointing()
    batch = synthetic_rollout_batch(policy, num_prompts=1, group_size=2, num_chunks=3, seed=0)
    cfg = load_config(["pcm.strategy=full"])
    kept, _ = pcm_shrink_batch(batch, PCMController(cfg.pcm), action_token_start=policy.config.action_token_start)
    before = [p.detach().clone() for p in policy.parameters() if p.requires_grad]
    _, _, new_log_probs = update_actor(policy, make_optimizer(policy, cfg.actor), kept, cfg.actor)
    valid = token_mask(batch.batch["finish_step"], 3)
    torch.testing.assert_close(new_log_probs[valid], batch.batch["old_log_probs"][valid], rtol=0, atol=1e-5)
    after = [p for p in policy.parameters() if p.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(before, after))


# ----- processor -----

def test_prompts_from_the_checkpoint_tokenizer(tmp_path, golden):
    tokenizer = write_test_tokenizer(copy_checkpoint(tmp_path / "ckpt"))
    policy = load(tmp_path / "ckpt")
    tasks = ["Open the drawer", "pick up the bowl"]
    input_ids, attention_mask = policy.encode_prompts(tasks)
    for row, mask, task in zip(input_ids, attention_mask, tasks):
        expected = tokenizer.encode(prompt_text(task)).ids + [PROMPT_END_ID]
        assert tokenizer.decode(expected[:-1], skip_special_tokens=False).split() == \
            ["<s>", "In", ":", "What", "action", "should", "the", "robot", "take", "to"] + task.lower().split() + \
            ["?", "Out", ":"]  # BOS, the prompt format, the task lower-cased (no <unk>)
        assert row[mask.bool()].tolist() == expected
        assert mask.tolist() == sorted(mask.tolist()) and set(row[~mask.bool()].tolist()) <= {PAD_ID}  # left-padded
    with torch.no_grad():
        logits = policy.action_logits(input_ids, attention_mask, golden["A_pixel_values"][:2])
    assert logits.shape == (2, 56, 256)


def test_missing_tokenizer_is_a_clear_error(model):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        model.encode_prompts(["open the drawer"])


def test_pixel_values_resize_and_normalize(tmp_path):
    mean, std = load_normalization(CHECKPOINT)  # no preprocessor_config.json: the spec's defaults
    assert mean.tolist() == DEFAULT_NORMALIZE_PARAMS[0]["mean"] + DEFAULT_NORMALIZE_PARAMS[1]["mean"]
    images = np.random.default_rng(0).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    pixels = pixel_values_from_images(images, mean, std)
    manual = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    torch.testing.assert_close(pixels[:, :3], (manual - mean[:3, None, None]) / std[:3, None, None])
    torch.testing.assert_close(pixels[:, 3:], manual * 2 - 1)
    assert pixel_values_from_images(images[:, :200, :180], mean, std).shape == (2, 6, 224, 224)

    params = [{"mean": [0.1, 0.2, 0.3], "std": [1.0, 2.0, 4.0]}, {"mean": [0.0] * 3, "std": [1.0] * 3}]
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"tvf_normalize_params": params}))
    processor = OpenVLAProcessor.from_checkpoint(tmp_path)
    assert processor.mean.tolist() == pytest.approx([0.1, 0.2, 0.3, 0, 0, 0])
    assert processor.tokenizer is None


def test_libero_view_rotates_and_crops():
    render = np.zeros((256, 256, 3), dtype=np.uint8)
    render[:128] = 200  # top half bright
    view = libero_policy_image(render)
    assert view.shape == (224, 224, 3) and view.dtype == np.uint8
    assert (view[0] == 0).all() and (view[-1] == 200).all()  # rotated 180 degrees
    assert (libero_policy_image(np.full((256, 256, 3), 77, dtype=np.uint8)) == 77).all()


# ----- loading errors -----

def test_loading_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load(tmp_path)
    with pytest.raises(FileNotFoundError, match="model-00002-of-00004"):
        load(copy_checkpoint(tmp_path / "no_shard", skip={"model-00002-of-00004.safetensors"}))
    with pytest.raises(ValueError, match=r"unknown unnorm_key 'libero_10'.*libero_object_no_noops"):
        load(unnorm_key="libero_10")

    def unknown_tower(config):
        config["timm_model_ids"][1] = "vit_base_patch16_224"
    with pytest.raises(ValueError, match="'vit_base_patch16_224' is not supported; known"):
        load(copy_checkpoint(tmp_path / "tower", edit_config=unknown_tower))

    def wider_mlp(config):
        config["text_config"]["intermediate_size"] = 96
    with pytest.raises(ValueError, match="shapes differ.*mlp"):
        load(copy_checkpoint(tmp_path / "shape", edit_config=wider_mlp))


def test_key_mismatch_names_the_keys(tmp_path):
    shard = "model-00003-of-00004.safetensors"
    dest = copy_checkpoint(tmp_path / "renamed", skip={shard})
    state = load_file(CHECKPOINT / shard)
    state["language_model.model.layers.0.mlp.upper_proj.weight"] = state.pop(
        "language_model.model.layers.0.mlp.up_proj.weight")
    save_file(state, dest / shard)
    with pytest.raises(ValueError, match=r"1 missing \(first: \['language_model\.model\.layers\.0\.mlp\.up_proj\."
                                         r"weight'\]\), 1 unexpected \(first: \['language_model\.model\.layers\.0\."
                                         r"mlp\.upper_proj"):
        load(dest)


# ----- the README's command line -----

def readme_openvla_line() -> list[str]:
    """The README's OpenVLA-OFT run, ``[python -m pcm_train.run] policy.name=openvla_oft policy.path=...``,
    as the command's argv."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    lines = [span for span in re.findall(r"`([^`]*)`", readme) if "policy.name=openvla_oft" in span
             and "policy.path=" in span]
    assert len(lines) == 1, lines
    argv = lines[0].split()
    return argv[3:] if argv[:3] == ["python", "-m", "pcm_train.run"] else argv


class RecordingPool:
    """Stands in for ``EnvWorkerPool`` (no renderer here): records how the run builds its envs and
    serves the fake pool's images at the size asked for."""

    built: list[dict] = []

    def __init__(self, num_workers, suite, *, camera, image_size, privileged_state, max_steps, **options):
        from fake_env import FakePool

        RecordingPool.built.append({"suite": suite, "camera": camera, "image_size": image_size,
                                    "privileged_state": privileged_state})
        self.pool = FakePool(image_size=image_size, max_steps=max_steps, close_steps=12)

    def __getattr__(self, name):
        return getattr(self.pool, name)


def test_the_readme_openvla_oft_line_runs(tmp_path, monkeypatch, capsys):
    """The README line as written (its path replaced by the tiny checkpoint with a tokenizer) resolves to
    the paper's observation mode and starts a run: policy, rendered-env pool, a step, its checkpoint."""
    from pcm_train import run
    from pcm_train.config import ConfigError, load_config
    from pcm_train.envs import libero, workers
    from pcm_train.training.checkpoint import latest_checkpoint

    checkpoint = copy_checkpoint(tmp_path / "ckpt")
    write_test_tokenizer(checkpoint)
    argv = [f"policy.path={checkpoint}" if arg.startswith("policy.path=") else arg for arg in readme_openvla_line()]
    assert argv[0] == "policy.name=openvla_oft" and len(argv) == 2
    cfg = load_config(run.resolve_overrides(argv))
    assert (cfg.policy.name, cfg.policy.path, cfg.policy.observation, cfg.env.camera) == \
        ("openvla_oft", str(checkpoint), "image", True)
    assert cfg.policy.lora_r == 32 and cfg.rollout == load_config(["preset=quick"]).rollout  # quick's run size
    # what the user sets explicitly stays; a state-mode request is refused with the fix
    assert load_config(run.resolve_overrides(argv + ["policy.lora_r=4"])).policy.lora_r == 4
    with pytest.raises(ConfigError, match="openvla_oft sees images only.*policy.observation=image env.camera=true"):
        load_config(run.resolve_overrides(argv + ["policy.observation=state"]))
    with pytest.raises(ConfigError, match="policy.observation=image env.camera=true"):
        load_config(run.resolve_overrides(["preset=quick"] + argv))
    assert load_config(run.resolve_overrides(["policy.name=small_vla"])).policy.observation == "state"

    renderer = []
    monkeypatch.setattr(libero, "choose_renderer", lambda: renderer.append(True))
    monkeypatch.setattr(workers, "EnvWorkerPool", RecordingPool)
    monkeypatch.setattr(RecordingPool, "built", [])
    monkeypatch.chdir(tmp_path)
    assert run.main(argv + ["trainer.total_steps=1"]) == 0  # one of quick's four steps keeps the test short
    assert renderer and RecordingPool.built == [{"suite": "libero_object", "camera": True, "image_size": 224,
                                                 "privileged_state": False}]
    (run_dir,) = (tmp_path / "runs").iterdir()
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["policy"]["observation"] == "image" and saved["policy"]["path"] == str(checkpoint)
    assert (latest_checkpoint(run_dir) / "policy" / "adapter_config.json").is_file()
    assert "finished at step" in capsys.readouterr().out
