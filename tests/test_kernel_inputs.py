"""Bad and edge-case calls on the public kernel API, on both backends.

Every refusal is a ``TypeError``/``ValueError`` whose message names the argument and what was
expected, raised before any kernel launch or torch-path computation (the launchers and the
vectorized entry points are replaced by tripwires for the bad calls), identically on the torch
and the Triton path. The edge cases that must work (C = 0, N = 0, L = 0, budget > C, all-zero
weights, +-inf commands, NaN data in packing) give the same result on both backends.

Tensors on the ``meta`` device stand in for a second device (no GPU needed).
"""
import numpy as np
import pytest
import torch

import pcm_kernels as pk
from pcm_kernels.sampling import MAX_PADDED_BUDGET

BACKENDS = ["torch", "triton"]
NAN, INF = float("nan"), float("inf")
KEEP = [1.0, 1.0, 1.0, 1.0, 1.0]


def G(N=2, C=3, L=4, fill=-1.0):
    """gripper [N, C, L] (open by default)."""
    return torch.full((N, C, L), fill)


def G_with(value, where=(0, 1, 2)):
    g = G()
    g[where] = value
    return g


def W(N=2, C=3):
    return torch.tensor([[0.5, 1.0, 2.0], [1.0, 0.0, 3.0]])[:N, :C]


def W_with(value):
    w = W()
    w[1, 2] = value
    return w


def I(*rows):
    return torch.tensor(rows, dtype=torch.int64)


def X(N=2, C=3, S=4, F=2):
    return torch.arange(N * C * S * F, dtype=torch.float32).view(N, C, S, F)


def META(t):
    return torch.empty_like(t, device="meta")


def A(N=2, C=3, F=4, labeled_bad=None):
    a = torch.zeros(N, C, F)
    if labeled_bad is not None:
        a[0, 0, 1] = labeled_bad
    return a


LAB = torch.zeros(2, 3, dtype=torch.int8)
SUCC = torch.tensor([True, False])
GRP = torch.tensor([0, 0])


def scores(actions=None, labels=None, success=None, group=None, **kw):
    return pk.phase_scores(A() if actions is None else actions, LAB if labels is None else labels,
                           SUCC if success is None else success, GRP if group is None else group, **kw)


def layout():
    return pk.plan_chunks(I([0], [2]), 3, 4)  # T = 8 tokens


