import pytest
import torch

import pcm_kernels as pk
from pcm_kernels.packing import naive
from pcm_kernels.packing.kernels import launch_gather, launch_scatter

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.bool]


def _random(shape, dtype, gen):
    if dtype == torch.bool:
        return torch.rand(shape, generator=gen) > 0.5
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen).to(dtype)
    return torch.randint(-1000, 1000, shape, generator=gen, dtype=dtype)


def _index_and_seqlens(N, C, S, B, gen):
    weights = torch.rand(N, C, generator=gen)
    num_chunks = torch.randint(0, C + 1, (N,), generator=gen)
    index = pk.sample_chunks(weights, B, num_chunks, generator=gen)
    seqlens = torch.randint(0, S + 1, (N, C), generator=gen)
    return index, seqlens


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_matches_loop(backend, dtype, gen, use_backend):
    use_backend(backend)
    N, C, S, F = 3, 6, 5, (2, 3)
    x = _random((N, C, S) + F, dtype, gen)
    index, seqlens = _index_and_seqlens(N, C, S, 4, gen)
    packed = pk.gather_chunks(x, index, seqlens)
    values, cu, chunk_ids = naive.gather(x, index, seqlens)
    assert torch.equal(packed.values, values)
    assert packed.cu_seqlens.dtype == torch.int32 and packed.cu_seqlens.tolist() == cu
    assert packed.chunk_ids.tolist() == chunk_ids
    assert packed.max_seqlen == max([b - a for a, b in zip(cu, cu[1:])], default=0)
    expected_pos = [p for a, b in zip(cu, cu[1:]) for p in range(b - a)]
    assert packed.position_ids.tolist() == expected_pos
    dense = pk.scatter_chunks(packed.values, packed)
    assert torch.equal(dense, naive.scatter(values, cu, chunk_ids, x.shape))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_non_contiguous_input_and_default_seqlens(backend, gen, use_backend):
    use_backend(backend)
    base = torch.randn(4, 5, 6, 8, generator=gen)
    x = base.permute(1, 0, 2, 3)[:, :, ::2]  # [5, 4, 3, 8], strided in every leading dim
    assert not x.is_contiguous()
    index = torch.tensor([[3, 0, -1], [-1, -1, -1], [1, 2, 3], [0, -1, 2], [2, -1, -1]])
    packed = pk.gather_chunks(x, index)
    values, cu, chunk_ids = naive.gather(x, index, None)
    assert torch.equal(packed.values, values) and packed.cu_seqlens.tolist() == cu
    feature_view = torch.randn(5, 4, 3, 8, 2, generator=gen).transpose(3, 4)  # features don't collapse
    assert torch.equal(pk.gather_chunks(feature_view, index).values, naive.gather(feature_view, index, None)[0])


