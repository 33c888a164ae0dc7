"""Phase labels of bf16/fp16/fp32 gripper signals equal the float64 loop reference on both backends,
also for thresholds that no half-precision format represents (the Triton interpreter used to compare
bf16 as raw bits; the torch path compared in the input's dtype)."""
import pytest
import torch

import pcm_kernels as pk
from pcm_kernels.phases import naive
from pcm_kernels.phases.vectorized import float32_threshold


@pytest.mark.parametrize("close_above", [0.0, 0.3, -0.1, 0.30078125])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_half_precision_labels_match_the_reference(backend, dtype, close_above, use_backend):
    use_backend(backend)
    gen = torch.Generator().manual_seed(2)
    N, C, L = 4, 12, 8
    near = torch.tensor([0.3, 0.30078125, 0.29882812, -0.1, 0.0, 1.0, -1.0])  # around the thresholds
    gripper = near[torch.randint(0, len(near), (N, C, L), generator=gen)]
    gripper[0] = torch.where(torch.arange(C * L).view(C, L) % 16 < 9, 1.0, -1.0)  # a clean grasp pattern
    gripper = gripper.to(dtype)
    num_steps = torch.tensor([C * L, 50, 17, 0])
    expected = naive.label_phases(gripper, num_steps, close_above, 0.75, 0.5, 0.1, 3)
    assert torch.equal(pk.label_phases(gripper, num_steps, close_above=close_above), expected)


def test_float32_threshold_is_the_largest_float32_not_above():
    for t in (0.3, 0.1, -0.3, 1 / 3, 0.5, 0.0):
        f = float32_threshold(t)
        assert f <= t and torch.tensor(f, dtype=torch.float32).item() == f
        above = torch.nextafter(torch.tensor(f, dtype=torch.float32), torch.tensor(1.0)).item()
        assert above > t