# (id, call, exception type, substring of the message)
BAD_CALLS = {
    "label_phases": [
        ("gripper_list", lambda: pk.label_phases([[[0.0]]]), TypeError, "gripper must be a torch.Tensor"),
        ("gripper_2d", lambda: pk.label_phases(torch.zeros(2, 3)), ValueError, "gripper must have 3 dimensions"),
        ("gripper_int", lambda: pk.label_phases(torch.zeros(2, 3, 4, dtype=torch.int64)), TypeError,
         "gripper must be a floating-point tensor"),
        ("gripper_nan", lambda: pk.label_phases(G_with(NAN)), ValueError,
         "gripper must not contain NaN, found 1 NaN value(s), the first at [0, 1, 2]"),
        ("num_steps_list", lambda: pk.label_phases(G(), [1, 2]), TypeError, "num_steps must be a torch.Tensor"),
        ("num_steps_float", lambda: pk.label_phases(G(), torch.tensor([1.0, 2.0])), TypeError,
         "num_steps must be an integer tensor"),
        ("num_steps_shape", lambda: pk.label_phases(G(), I(1, 2, 3)), ValueError, "num_steps must have shape [N]"),
        ("num_steps_negative", lambda: pk.label_phases(G(), I(-1, 2)), ValueError,
         "num_steps must be in [0, 12]"),
        ("num_steps_past_end", lambda: pk.label_phases(G(), I(13, 2)), ValueError, "num_steps must be in [0, 12]"),
        ("num_steps_device", lambda: pk.label_phases(G(), META(I(1, 2))), ValueError, "num_steps on meta"),
        ("close_above_inf", lambda: pk.label_phases(G(), close_above=INF), ValueError,
         "close_above must be a finite number"),
        ("close_above_-inf", lambda: pk.label_phases(G(), close_above=-INF), ValueError,
         "close_above must be a finite number"),
        ("close_above_nan", lambda: pk.label_phases(G(), close_above=NAN), ValueError,
         "close_above must be a finite number"),
        ("close_above_str", lambda: pk.label_phases(G(), close_above="0"), TypeError,
         "close_above must be a finite real number"),
        ("close_above_tensor", lambda: pk.label_phases(G(), close_above=torch.tensor(0.0)), TypeError,
         "close_above must be a finite real number"),
        ("close_above_bool", lambda: pk.label_phases(G(), close_above=True), TypeError, "close_above"),
        ("sustain_above_1", lambda: pk.label_phases(G(), sustain=1.5), ValueError, "sustain must be in [0, 1]"),
        ("sustain_nan", lambda: pk.label_phases(G(), sustain=NAN), ValueError, "sustain must be a finite number"),
        ("grip_negative", lambda: pk.label_phases(G(), grip=-0.1), ValueError, "grip must be in [0, 1]"),
        ("grip_none", lambda: pk.label_phases(G(), grip=None), TypeError, "grip must be a finite real number"),
        ("low_inf", lambda: pk.label_phases(G(), low=INF), ValueError, "low must be a finite number"),
        ("low_str", lambda: pk.label_phases(G(), low="a"), TypeError, "low must be a finite real number"),
        ("low_grip_sustain_reversed", lambda: pk.label_phases(G(), low=0.8, grip=0.5, sustain=0.2), ValueError,
         "low <= grip <= sustain must hold, got low = 0.8, grip = 0.5, sustain = 0.2"),
        ("grip_above_sustain", lambda: pk.label_phases(G(), grip=0.8), ValueError, "low <= grip <= sustain"),
        ("low_above_grip", lambda: pk.label_phases(G(), low=0.6), ValueError, "low <= grip <= sustain"),
        ("window_negative", lambda: pk.label_phases(G(), window=-1), ValueError, "window must be >= 0"),
        ("window_float", lambda: pk.label_phases(G(), window=1.5), TypeError, "window must be an int"),
        ("window_bool", lambda: pk.label_phases(G(), window=True), TypeError, "window must be an int"),
        ("validate_str", lambda: pk.label_phases(G(), validate="yes"), TypeError, "validate must be a bool"),
    ],
    "phase_scores": [
        ("actions_list", lambda: scores(actions=[[[0.0]]]), TypeError, "actions must be a torch.Tensor"),
        ("actions_int", lambda: scores(actions=torch.zeros(2, 3, 4, dtype=torch.int32)), TypeError,
         "actions must be a floating-point tensor"),
        ("actions_2d", lambda: scores(actions=torch.zeros(2, 3)), ValueError, "actions must have 3 dimensions"),
        ("actions_nan_labeled", lambda: scores(actions=A(labeled_bad=NAN)), ValueError,
         "actions must be finite on labeled chunks (labels >= 0), found nan at [0, 0, 1]"),
        ("actions_inf_labeled", lambda: scores(actions=A(labeled_bad=INF)), ValueError,
         "actions must be finite on labeled chunks"),
        ("labels_float", lambda: scores(labels=torch.zeros(2, 3)), TypeError, "labels must be an integer tensor"),
        ("labels_shape", lambda: scores(labels=torch.zeros(2, 4, dtype=torch.int8)), ValueError,
         "labels must have shape [N, C]"),
        ("labels_above", lambda: scores(labels=torch.full((2, 3), 5, dtype=torch.int8)), ValueError,
         "labels must be in [-1, 4]"),
        ("labels_below", lambda: scores(labels=torch.full((2, 3), -2, dtype=torch.int8)), ValueError,
         "labels must be in [-1, 4]"),
        ("success_int", lambda: scores(success=I(1, 0)), TypeError, "success must be a bool tensor"),
        ("success_shape", lambda: scores(success=torch.tensor([True])), ValueError, "success must have shape [N]"),
        ("group_float", lambda: scores(group=torch.tensor([0.0, 0.0])), TypeError, "group must be an integer tensor"),
        ("group_shape", lambda: scores(group=I(0, 0, 0)), ValueError, "group must have shape [N]"),
        ("group_list", lambda: scores(group=[0, 0]), TypeError, "group must be a torch.Tensor"),
        ("group_device", lambda: scores(group=META(GRP)), ValueError, "group on meta"),
        ("num_phases_zero", lambda: scores(num_phases=0), ValueError, "num_phases must be >= 1"),
        ("num_phases_float", lambda: scores(num_phases=5.0), TypeError, "num_phases must be an int"),
    ],
    "sample_chunks": [
        ("weights_list", lambda: pk.sample_chunks([[1.0]], 1), TypeError, "weights must be a torch.Tensor"),
        ("weights_1d", lambda: pk.sample_chunks(torch.rand(3), 1), ValueError, "weights must have 2 dimensions"),
        ("weights_int", lambda: pk.sample_chunks(I([1, 2]), 1), TypeError, "weights must be a floating-point"),
        ("weights_nan", lambda: pk.sample_chunks(W_with(NAN), 1), ValueError,
         "weights must be finite and >= 0, found nan at [1, 2]"),
        ("weights_inf", lambda: pk.sample_chunks(W_with(INF), 1), ValueError, "weights must be finite and >= 0"),
        ("weights_negative", lambda: pk.sample_chunks(W_with(-0.5), 1), ValueError,
         "weights must be finite and >= 0, found -0.5"),
        ("budget_zero", lambda: pk.sample_chunks(W(), 0), ValueError, "budget must be >= 1"),
        ("budget_negative", lambda: pk.sample_chunks(W(), -3), ValueError, "budget must be >= 1"),
        ("budget_float", lambda: pk.sample_chunks(W(), 2.5), TypeError, "budget must be an int"),
        ("budget_bool", lambda: pk.sample_chunks(W(), True), TypeError, "budget must be an int"),
        ("budget_tensor", lambda: pk.sample_chunks(W(), torch.tensor(2)), TypeError, "budget must be an int"),
        ("budget_huge", lambda: pk.sample_chunks(W(), 2**40), ValueError,
         f"budget must be <= {MAX_PADDED_BUDGET}, got {2**40} (the largest budget allowed is max(C, 65536)"),
        ("budget_cap_plus_1", lambda: pk.sample_chunks(W(), MAX_PADDED_BUDGET + 1), ValueError,
         "budget must be <= 65536"),
        ("num_chunks_negative", lambda: pk.sample_chunks(W(), 2, I(-1, 3)), ValueError,
         "num_chunks must be in [0, 3]"),
        ("num_chunks_above_C", lambda: pk.sample_chunks(W(), 2, I(4, 3)), ValueError, "num_chunks must be in [0, 3]"),
        ("num_chunks_float", lambda: pk.sample_chunks(W(), 2, torch.tensor([1.0, 2.0])), TypeError,
         "num_chunks must be an integer tensor"),
        ("num_chunks_shape", lambda: pk.sample_chunks(W(), 2, I(1, 2, 3)), ValueError, "num_chunks must have shape"),
        ("num_chunks_int", lambda: pk.sample_chunks(W(), 2, 3), TypeError, "num_chunks must be a torch.Tensor"),
        ("num_chunks_device", lambda: pk.sample_chunks(W(), 2, META(I(1, 2))), ValueError, "num_chunks on meta"),
        ("generator_str", lambda: pk.sample_chunks(W(), 2, generator="seed"), TypeError,
         "generator must be a torch.Generator or None"),
        ("generator_int", lambda: pk.sample_chunks(W(), 2, generator=0), TypeError, "generator must be"),
        ("validate_int", lambda: pk.sample_chunks(W(), 2, validate=1), TypeError, "validate must be a bool"),
        ("return_weights_int", lambda: pk.sample_chunks(W(), 2, return_weights=1), TypeError,
         "return_weights must be a bool"),
    ],
    "select_chunks": [
        ("keep_probs_str", lambda: pk.select_chunks(G(), None, "abcde", 2), TypeError,
         "keep_probs must be a float tensor or a sequence of [5] non-negative finite floats"),
        ("keep_probs_strs", lambda: pk.select_chunks(G(), None, list("abcde"), 2), TypeError,
         "keep_probs must be a float tensor or a sequence of [5]"),
        ("keep_probs_none", lambda: pk.select_chunks(G(), None, None, 2), TypeError, "keep_probs must be"),
        ("keep_probs_scalar", lambda: pk.select_chunks(G(), None, 1.0, 2), TypeError, "keep_probs must be"),
        ("keep_probs_dict", lambda: pk.select_chunks(G(), None, {0: 1.0}, 2), TypeError, "keep_probs must be"),
        ("keep_probs_short", lambda: pk.select_chunks(G(), None, [1.0] * 4, 2), ValueError,
         "keep_probs must have shape [P] (one per Phase) = (5,)"),
        ("keep_probs_2d", lambda: pk.select_chunks(G(), None, [KEEP], 2), ValueError,
         "keep_probs must have 1 dimensions"),
        ("keep_probs_int_tensor", lambda: pk.select_chunks(G(), None, I(1, 1, 1, 1, 1), 2), TypeError,
         "keep_probs must be a floating-point tensor"),
        ("keep_probs_negative", lambda: pk.select_chunks(G(), None, [1.0, -1.0, 1.0, 1.0, 1.0], 2), ValueError,
         "keep_probs must be finite and >= 0, found -1.0 at [1]"),
        ("keep_probs_nan", lambda: pk.select_chunks(G(), None, [NAN] + KEEP[1:], 2), ValueError,
         "keep_probs must be finite and >= 0, found nan"),
        ("keep_probs_inf", lambda: pk.select_chunks(G(), None, torch.tensor([INF] + KEEP[1:]), 2), ValueError,
         "keep_probs must be finite and >= 0, found inf"),
        ("keep_probs_device", lambda: pk.select_chunks(G(), None, torch.ones(5, device="meta"), 2), ValueError,
         "keep_probs must be on the CPU or on gripper's device (cpu), got meta"),
        ("gripper_nan", lambda: pk.select_chunks(G_with(NAN, (1, 0, 0)), None, KEEP, 2), ValueError,
         "gripper must not contain NaN, found 1 NaN value(s), the first at [1, 0, 0]"),
        ("gripper_int", lambda: pk.select_chunks(torch.zeros(2, 3, 4, dtype=torch.int8), None, KEEP, 2), TypeError,
         "gripper must be a floating-point tensor"),
        ("num_steps_negative", lambda: pk.select_chunks(G(), I(0, -5), KEEP, 2), ValueError,
         "num_steps must be in [0, 12]"),
        ("num_steps_past_end", lambda: pk.select_chunks(G(), I(0, 100), KEEP, 2), ValueError,
         "num_steps must be in [0, 12]"),
        ("close_above_inf", lambda: pk.select_chunks(G(), None, KEEP, 2, close_above=INF), ValueError,
         "close_above must be a finite number"),
        ("rules_reversed", lambda: pk.select_chunks(G(), None, KEEP, 2, low=0.9, grip=0.5, sustain=0.1),
         ValueError, "low <= grip <= sustain must hold"),
        ("window_negative", lambda: pk.select_chunks(G(), None, KEEP, 2, window=-2), ValueError,
         "window must be >= 0"),
        ("budget_zero", lambda: pk.select_chunks(G(), None, KEEP, 0), ValueError, "budget must be >= 1"),
        ("budget_float", lambda: pk.select_chunks(G(), None, KEEP, 2.0), TypeError, "budget must be an int"),
        ("budget_huge", lambda: pk.select_chunks(G(), None, KEEP, 10**12), ValueError, "budget must be <= 65536"),
        ("generator_str", lambda: pk.select_chunks(G(), None, KEEP, 2, generator="x"), TypeError,
         "generator must be a torch.Generator or None"),
        ("return_weights_str", lambda: pk.select_chunks(G(), None, KEEP, 2, return_weights="yes"), TypeError,
         "return_weights must be a bool"),
        ("validate_none", lambda: pk.select_chunks(G(), None, KEEP, 2, validate=None), TypeError,
         "validate must be a bool"),
    ],
    "gather_chunks": [
        ("x_list", lambda: pk.gather_chunks([[[0.0]]], I([0])), TypeError, "x must be a torch.Tensor"),
        ("x_2d", lambda: pk.gather_chunks(torch.zeros(2, 3), I([0], [1])), ValueError,
         "x must have at least 3 dimensions"),
        ("index_list", lambda: pk.gather_chunks(X(), [[0], [1]]), TypeError, "index must be a torch.Tensor"),
        ("index_float", lambda: pk.gather_chunks(X(), torch.tensor([[0.0], [1.0]])), TypeError,
         "index must be an integer tensor"),
        ("index_bool", lambda: pk.gather_chunks(X(), torch.tensor([[True], [False]])), TypeError,
         "index must be an integer tensor"),
        ("index_1d", lambda: pk.gather_chunks(X(), I(0, 1)), ValueError, "index must have 2 dimensions"),
        ("index_rows", lambda: pk.gather_chunks(X(), I([0])), ValueError, "index must have shape [N, B] with N = 2"),
        ("index_above_C", lambda: pk.gather_chunks(X(), I([0], [3])), ValueError,
         "index values must be -1 or in [0, 3), got range [0, 3]"),
        ("index_below_-1", lambda: pk.gather_chunks(X(), I([0], [-2])), ValueError,
         "index values must be -1 or in [0, 3)"),
        ("index_repeat", lambda: pk.gather_chunks(X(), I([1, 1], [0, -1])), ValueError,
         "index rows must not repeat a chunk id"),
        ("index_device", lambda: pk.gather_chunks(X(), META(I([0], [1]))), ValueError, "index on meta"),
        ("seqlens_list", lambda: pk.gather_chunks(X(), I([0], [1]), [[1] * 3] * 2), TypeError,
         "seqlens must be a torch.Tensor"),
        ("seqlens_float", lambda: pk.gather_chunks(X(), I([0], [1]), torch.ones(2, 3)), TypeError,
         "seqlens must be an integer tensor"),
        ("seqlens_shape", lambda: pk.gather_chunks(X(), I([0], [1]), torch.ones(2, 4, dtype=torch.int64)),
         ValueError, "seqlens must have shape [N, C] = (2, 3)"),
        ("seqlens_negative", lambda: pk.gather_chunks(X(), I([0], [1]), torch.full((2, 3), -1)), ValueError,
         "seqlens must be in [0, 4] (S)"),
        ("seqlens_above_S", lambda: pk.gather_chunks(X(), I([0], [1]), torch.full((2, 3), 5)), ValueError,
         "seqlens must be in [0, 4] (S)"),
        ("seqlens_device", lambda: pk.gather_chunks(X(), I([0], [1]), META(torch.ones(2, 3, dtype=torch.int64))),
         ValueError, "seqlens on meta"),
    ],
    "plan_chunks": [
        ("index_float", lambda: pk.plan_chunks(torch.zeros(2, 1), 3, 4), TypeError, "index must be an integer"),
        ("num_chunks_str", lambda: pk.plan_chunks(I([0], [1]), "3", 4), TypeError, "num_chunks must be an int"),
        ("num_chunks_negative", lambda: pk.plan_chunks(I([-1], [-1]), -3, 4), ValueError,
         "num_chunks must be >= 0"),
        ("chunk_len_negative", lambda: pk.plan_chunks(I([0], [1]), 3, -4), ValueError, "chunk_len must be >= 0"),
        ("chunk_len_float", lambda: pk.plan_chunks(I([0], [1]), 3, 4.0), TypeError, "chunk_len must be an int"),
        ("index_above_C", lambda: pk.plan_chunks(I([0], [5]), 3, 4), ValueError, "index values must be -1 or in"),
        ("seqlens_shape", lambda: pk.plan_chunks(I([0], [1]), 3, 4, torch.ones(2, 2, dtype=torch.int64)),
         ValueError, "seqlens must have shape [N, C]"),
        ("seqlens_device", lambda: pk.plan_chunks(I([0], [1]), 3, 4, META(torch.ones(2, 3, dtype=torch.int64))),
         ValueError, "seqlens on meta"),
    ],
    "scatter_chunks": [
        ("values_list", lambda: pk.scatter_chunks([0.0] * 8, layout()), TypeError, "values must be a torch.Tensor"),
        ("values_0d", lambda: pk.scatter_chunks(torch.tensor(1.0), layout()), ValueError,
         "values must have at least 1 dimensions"),
        ("values_rows", lambda: pk.scatter_chunks(torch.zeros(7, 2), layout()), ValueError,
         "values must have T = 8 rows"),
        ("values_device", lambda: pk.scatter_chunks(torch.zeros(8, 2, device="meta"), layout()), ValueError,
         "values on meta"),
        ("packed_str", lambda: pk.scatter_chunks(torch.zeros(8, 2), "layout"), TypeError,
         "packed must be a PackedChunks"),
        ("packed_dict", lambda: pk.scatter_chunks(torch.zeros(8, 2), {}), TypeError, "packed must be a PackedChunks"),
        ("layout_gather_shape", lambda: layout().gather(torch.zeros(2, 4, 4)), ValueError,
         "x must have leading shape [N, C, S] = (2, 3, 4)"),
        ("layout_gather_list", lambda: layout().gather([0.0]), TypeError, "x must be a torch.Tensor"),
    ],
}

