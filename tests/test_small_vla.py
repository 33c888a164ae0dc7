"""SmallVLA, its packed bidirectional attention and the action-token conversions."""
import pytest
import torch
import torch.nn.functional as F

from pcm_train.policies.action_tokens import (NUM_ACTION_BINS, bin_centers, gripper_to_env, normalized_to_tokens,
                                     tokens_to_normalized, unnormalize)
from pcm_train.policies import SmallVLA, SmallVLAConfig
from pcm_train.policies.small_vla import STOP_ID
from pcm_train.policies.varlen_attention import ATTENTION_NAME, varlen_bidirectional_attention

TASKS = ["pick up the black bowl", "Open the top drawer of the cabinet and put the bowl inside", "stop"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return SmallVLA(SmallVLAConfig()).eval()


@pytest.fixture(scope="module")
def batch(model):
    input_ids, attention_mask = model.encode_prompts(TASKS)
    pixel_values = torch.randn(len(TASKS), 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return input_ids, attention_mask, pixel_values


def packed(input_ids, attention_mask):
    """Unpadded prompts concatenated, with their int32 cu_seqlens."""
    lengths = attention_mask.sum(1)
    cu_seqlens = F.pad(lengths.cumsum(0), (1, 0)).int()
    return input_ids[attention_mask.bool()], cu_seqlens


# ----- model forward -----

def test_packed_equals_padded_and_single_chunks(model, batch):
    input_ids, attention_mask, pixel_values = batch
    assert len(set(attention_mask.sum(1).tolist())) == len(TASKS)  # different prompt lengths
    padded = model.action_logits(input_ids, attention_mask, pixel_values)
    assert padded.shape == (3, 56, 256) and padded.dtype == torch.float32
    torch.testing.assert_close(model.action_logits_packed(*packed(input_ids, attention_mask), pixel_values),
                               padded, atol=1e-5, rtol=0)
    for row in range(len(TASKS)):
        n = int(attention_mask[row].sum())
        alone = model.action_logits(input_ids[row:row + 1, :n], attention_mask[row:row + 1, :n],
                                    pixel_values[row:row + 1])
        torch.testing.assert_close(alone, padded[row:row + 1], atol=1e-5, rtol=0)


def test_right_padding_invariance(model, batch):
    input_ids, attention_mask, pixel_values = batch
    more_ids, more_mask = F.pad(input_ids, (0, 9)), F.pad(attention_mask, (0, 9))
    torch.testing.assert_close(model.action_logits(more_ids, more_mask, pixel_values),
                               model.action_logits(input_ids, attention_mask, pixel_values), atol=1e-5, rtol=0)


def test_padded_path_matches_transformers_sdpa_with_bidirectional_mask(model, batch):
    lm_config = model._causal_lm().config
    assert lm_config._attn_implementation == ATTENTION_NAME
    ours = model.action_logits(*batch)
    lm_config._attn_implementation = "sdpa"  # non-causal here because the padding mask is not None
    try:
        reference = model.action_logits(*batch)
    finally:
        lm_config._attn_implementation = ATTENTION_NAME
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)


def test_action_positions_see_the_stop_token(model, batch):
    """Bidirectional: the STOP embedding (last in the chunk) changes the first action's logits."""
    embedding = model._causal_lm().get_input_embeddings().weight
    before = model.action_logits(*batch)
    saved = embedding.data[STOP_ID].clone()
    embedding.data[STOP_ID] += 1.0
    try:
        after = model.action_logits(*batch)
    finally:
        embedding.data[STOP_ID] = saved
    assert (after[:, 0] - before[:, 0]).abs().max() > 1e-4


def test_varlen_attention_matches_per_chunk_sdpa():
    gen = torch.Generator().manual_seed(0)
    lengths = [3, 7, 1, 5]
    cu_seqlens = torch.tensor([0, 3, 10, 11, 16], dtype=torch.int32)
    for kv_heads in (4, 2):
        query = torch.randn(16, 4, 8, generator=gen, requires_grad=True)
        key = torch.randn(16, kv_heads, 8, generator=gen, requires_grad=True)
        value = torch.randn(16, kv_heads, 8, generator=gen, requires_grad=True)
        out = varlen_bidirectional_attention(query, key, value, cu_seqlens, max(lengths))
        pieces = []
        for start, end in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
            q, k, v = (t[start:end].transpose(0, 1) for t in (query, key, value))
            pieces.append(F.scaled_dot_product_attention(q, k, v, enable_gqa=kv_heads != 4).transpose(0, 1))
        reference = torch.cat(pieces)
        torch.testing.assert_close(out, reference, atol=1e-5, rtol=0)
        grads = torch.autograd.grad(out.square().sum(), (query, key, value))
        reference_grads = torch.autograd.grad(reference.square().sum(), (query, key, value))
        for got, expected in zip(grads, reference_grads):
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


# ----- checkpoints and LoRA -----

def test_save_load_round_trip(model, batch, tmp_path):
    model.save_pretrained(tmp_path)
    loaded = SmallVLA.from_pretrained(tmp_path).eval()
    saved_fields = {k: v for k, v in model.config.to_dict().items() if k != "_name_or_path"}
    assert {k: v for k, v in loaded.config.to_dict().items() if k != "_name_or_path"} == saved_fields
    assert torch.equal(loaded.action_logits(*batch), model.action_logits(*batch))


def test_lora_trains_only_adapters_and_round_trips(batch, tmp_path):
    torch.manual_seed(0)
    model = SmallVLA(SmallVLAConfig())
    model.save_pretrained(tmp_path / "base")
    model.add_lora(r=4, alpha=8)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}

    input_ids, attention_mask, pixel_values = batch
    prompt_ids, cu_seqlens = packed(input_ids, attention_mask)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):  # lora_B starts at zero, so lora_A only moves on the second step
        optimizer.zero_grad()
        model.action_logits_packed(prompt_ids, cu_seqlens, pixel_values).logsumexp(-1).mean().backward()
        optimizer.step()
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed == trainable

    model.eval()
    logits = model.action_logits(*batch)
    with pytest.raises(ValueError, match="save_lora"):
        model.save_pretrained(tmp_path / "refused")
    model.save_lora(tmp_path / "adapters")
    reloaded = SmallVLA.from_pretrained(tmp_path / "base")
    reloaded.load_lora(tmp_path / "adapters")
    assert torch.equal(reloaded.eval().action_logits(*batch), logits)

    model.merge_lora()
    model.save_pretrained(tmp_path / "merged")
    merged = SmallVLA.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(merged.action_logits(*batch), logits, atol=1e-5, rtol=0)


