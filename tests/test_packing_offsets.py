"""Gather/scatter address arithmetic past 2**31 elements, and no read past cu_seqlens, under the interpreter.

The inputs are strided views of a large ``torch.empty`` storage: pages are only backed when touched,
so a view whose addresses span more than 2**31 elements costs a few MB. Before the kernels used
64-bit offsets, ``position * stride`` wrapped in 32 bits here (reading other elements, or faulting).
"""
import pytest
import torch

import pcm_kernels as pk
from pcm_kernels.packing.kernels import launch_gather, launch_scatter

BIG = 2**31 + 2**22  # elements of the backing storage (uint8: 2 GiB of address space, lazily backed)


def _sparse_storage() -> torch.Tensor:
    try:
        return torch.empty(BIG, dtype=torch.uint8)
    except RuntimeError:  # a machine that refuses to reserve the address space
        pytest.skip("cannot reserve 2 GiB of address space")


def test_gather_position_times_stride_past_2_31():
    storage = _sparse_storage()
    S, stride_s = 129, 2**24  # position 128 * stride = 2**31
    x = storage.as_strided((1, 1, S, 1), (0, 0, stride_s, 1))
    positions = torch.arange(S) * stride_s
    storage[positions] = (torch.arange(S) % 251).to(torch.uint8)
    index, seqlens = torch.tensor([[0]]), torch.tensor([[S]])
    layout = pk.plan_chunks(index, 1, S, seqlens)
    out = torch.full((S, 1), 255, dtype=torch.uint8)
    launch_gather(x, out, layout.chunk_ids, layout.cu_seqlens, layout.max_seqlen)
    assert torch.equal(out.view(-1), (torch.arange(S) % 251).to(torch.uint8))


def test_scatter_feature_times_stride_past_2_31():
    storage = _sparse_storage()
    T, F, stride_f = 8, 4096, 2**19 + 1  # feature 4095 * stride > 2**31: a transposed [T, F] gradient's stride
    values = storage.as_strided((T, F), (1, stride_f))
    expected = (torch.arange(T * F) % 249).to(torch.uint8).view(T, F)
    for t in range(T):
        storage[t + torch.arange(F) * stride_f] = expected[t]
    index, seqlens = torch.tensor([[1]]), torch.tensor([[0, T]])
    layout = pk.plan_chunks(index, 2, T, seqlens)
    out = torch.full((1, 2, T, F), 7, dtype=torch.uint8)
    launch_scatter(values, out, layout.slot, layout.cu_seqlens)
    assert torch.equal(out[0, 1], expected) and (out[0, 0] == 0).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_scatter_with_no_kept_chunk_writes_zeros(backend, use_backend):
    """M = 0: cu_seqlens is [0]; the kernel must not read entry 1 (it is past the end)."""
    use_backend(backend)
    index = torch.full((2, 3), -1)
    packed = pk.gather_chunks(torch.randn(2, 4, 5, 3), index)
    assert packed.cu_seqlens.tolist() == [0]
    dense = pk.scatter_chunks(torch.zeros(0, 3), packed)
    assert dense.shape == (2, 4, 5, 3) and (dense == 0).all()
