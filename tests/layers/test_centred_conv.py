import torch
from detectron2.layers import Conv2d
from torch import nn

from mabn_det.layers import MABN2d, CentredConv2d


def test_per_filter_constant_does_not_change_output():
    torch.manual_seed(0)
    conv = CentredConv2d(3, 5, kernel_size=3, padding=1, bias=True)
    x = torch.randn(2, 3, 8, 8)
    before = conv(x)
    with torch.no_grad():
        conv.weight.add_(torch.randn(5, 1, 1, 1) * 10)
    torch.testing.assert_close(conv(x), before, rtol=1e-4, atol=1e-4)


def test_gradient_flows_through_centring():
    conv = CentredConv2d(2, 3, kernel_size=3)
    conv(torch.randn(1, 2, 5, 5)).square().sum().backward()
    # d/dW of a function of W − mean(W) sums to zero over each filter.
    torch.testing.assert_close(conv.weight.grad.sum(dim=(1, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)


def test_same_interface_and_keys_as_detectron2_conv():
    kwargs = dict(kernel_size=3, padding=1, bias=False, norm=MABN2d(4), activation=nn.ReLU())
    plain, centred = Conv2d(3, 4, **kwargs), CentredConv2d(3, 4, **kwargs)
    assert isinstance(centred, nn.Conv2d) and isinstance(centred, Conv2d)
    assert plain.state_dict().keys() == centred.state_dict().keys()
    assert (centred(torch.randn(2, 3, 6, 6)) >= 0).all()  # activation applied


def test_centring_swaps_class_in_place_and_keeps_list_references():
    class ListHolder(nn.Module):
        """Like Detectron2's FPN: children also reached through a plain list."""

        def __init__(self):
            super().__init__()
            self.a = Conv2d(3, 4, 1, bias=False, norm=MABN2d(4))
            self.b = Conv2d(4, 4, 1, bias=False, norm=nn.BatchNorm2d(4))
            self.convs = [self.a, self.b]

        def forward(self, x):
            for conv in self.convs:
                x = conv(x)
            return x

    model = ListHolder()
    a, b = model.a, model.b
    CentredConv2d.convert_convs_before_mabn(model)
    assert model.a is a and model.convs[0] is a and type(a) is CentredConv2d
    assert type(b) is Conv2d  # not followed by MABN: untouched
    x = torch.randn(2, 3, 4, 4)
    out = model(x)
    with torch.no_grad():
        a.weight.add_(3.0)  # a per-filter constant is invisible only if the list runs the centred conv
    torch.testing.assert_close(model(x), out, rtol=1e-4, atol=1e-4)