# ----- acting -----

def test_act_shapes_and_log_probs(model, batch):
    out = model.act(*batch, temperature=1.6, generator=torch.Generator().manual_seed(0))
    assert out["responses"].shape == (3, 56) and out["responses"].dtype == torch.int64
    assert out["log_probs"].shape == (3, 56) and out["log_probs"].dtype == torch.float32
    assert out["normalized_actions"].shape == out["env_actions"].shape == (3, 8, 7)
    start = model.config.action_token_start
    assert ((out["responses"] >= start) & (out["responses"] < start + NUM_ACTION_BINS)).all()
    logits = model.action_logits(*batch)
    torch.testing.assert_close(out["log_probs"], model.log_probs(logits, out["responses"], 1.6), atol=1e-6, rtol=0)
    torch.testing.assert_close(out["normalized_actions"].flatten(1), tokens_to_normalized(out["responses"], start))
    gripper_bins = out["responses"].view(3, 8, 7)[..., 6] - start
    assert torch.equal(out["env_actions"][..., 6], torch.where(gripper_bins >= 65, 1.0, -1.0))
    torch.testing.assert_close(out["env_actions"][..., :6], out["normalized_actions"][..., :6])  # default q01/q99

    again = model.act(*batch, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again["responses"], out["responses"])
    greedy = model.act(*batch, greedy=True)
    assert torch.equal(greedy["responses"] - start, logits.argmax(-1))


# ----- action tokens -----

def test_bin_centers():
    centers = bin_centers()
    assert centers.shape == (255,)
    torch.testing.assert_close(centers[[0, -1]], torch.tensor([-1 + 1 / 255, 1 - 1 / 255]))


@pytest.mark.parametrize("start", [31744, 259])
def test_action_token_round_trips(start):
    values = torch.rand(1000, generator=torch.Generator().manual_seed(0)) * 2 - 1
    tokens = normalized_to_tokens(values, start)
    assert tokens.dtype == torch.int64
    assert ((values - tokens_to_normalized(tokens, start)).abs() <= 1 / 255 + 1e-6).all()  # half a bin
    every_token = start + torch.arange(1, NUM_ACTION_BINS)
    assert torch.equal(normalized_to_tokens(tokens_to_normalized(every_token, start), start), every_token)
    assert tokens_to_normalized(torch.tensor([start]), start) == tokens_to_normalized(torch.tensor([start + 1]), start)