CASES = [pytest.param(call, exc, text, id=f"{fn}-{name}")
         for fn, rows in BAD_CALLS.items() for name, call, exc, text in rows]

# every kernel launcher and torch-path entry point: a bad call must be refused before any of them
TRIPWIRES = [
    ("pcm_kernels.phases.kernels", "launch_label_phases"),
    ("pcm_kernels.sampling.kernels", "launch_sample_chunks"),
    ("pcm_kernels.sampling.kernels", "launch_select_chunks"),
    ("pcm_kernels.packing.kernels", "launch_gather"),
    ("pcm_kernels.packing.kernels", "launch_scatter"),
    ("pcm_kernels.phases.vectorized", "label_phases"),
    ("pcm_kernels.phases.vectorized", "phase_scores"),
    ("pcm_kernels.sampling.vectorized", "sample"),
    ("pcm_kernels.sampling.vectorized", "sample_with_weights"),
    ("pcm_kernels.packing.vectorized", "gather"),
    ("pcm_kernels.packing.vectorized", "scatter"),
]


@pytest.fixture
def tripwires(monkeypatch):
    import importlib

    def tripped(*args, **kwargs):
        raise AssertionError("the bad call reached a kernel launch or the torch path")
    for module, name in TRIPWIRES:
        monkeypatch.setattr(importlib.import_module(module), name, tripped)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("call, exc, text", CASES)
