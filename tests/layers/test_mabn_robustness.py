"""MABN2d must never be poisoned, never synchronise, and resume exactly."""
import io

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mabn_det.layers import MABN2d


def _train_steps(layer, inputs):
    outputs = []
    for x in inputs:
        x = x.clone().requires_grad_()
        y = layer(x)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        outputs.append((y.detach(), x.grad))
    return outputs


def _buffers(layer):
    return {k: v.clone() for k, v in layer.state_dict().items() if not k.endswith(("weight", "bias"))}


def test_empty_batch_changes_nothing_and_gradients_flow():
    layer = MABN2d(4, buffer_size=2, warmup_iters=0)
    _train_steps(layer, [torch.randn(2, 4, 3, 3) for _ in range(3)])
    before = _buffers(layer)
    x = torch.randn(0, 4, 7, 7, requires_grad=True)
    y = layer(x)
    assert y.shape == (0, 4, 7, 7)
    layer.zero_grad()
    y.sum().backward()
    assert torch.equal(layer.weight.grad, torch.zeros(4))
    assert torch.equal(layer.bias.grad, torch.zeros(4))
    assert x.grad.shape == x.shape
    for k, v in _buffers(layer).items():
        assert torch.equal(v, before[k]), f"empty batch changed {k}"


@pytest.mark.parametrize("x", [
    torch.randn(1, 3, 1, 1),             # N·H·W = 1
    torch.full((2, 3, 4, 4), 7.0),       # constant input
    torch.zeros(2, 3, 4, 4),             # all zeros
    torch.randn(2, 3, 4, 4) * 1e15,      # very large values, fp32
], ids=["single-value", "constant", "zeros", "huge"])
def test_degenerate_inputs_give_finite_outputs_and_gradients(x):
    layer = MABN2d(3, buffer_size=2, warmup_iters=0, renorm_warmup_iters=2)
    for y, dx in _train_steps(layer, [x] * 6):
        assert torch.isfinite(y).all() and torch.isfinite(dx).all()
    assert torch.isfinite(layer.running_var).all()
    assert int(layer.skipped_forward_stats) == 0 and int(layer.skipped_backward_stats) == 0


def test_fp16_inputs_near_max_give_finite_statistics():
    layer = MABN2d(3, buffer_size=2)
    x = torch.full((2, 3, 8, 8), 6.0e4, dtype=torch.float16)
    y = layer(x)
    assert y.dtype == torch.float16 and torch.isfinite(y).all()
    assert layer.chi_buffer.dtype == torch.float32
    assert torch.isfinite(layer.chi_buffer).all() and torch.isfinite(layer.running_var).all()


@pytest.mark.parametrize("warmup_iters", [0, 100], ids=["averaged", "batch-statistics"])
def test_nonfinite_forward_statistic_is_skipped_per_channel(warmup_iters):
    layer = MABN2d(3, buffer_size=2, warmup_iters=warmup_iters)
    _train_steps(layer, [torch.randn(2, 3, 4, 4) for _ in range(4)])
    chi, running = layer.chi_buffer.clone(), layer.running_var.clone()
    x = torch.randn(2, 3, 4, 4)
    x[0, 1, 0, 0] = float("nan")
    layer(x)
    slot = int(layer.iteration) % 2
    assert torch.equal(layer.chi_buffer[slot, 1], chi[slot, 1]), "NaN χ entered the ring"
    assert not torch.equal(layer.chi_buffer[slot, 0], chi[slot, 0]), "finite channels not updated"
    assert torch.isfinite(layer.running_var).all()
    if warmup_iters:  # s² is the NaN χ itself: running_var keeps its old value
        assert layer.running_var[1] == running[1]
    else:  # s² is the ring's (finite) average
        expected = running[1] + 0.02 * (layer.chi_buffer[:, 1].mean() - running[1])
        torch.testing.assert_close(layer.running_var[1], expected)
    assert int(layer.skipped_forward_stats) == 1


def test_inf_gradients_are_not_recorded():
    layer = MABN2d(3, buffer_size=2, warmup_iters=0)
    _train_steps(layer, [torch.randn(2, 3, 4, 4) for _ in range(4)])
    psi = layer.psi_buffer.clone()
    y = layer(torch.randn(2, 3, 4, 4))
    dy = torch.randn_like(y)
    dy[1, 2, 3, 3] = float("inf")  # what an overflowing GradScaler produces by design
    y.backward(dy)
    slot = int(layer.iteration) % 2
    assert torch.equal(layer.psi_buffer[slot, 2], psi[slot, 2])
    assert torch.isfinite(layer.psi_buffer).all()
    assert int(layer.skipped_backward_stats) == 1 and int(layer.skipped_forward_stats) == 0


def test_autocast_bf16_keeps_float32_statistics():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3)
    layer = MABN2d(4, buffer_size=2, warmup_iters=0)
    for _ in range(4):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(conv(torch.randn(2, 3, 8, 8)))
        assert y.dtype == torch.bfloat16
        y.float().square().mean().backward()
    for name, buf in layer.named_buffers():
        if buf.is_floating_point():
            assert buf.dtype == torch.float32, name
            assert torch.isfinite(buf).all(), name
    assert layer.weight.grad.dtype == torch.float32 and torch.isfinite(layer.weight.grad).all()


