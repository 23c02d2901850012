import pytest
import torch
from torch import nn

from mabn_experiments.centring_at_load import centre_filters, filter_mean_share


def _detector() -> nn.Module:
    """A stand-in with Detectron2's layout: a ResNet at backbone.bottom_up, an FPN conv beside."""
    torch.manual_seed(0)
    model, backbone = nn.Module(), nn.Module()
    backbone.bottom_up = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                                       nn.Conv2d(4, 5, 1, bias=False))
    backbone.lateral = nn.Conv2d(5, 5, 1)
    model.backbone = backbone
    with torch.no_grad():
        for conv in (backbone.bottom_up[0], backbone.bottom_up[3], backbone.lateral):
            conv.weight.add_(torch.arange(conv.out_channels).view(-1, 1, 1, 1) * 0.1)
    return model


def test_centring_zeroes_each_resnet_filter_mean_and_nothing_else():
    model = _detector()
    lateral = model.backbone.lateral.weight.clone()
    first = model.backbone.bottom_up[0].weight.clone()
    assert filter_mean_share(model) > 0.01
    assert centre_filters(model) == 2
    for conv in (model.backbone.bottom_up[0], model.backbone.bottom_up[3]):
        torch.testing.assert_close(conv.weight.mean(dim=(1, 2, 3)),
                                   torch.zeros(conv.out_channels), atol=1e-6, rtol=0)
    # Only each filter's mean was removed; the FPN's conv is no part of a pretrained ResNet.
    torch.testing.assert_close(model.backbone.bottom_up[0].weight,
                               first - first.mean(dim=(1, 2, 3), keepdim=True))
    assert torch.equal(model.backbone.lateral.weight, lateral)
    assert filter_mean_share(model) == pytest.approx(0.0, abs=1e-12)


def test_filter_mean_share_is_the_part_of_the_squared_norm_in_the_means():
    model = _detector()
    conv = nn.Conv2d(2, 2, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([1.0, 1.0, 3.0, -1.0]).view(2, 2, 1, 1))
    model.backbone.bottom_up = nn.Sequential(conv)
    # Filter means 1 and 1 over 2 weights each: 2 + 2 of 1 + 1 + 9 + 1.
    assert filter_mean_share(model) == pytest.approx(4 / 12)


def test_a_resnet_without_convs_is_refused():
    model = _detector()
    model.backbone.bottom_up = nn.Sequential(nn.ReLU())
    with pytest.raises(ValueError, match="holds no conv"):
        centre_filters(model)