def test_bad_call_is_refused(call, exc, text, backend, use_backend, tripwires):
    use_backend(backend)
    with pytest.raises(exc) as info:
        call()
    assert type(info.value) is exc, f"expected exactly {exc.__name__}, got {type(info.value).__name__}"
    assert text in str(info.value), f"{text!r} not in {str(info.value)!r}"


def test_every_public_function_has_bad_calls():
    assert set(BAD_CALLS) == {"label_phases", "phase_scores", "sample_chunks", "select_chunks", "gather_chunks",
                              "plan_chunks", "scatter_chunks"}


# ---- edge cases that must work, identically on both backends ---------------------------------------

def _on_both(use_backend, call):
    """call() on the torch, then the Triton backend; returns both results."""
    results = []
    for backend in BACKENDS:
        use_backend(backend)
        results.append(call())
    return results


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and \
            torch.equal(a.nan_to_num(7.25), b.nan_to_num(7.25))
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _signal():
    """[2, 6, 4] gripper: row 0 grasps chunks 2-3, row 1 never closes."""
    g = torch.full((2, 6, 4), -1.0)
    g[0, 2:4] = 1.0
    return g


def _seed(s=0):
    return torch.Generator().manual_seed(s)


EDGE_CASES = {
    # label_phases
    "label_C0": (lambda: pk.label_phases(torch.zeros(2, 0, 4)), torch.zeros(2, 0, dtype=torch.int8)),
    "label_N0": (lambda: pk.label_phases(torch.zeros(0, 3, 4)), torch.zeros(0, 3, dtype=torch.int8)),
    "label_L0": (lambda: pk.label_phases(torch.zeros(2, 3, 0)), torch.full((2, 3), -1, dtype=torch.int8)),
    "label_L0_steps": (lambda: pk.label_phases(torch.zeros(2, 3, 0), I(0, 0)),
                       torch.full((2, 3), -1, dtype=torch.int8)),
    "label_inf_commands": (lambda: pk.label_phases(_signal() * INF), pk.label_phases(_signal())),
    "label_window_huge": (lambda: pk.label_phases(_signal(), window=2**80), pk.label_phases(_signal(), window=6)),
    "label_steps_bounds": (lambda: pk.label_phases(_signal(), I(0, 24)),
                           torch.tensor([[-1] * 6, [0] * 6], dtype=torch.int8)),
    "label_numpy_scalars": (lambda: pk.label_phases(_signal(), close_above=np.float32(0.0), sustain=np.float64(0.75),
                                                    window=np.int64(3)), pk.label_phases(_signal())),
    # phase_scores
    "scores_C0": (lambda: pk.phase_scores(torch.zeros(2, 0, 4), torch.zeros(2, 0, dtype=torch.int8), SUCC, GRP),
                  (torch.zeros(5), torch.zeros(5, dtype=torch.bool))),
    "scores_N0": (lambda: pk.phase_scores(torch.zeros(0, 3, 4), torch.zeros(0, 3, dtype=torch.int8),
                                          torch.zeros(0, dtype=torch.bool), torch.zeros(0, dtype=torch.int64)),
                  (torch.zeros(5), torch.zeros(5, dtype=torch.bool))),
    "scores_all_pad_nan_actions": (lambda: scores(actions=torch.full((2, 3, 4), NAN),
                                                  labels=torch.full((2, 3), -1, dtype=torch.int8)),
                                   (torch.zeros(5), torch.zeros(5, dtype=torch.bool))),
    # sample_chunks
    "sample_C0": (lambda: pk.sample_chunks(torch.zeros(2, 0), 3, return_weights=True),
                  (torch.full((2, 3), -1), torch.zeros(2, 3))),
    "sample_N0": (lambda: pk.sample_chunks(torch.zeros(0, 3), 2, return_weights=True),
                  (torch.zeros(0, 2, dtype=torch.int64), torch.zeros(0, 2))),
    "sample_budget_above_C": (lambda: pk.sample_chunks(W(), 5, return_weights=True, generator=_seed()),
                              (I([0, 1, 2, -1, -1], [0, 2, -1, -1, -1]),
                               torch.tensor([[1.0, 1, 1, 0, 0], [1, 1, 0, 0, 0]]))),
    "sample_all_zero_weights": (lambda: pk.sample_chunks(torch.zeros(2, 3), 2, generator=_seed()),
                                torch.full((2, 2), -1)),
    "sample_num_chunks_zero_and_C": (lambda: pk.sample_chunks(W(), 3, I(0, 3), generator=_seed()),
                                     I([-1, -1, -1], [0, 2, -1])),
    "sample_budget_at_cap_N0": (lambda: pk.sample_chunks(torch.zeros(0, 3), MAX_PADDED_BUDGET),
                                torch.zeros(0, MAX_PADDED_BUDGET, dtype=torch.int64)),
    "sample_validate_false_nan": (lambda: pk.sample_chunks(W_with(NAN), 3, validate=False, generator=_seed()),
                                  I([0, 1, 2], [0, -1, -1])),  # NaN > 0 is False: not eligible
    # select_chunks
    "select_C0": (lambda: pk.select_chunks(torch.zeros(2, 0, 4), None, KEEP, 2, return_weights=True),
                  (torch.zeros(2, 0, dtype=torch.int8), torch.full((2, 2), -1), torch.zeros(2, 2))),
    "select_N0": (lambda: pk.select_chunks(torch.zeros(0, 3, 4), None, KEEP, 2),
                  (torch.zeros(0, 3, dtype=torch.int8), torch.zeros(0, 2, dtype=torch.int64))),
    "select_L0": (lambda: pk.select_chunks(torch.zeros(2, 3, 0), None, KEEP, 2, return_weights=True),
                  (torch.full((2, 3), -1, dtype=torch.int8), torch.full((2, 2), -1), torch.zeros(2, 2))),
    "select_zero_keep": (lambda: pk.select_chunks(_signal(), None, [0.0] * 5, 3, generator=_seed()),
                         (pk.label_phases(_signal()), torch.full((2, 3), -1))),
    "select_budget_above_C": (lambda: pk.select_chunks(_signal(), I(24, 8), [1, 1, 1, 0, 1], 8, generator=_seed(),
                                                       return_weights=True),
                              (pk.label_phases(_signal(), I(24, 8)),  # RELEASE_RAMP (chunks 4, 5) weighs 0
                               I([0, 1, 2, 3, -1, -1, -1, -1], [0, 1, -1, -1, -1, -1, -1, -1]),
                               torch.tensor([[1.0] * 4 + [0.0] * 4, [1.0] * 2 + [0.0] * 6]))),
    "select_keep_int_list_and_tuple": (lambda: pk.select_chunks(_signal(), None, (1, 1, 1, 1, 1), 6, generator=_seed()),
                                       (pk.label_phases(_signal()), I(*[list(range(6))] * 2))),
    "select_validate_false_nan": (lambda: pk.select_chunks(G_with(NAN), None, KEEP, 3, validate=False,
                                                           generator=_seed()),
                                  (pk.label_phases(G()), I([0, 1, 2], [0, 1, 2]))),
    # packing
    "gather_N0": (lambda: _packed(torch.zeros(0, 3, 4, 2), torch.zeros(0, 2, dtype=torch.int64)),
                  (torch.zeros(0, 2), [0], 0, torch.zeros(0, 3, 4, 2))),
    "gather_C0": (lambda: _packed(torch.zeros(2, 0, 4, 2), torch.full((2, 1), -1)),
                  (torch.zeros(0, 2), [0], 0, torch.zeros(2, 0, 4, 2))),
    "gather_S0": (lambda: _packed(torch.zeros(2, 3, 0, 2), I([0], [2])),
                  (torch.zeros(0, 2), [0, 0, 0], 0, torch.zeros(2, 3, 0, 2))),
    "gather_B0": (lambda: _packed(X(), torch.zeros(2, 0, dtype=torch.int64)),
                  (torch.zeros(0, 2), [0], 0, torch.zeros(2, 3, 4, 2))),
    "gather_nan_values_copied": (lambda: _packed(X() * torch.tensor([NAN, 1.0]), I([1], [-1]),
                                                 torch.tensor([[4, 2, 4], [4, 4, 4]])),
                                 (X()[0, 1, :2] * torch.tensor([NAN, 1.0]), [0, 2], 2, None)),
}