@pytest.mark.parametrize("shape", [(2, 5, 4, 4), (2, 4, 4), (2, 4, 4, 4, 1)])
def test_wrong_shape_is_refused_with_expected_shape(shape):
    layer = MABN2d(4)
    with pytest.raises(ValueError, match=r"\(N, 4, H, W\).*" + str(shape).replace("(", r"\(").replace(")", r"\)")):
        layer(torch.randn(shape))


@pytest.mark.parametrize("kwargs, message", [
    ({"buffer_size": 0}, "buffer_size must be ≥ 1, got 0"),
    ({"momentum": 0.0}, "momentum must be in"),
    ({"momentum": 1.5}, "momentum must be in"),
    ({"renorm_clip": 0.5}, "renorm_clip must be ≥ 1"),
    ({"eps": 0.0}, "eps must be > 0"),
    ({"warmup_iters": -1}, "warmup_iters must be ≥ 0"),
])
def test_invalid_hyperparameters_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MABN2d(4, **kwargs)


class _FailOnHostSync(TorchDispatchMode):
    """Raises on every op that makes the host wait for a device value."""

    SYNCING = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "item"}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in self.SYNCING:
            raise AssertionError(f"host synchronisation through {func}")
        return func(*args, **(kwargs or {}))


def test_training_step_reads_no_tensor_value_on_the_host():
    layer = MABN2d(3, buffer_size=2, warmup_iters=1, renorm_warmup_iters=2)
    inputs = [torch.randn(2, 3, 4, 4) for _ in range(6)]
    with _FailOnHostSync():
        _train_steps(layer, inputs)
    # The guard itself must catch a read-back.
    with pytest.raises(AssertionError, match="host synchronisation"):
        with _FailOnHostSync():
            layer.iteration.item()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kernel", ["torch", "triton"])
def test_no_cuda_synchronisation(kernel):
    layer = MABN2d(8, buffer_size=2, warmup_iters=1, renorm_warmup_iters=2, kernel=kernel).cuda()
    inputs = [torch.randn(2, 8, 16, 16, device="cuda") for _ in range(6)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _train_steps(layer, inputs)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_resume_from_state_dict_equals_uninterrupted():
    torch.manual_seed(0)
    kwargs = dict(buffer_size=3, warmup_iters=4, renorm_warmup_iters=6, renorm_clip=1.5)
    inputs = [torch.randn(2, 4, 5, 5) * (1 + i % 3) for i in range(12)]
    straight = MABN2d(4, **kwargs)
    expected = _train_steps(straight, inputs)

    first = MABN2d(4, **kwargs)
    got = _train_steps(first, inputs[:5])
    blob = io.BytesIO()
    torch.save(first.state_dict(), blob)
    blob.seek(0)
    resumed = MABN2d(4, **kwargs)
    resumed.load_state_dict(torch.load(blob))
    got += _train_steps(resumed, inputs[5:])
    for (y, dx), (y_ref, dx_ref) in zip(got, expected):
        assert torch.equal(y, y_ref) and torch.equal(dx, dx_ref)
    for k, v in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[k], v), k
    assert set(straight.state_dict()) >= {"iteration", "chi_buffer", "psi_buffer", "running_var",
                                          "skipped_forward_stats", "skipped_backward_stats"}


def test_loading_other_buffer_size_names_both_sizes():
    state = MABN2d(4, buffer_size=8).state_dict()
    with pytest.raises(RuntimeError, match="buffer_size 8.*buffer_size 16"):
        MABN2d(4, buffer_size=16).load_state_dict(state)
    # Detectron2's checkpointer drops tensors of another shape before loading: still refused.
    dropped = {k: v for k, v in state.items() if k not in ("chi_buffer", "psi_buffer")}
    with pytest.raises(RuntimeError, match="step counter but no chi_buffer"):
        MABN2d(4, buffer_size=16).load_state_dict(dropped, strict=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kernel", ["torch", "triton"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_matches_cpu(channels_last, kernel):
    torch.manual_seed(0)
    kwargs = dict(buffer_size=3, warmup_iters=2, renorm_warmup_iters=5, renorm_clip=1.5)
    cpu, gpu = MABN2d(8, **kwargs), MABN2d(8, kernel=kernel, **kwargs).cuda()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    inputs = [torch.randn(2, 8, 6, 6) * (1 + i % 3) for i in range(10)]
    expected = _train_steps(cpu, inputs)
    got = _train_steps(gpu, [x.cuda().to(memory_format=fmt) for x in inputs])
    for (y, dx), (y_ref, dx_ref) in zip(got, expected):
        torch.testing.assert_close(y.cpu(), y_ref, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(dx.cpu(), dx_ref, rtol=1e-4, atol=1e-5)
    for key, value in cpu.state_dict().items():
        torch.testing.assert_close(gpu.state_dict()[key].cpu(), value, rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kernel", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_autocast_keeps_float32_statistics(dtype, kernel):
    layer = MABN2d(8, buffer_size=2, warmup_iters=0, kernel=kernel).cuda()
    conv = torch.nn.Conv2d(3, 8, 3).cuda()
    x = torch.randn(2, 3, 16, 16, device="cuda") * 3e4
    with torch.autocast("cuda", dtype=dtype):
        y = layer(conv(x))
    assert y.dtype == dtype
    y.float().sum().backward()
    assert layer.chi_buffer.dtype == torch.float32 and torch.isfinite(layer.chi_buffer).all()
