"""PretrainedOffset: a centred conv with an offset computes the loaded, uncentred conv, fades to a
plain centred conv over `fade_iters` training forwards, resumes exactly, and folds into the
inference form."""
import pytest
import torch
from detectron2.layers import Conv2d
from torch import nn

from mabn_det.layers import CentredConv2d, MABN2d, PretrainedOffset, convert_to_inference_form


def _conv_with_offset(fade_iters=4, seed=0):
    """A CentredConv2d → MABN2d in eval mode whose weight (filter means far from 0) and offset
    make it compute conv(x, W) − μ, then MABN's affine map."""
    g = torch.Generator().manual_seed(seed)
    conv = CentredConv2d(3, 5, kernel_size=3, padding=1, bias=False,
                         norm=MABN2d(5, buffer_size=2, warmup_iters=0))
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) + 0.5)
        conv.norm.weight.copy_(torch.rand(5, generator=g) + 0.5)
        conv.norm.bias.copy_(torch.randn(5, generator=g))
        conv.norm.running_var.copy_(torch.rand(5, generator=g) + 0.5)
    mean = torch.randn(5, generator=g)
    offset = PretrainedOffset(5)
    offset.fill_(conv.weight.mean(dim=(1, 2, 3), keepdim=True), -mean, fade_iters)
    conv.add_module("pretrained_offset", offset)
    return conv.eval(), mean


def _uncentred(conv, x, alpha, mean):
    """What the conv computes at scale α, written out: centred W + α·m, bias −α·μ, then MABN."""
    weight = conv.weight
    centred = weight - weight.mean(dim=(1, 2, 3), keepdim=True)
    m = weight.mean(dim=(1, 2, 3), keepdim=True)
    z = nn.functional.conv2d(x, centred + alpha * m, -alpha * mean, padding=1)
    norm = conv.norm
    scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
    return z * scale.view(1, -1, 1, 1) + norm.bias.view(1, -1, 1, 1)


def test_at_load_the_conv_computes_the_uncentred_conv_minus_the_bn_mean():
    conv, mean = _conv_with_offset()
    x = torch.randn(2, 3, 8, 8)
    plain = nn.functional.conv2d(x, conv.weight, -mean, padding=1)  # no centring at all
    norm = conv.norm
    expected = (plain * (norm.weight / torch.sqrt(norm.running_var + norm.eps)).view(1, -1, 1, 1)
                + norm.bias.view(1, -1, 1, 1))
    with torch.no_grad():
        torch.testing.assert_close(conv(x), expected, rtol=1e-5, atol=1e-5)
        # The filter means matter here: without the offset the output is far from it.
        del conv.pretrained_offset
        assert (conv(x) - expected).abs().max() > 1.0


def test_the_offset_fades_linearly_over_training_forwards_and_eval_does_not_count():
    conv, mean = _conv_with_offset(fade_iters=4)
    x = torch.randn(2, 3, 8, 8)
    offset = conv.pretrained_offset
    for done in range(6):
        with torch.no_grad():
            conv.eval()
            torch.testing.assert_close(conv(x), _uncentred(conv, x, max(0.0, 1 - done / 4), mean),
                                       rtol=1e-5, atol=1e-5)
        assert int(offset.iteration) == done
        conv.train()
        conv(x).sum().backward()
    assert float(offset.scale()) == 0.0
    # Faded: the same as the centred conv without an offset.
    conv.eval()
    with torch.no_grad():
        faded = conv(x)
        del conv.pretrained_offset
        torch.testing.assert_close(conv(x), faded)


def test_no_gradient_reaches_the_filter_means():
    conv, _ = _conv_with_offset()
    conv.train()
    conv(torch.randn(2, 3, 8, 8)).square().sum().backward()
    torch.testing.assert_close(conv.weight.grad.sum(dim=(1, 2, 3)), torch.zeros(5), atol=1e-4,
                               rtol=0)
    assert [name for name, _ in conv.named_parameters()] == ["weight", "norm.weight", "norm.bias"]


def test_loading_creates_the_offset_and_resume_continues_the_fade_exactly():
    conv, _ = _conv_with_offset(fade_iters=10)
    conv.train()
    x = torch.randn(2, 3, 8, 8)
    for _ in range(3):
        conv(x)
    state = conv.state_dict()
    assert int(state["pretrained_offset.iteration"]) == 3
    assert int(state["pretrained_offset.fade_iters"]) == 10

    fresh = CentredConv2d(3, 5, kernel_size=3, padding=1, bias=False,
                          norm=MABN2d(5, buffer_size=2, warmup_iters=0)).train()
    assert "pretrained_offset" not in fresh._modules
    fresh.load_state_dict(state)
    assert isinstance(fresh.pretrained_offset, PretrainedOffset)
    assert fresh.pretrained_offset.training
    assert "iteration=3, fade_iters=10" in repr(fresh)
    for _ in range(2):
        torch.testing.assert_close(fresh(x), conv(x), rtol=0, atol=0)
    assert int(fresh.pretrained_offset.iteration) == 5


def test_an_offset_loaded_into_a_model_in_eval_mode_does_not_count():
    conv, _ = _conv_with_offset()
    fresh = nn.Sequential(CentredConv2d(3, 5, kernel_size=3, padding=1, bias=False,
                                        norm=MABN2d(5, buffer_size=2))).eval()
    fresh[0].load_state_dict(conv.state_dict())
    with torch.no_grad():
        fresh(torch.randn(1, 3, 8, 8))
    assert int(fresh[0].pretrained_offset.iteration) == 0


def test_convs_without_an_offset_keep_detectron2s_keys():
    kwargs = dict(kernel_size=3, bias=False, norm=MABN2d(4))
    assert (CentredConv2d(3, 4, **kwargs).state_dict().keys()
            == Conv2d(3, 4, **kwargs).state_dict().keys())


@pytest.mark.parametrize("done", [0, 2, 7])
def test_inference_form_folds_the_offset_at_its_current_scale(done):
    conv, _ = _conv_with_offset(fade_iters=4)
    conv.train()
    x = torch.randn(2, 3, 8, 8)
    for _ in range(done):
        conv(x)
    model = nn.Sequential(conv).eval()
    deployed = convert_to_inference_form(model)
    assert type(deployed[0]) is Conv2d and not any("pretrained_offset" in k
                                                   for k in deployed.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), model(x), rtol=1e-5, atol=1e-5)


def test_fill_refuses_a_fade_that_never_starts():
    with pytest.raises(ValueError, match="fade_iters must be an int ≥ 1, got 0"):
        PretrainedOffset(2).fill_(torch.zeros(2, 1, 1, 1), torch.zeros(2), 0)