def _packed(x, index, seqlens=None):
    packed = pk.gather_chunks(x, index, seqlens)
    dense = pk.scatter_chunks(packed.values, packed)
    return packed.values, packed.cu_seqlens.tolist(), packed.max_seqlen, dense


@pytest.mark.parametrize("name", list(EDGE_CASES))
def test_edge_case_same_on_both_backends(name, use_backend):
    call, expected = EDGE_CASES[name]
    got_torch, got_triton = _on_both(use_backend, call)
    assert _same(got_torch, got_triton), f"torch {got_torch} != triton {got_triton}"
    use_backend("torch")
    expected = expected() if callable(expected) else expected
    if name == "gather_nan_values_copied":
        got_torch = got_torch[:3]
        expected = expected[:3]
    assert _same(got_torch, expected), f"{got_torch} != expected {expected}"


def test_nan_gripper_with_validate_false_counts_as_open(use_backend):
    """validate=False skips the scan (sync-free on CUDA): NaN then compares as not closed, on both backends."""
    g = _signal()
    g[0, 2, :3] = NAN  # 3 of 4 steps of a grasped chunk
    opened = g.nan_to_num(-1.0)
    got = _on_both(use_backend, lambda: pk.label_phases(g, validate=False))
    assert _same(got[0], got[1]) and torch.equal(got[0], pk.label_phases(opened))
    for backend in BACKENDS:
        use_backend(backend)
        with pytest.raises(ValueError, match="gripper must not contain NaN"):
            pk.label_phases(g)