def test_triton_writes_every_element(gen, use_backend):
    use_backend("triton")
    N, C, S, F = 3, 5, 7, 9
    x = torch.randn(N, C, S, F, generator=gen)
    index, seqlens = _index_and_seqlens(N, C, S, 3, gen)
    layout = pk.plan_chunks(index, C, S, seqlens)
    T = layout.token_chunk_ids.numel()
    packed = torch.full((T, F), float("nan"))
    launch_gather(x, packed, layout.chunk_ids, layout.cu_seqlens, layout.max_seqlen)
    assert not packed.isnan().any()
    dense = torch.full((N, C, S, F), float("nan"))
    launch_scatter(packed, dense, layout.slot, layout.cu_seqlens)
    assert not dense.isnan().any(), "scatter must write zeros itself, not rely on a zero fill"
    assert torch.equal(dense, naive.scatter(packed, layout.cu_seqlens.tolist(), layout.chunk_ids.tolist(), x.shape))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_empty_index_and_one_trajectory(backend, gen, use_backend):
    use_backend(backend)
    x = torch.randn(1, 4, 3, 2, generator=gen)
    packed = pk.gather_chunks(x, torch.full((1, 2), -1))
    assert packed.values.shape == (0, 2) and packed.cu_seqlens.tolist() == [0] and packed.max_seqlen == 0
    assert torch.equal(pk.scatter_chunks(packed.values, packed), torch.zeros_like(x))
    packed = pk.gather_chunks(x, torch.tensor([[2, 0]]), torch.tensor([[3, 0, 2, 1]]))
    assert packed.values.shape == (5, 2) and packed.cu_seqlens.tolist() == [0, 2, 5]
    assert packed.chunk_ids.tolist() == [2, 0] and packed.token_trajectory_ids.tolist() == [0] * 5


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_autograd_gather_scatter_are_adjoint(backend, gen, use_backend):
    use_backend(backend)
    N, C, S, F = 2, 4, 3, 2
    x = torch.randn(N, C, S, F, generator=gen, dtype=torch.float64, requires_grad=True)
    index = torch.tensor([[1, 3], [0, -1]])
    seqlens = torch.tensor([[3, 2, 1, 2], [1, 3, 3, 0]])
    layout = pk.plan_chunks(index, C, S, seqlens)
    T = layout.token_chunk_ids.numel()
    v = torch.randn(T, F, generator=gen, dtype=torch.float64, requires_grad=True)
    # <gather(x), v> == <x, scatter(v)>
    lhs = (layout.gather(x) * v).sum()
    rhs = (x * pk.scatter_chunks(v, layout)).sum()
    torch.testing.assert_close(lhs, rhs)
    torch.autograd.gradcheck(lambda t: layout.gather(t), (x,))
    torch.autograd.gradcheck(lambda t: pk.scatter_chunks(t, layout), (v,))
    grad_x, = torch.autograd.grad(lhs, x)
    torch.testing.assert_close(grad_x, pk.scatter_chunks(v.detach(), layout))


def test_plan_reused_for_several_tensors(gen):
    N, C, S = 2, 3, 4
    index = torch.tensor([[2, 0], [1, -1]])
    seqlens = torch.tensor([[4, 1, 2], [0, 3, 4]])
    ids = torch.randint(0, 100, (N, C, S), generator=gen)
    hidden = torch.randn(N, C, S, 5, generator=gen)
    packed = pk.gather_chunks(ids, index, seqlens)
    assert torch.equal(packed.gather(hidden), pk.gather_chunks(hidden, index, seqlens).values)


def test_packing_bad_input():
    x = torch.zeros(2, 4, 3)
    with pytest.raises(ValueError, match="index"):
        pk.gather_chunks(x, torch.tensor([[0, 4], [1, 2]]))
    with pytest.raises(ValueError, match="index"):
        pk.gather_chunks(x, torch.tensor([[0, -2], [1, 2]]))
    with pytest.raises(ValueError, match="index"):
        pk.gather_chunks(x, torch.tensor([[1, 1], [0, 2]]))
    with pytest.raises(ValueError, match="index"):
        pk.gather_chunks(x, torch.tensor([[0, 1]]))
    with pytest.raises(TypeError, match="index"):
        pk.gather_chunks(x, torch.tensor([[0.0, 1.0], [1.0, 2.0]]))
    with pytest.raises(ValueError, match="seqlens"):
        pk.gather_chunks(x, torch.tensor([[0], [1]]), torch.full((2, 4), 4))
    with pytest.raises(ValueError, match="seqlens"):
        pk.gather_chunks(x, torch.tensor([[0], [1]]), torch.full((2, 3), 1))
    with pytest.raises(TypeError, match="seqlens"):
        pk.gather_chunks(x, torch.tensor([[0], [1]]), torch.full((2, 4), 1.0))
    with pytest.raises(ValueError, match="x"):
        pk.gather_chunks(torch.zeros(2, 4), torch.tensor([[0], [1]]))
    packed = pk.gather_chunks(x, torch.tensor([[0], [1]]))
    with pytest.raises(ValueError, match="values"):
        pk.scatter_chunks(torch.zeros(5), packed)
    with pytest.raises(TypeError, match="packed"):
        pk.scatter_chunks(packed.values, "layout")
    with pytest.raises(ValueError, match="x"):
        packed.gather(torch.zeros(2, 5, 3))