@pytest.mark.parametrize("start", [31744, 259])
def test_gripper_mapping(start):
    bins = torch.arange(NUM_ACTION_BINS)
    env = gripper_to_env(tokens_to_normalized(start + bins, start))
    assert torch.equal(env, torch.where(bins >= 65, 1.0, -1.0))  # +1 = close
    assert torch.equal(gripper_to_env(torch.tensor([1.0, 0.0])), torch.tensor([-1.0, 1.0]))  # 1 = open


def test_unnormalize():
    actions = torch.tensor([[-1.0, 0.0, 1.0]])
    q01, q99 = torch.tensor([0.0, -2.0, 1.0]), torch.tensor([1.0, 2.0, 3.0])
    out = unnormalize(actions, q01, q99, torch.tensor([True, True, False]))
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.0, 1.0]]))


# ----- bad inputs -----

def test_bad_inputs_raise(model, batch):
    input_ids, attention_mask, pixel_values = batch
    prompt_ids, cu_seqlens = packed(input_ids, attention_mask)
    logits = torch.zeros(2, 56, 256)
    start = model.config.action_token_start
    cases = {
        "input_ids": lambda: model.action_logits(input_ids[0], attention_mask, pixel_values),
        "attention_mask": lambda: model.action_logits(input_ids, attention_mask[:, :-1], pixel_values),
        "right-padded": lambda: model.action_logits(input_ids, attention_mask.flip(1), pixel_values),
        "pixel_values": lambda: model.action_logits(input_ids, attention_mask, pixel_values[:2]),
        "prompt_cu_seqlens must be": lambda: model.action_logits_packed(prompt_ids, cu_seqlens.long(), pixel_values),
        "prompt_cu_seqlens must start": lambda: model.action_logits_packed(prompt_ids[:-1], cu_seqlens, pixel_values),
        "BOS": lambda: model.action_logits_packed(prompt_ids.roll(1), cu_seqlens, pixel_values),
        "pixel_values ": lambda: model.action_logits_packed(prompt_ids, cu_seqlens, pixel_values[:, :2]),
        "responses": lambda: model.log_probs(logits, torch.full((2, 55), start), 1.0),
        "action token ids": lambda: model.log_probs(logits, torch.zeros(2, 56, dtype=torch.long), 1.0),
        "temperature": lambda: model.log_probs(logits, torch.full((2, 56), start), 0.0),
        "tasks": lambda: model.encode_prompts("pick up the bowl"),
        "token_ids": lambda: tokens_to_normalized(torch.tensor([start - 1]), start),
        "q99": lambda: unnormalize(torch.zeros(4, 7), torch.zeros(7), torch.zeros(6), torch.ones(7, dtype=bool)),
        "cu_seqlens": lambda: varlen_bidirectional_attention(torch.zeros(5, 2, 4), torch.zeros(5, 2, 4),
                                                             torch.zeros(5, 2, 4),
                                                             torch.tensor([0, 2, 4], dtype=torch.int32), 2),
        "max_seqlen": lambda: varlen_bidirectional_attention(torch.zeros(5, 2, 4), torch.zeros(5, 2, 4),
                                                             torch.zeros(5, 2, 4),
                                                             torch.tensor([0, 2, 5], dtype=torch.int32), 2),
        "image_size": lambda: SmallVLAConfig(image_size=30),
        "action_q01": lambda: SmallVLAConfig(action_q01=[0.0] * 6),
    }
    for expected, call in cases.items():
        with pytest.raises(ValueError, match=expected.strip()):
            call()


def test_packed_attention_path_is_named_and_logged_once(caplog, monkeypatch):
    from pcm_train.policies import varlen_attention as va

    q = torch.randn(5, 2, 4)
    assert va.packed_attention_path(q) == (va.PADDED_SDPA, "CPU tensors")

    class FakeCuda:  # what the dispatch reads of a CUDA tensor
        is_cuda, dtype = True, torch.bfloat16

    monkeypatch.setattr(va, "flash_attn_varlen_func", None)
    path, reason = va.packed_attention_path(FakeCuda())
    assert path == va.PADDED_SDPA and "flash-attn is not installed" in reason
    monkeypatch.setattr(va, "flash_attn_varlen_func", object())
    assert va.packed_attention_path(FakeCuda())[0] == va.FLASH
    FakeCuda.dtype = torch.float32
    assert "fp16/bf16" in va.packed_attention_path(FakeCuda())[1]

    monkeypatch.setattr(va, "_reported", set())
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    with caplog.at_level("INFO", logger=va.__name__):
        for _ in range(3):
            va.varlen_bidirectional_attention(q, q, q, cu, 3)
    assert [r.getMessage() for r in caplog.records] == ["packed attention: sdpa_padded (CPU tensors)"]