def test_validate_false_skips_range_scans(use_backend):
    """Out-of-range num_steps / num_chunks are not scanned with validate=False: they act as clamped."""
    labels = _on_both(use_backend, lambda: pk.label_phases(_signal(), I(-3, 99), validate=False))
    assert _same(labels[0], labels[1]) and torch.equal(labels[0], pk.label_phases(_signal(), I(0, 24)))
    index = _on_both(use_backend, lambda: pk.sample_chunks(W(), 3, I(-1, 7), validate=False, generator=_seed()))
    assert _same(index[0], index[1]) and index[0].tolist() == [[-1, -1, -1], [0, 2, -1]]


def test_cpu_keep_probs_checked_even_without_validate(use_backend):
    """A CPU tensor or a sequence costs nothing to check, so it is checked whatever ``validate`` says."""
    for backend in BACKENDS:
        use_backend(backend)
        with pytest.raises(ValueError, match="keep_probs must be finite and >= 0"):
            pk.select_chunks(G(), None, [1.0, 1.0, NAN, 1.0, 1.0], 2, validate=False)


def test_one_host_copy_for_all_value_checks(monkeypatch):
    """All value checks of a call are read back in one device->host copy (one sync on CUDA)."""
    from pcm_kernels import _checks

    calls = []
    original = _checks.raise_failed
    monkeypatch.setattr(_checks, "raise_failed", lambda checks: (calls.append(len(checks)), original(checks)))
    import pcm_kernels.phases as phases
    import pcm_kernels.sampling as sampling
    monkeypatch.setattr(phases, "raise_failed", _checks.raise_failed)
    monkeypatch.setattr(sampling, "raise_failed", _checks.raise_failed)
    pk.select_chunks(_signal(), I(24, 8), torch.tensor(KEEP), 2, generator=_seed())
    assert calls == [1, 2], "the CPU keep_probs check, then gripper NaN + num_steps range together"
    calls.clear()
    pk.sample_chunks(W(), 2, I(3, 3), generator=_seed())
    assert calls == [2], "weights + num_chunks together"
    calls.clear()
    pk.label_phases(_signal(), I(24, 8))
    assert calls == [2]
    calls.clear()
    pk.label_phases(_signal(), I(24, 8), validate=False)
    pk.sample_chunks(W(), 2, I(3, 3), generator=_seed(), validate=False)
    assert calls == [0]  # label_phases calls raise_failed with nothing; sample_chunks skips it


def test_budget_cap_follows_C():
    """Above 65536 chunks per trajectory (torch path only) a budget up to C is still allowed."""
    C = MAX_PADDED_BUDGET + 3
    index = pk.sample_chunks(torch.ones(1, C), C, generator=_seed())
    assert index.shape == (1, C) and torch.equal(index[0], torch.arange(C))
    with pytest.raises(ValueError, match=f"budget must be <= {C}"):
        pk.sample_chunks(torch.ones(1, C), C + 1)
