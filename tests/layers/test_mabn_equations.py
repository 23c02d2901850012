"""MABN2d against the paper's equations, written here independently in float64."""
import pytest
import torch

from mabn_det.layers import MABN2d

EPS = 1e-5


class ReferenceMABN:
    """The equations of Yan et al. (2020), one training step at a time, per channel."""

    def __init__(self, channels, *, m, warmup, renorm_warmup, clip, momentum):
        self.m, self.warmup, self.renorm_warmup = m, warmup, renorm_warmup
        self.clip, self.momentum = clip, momentum
        self.t = 0
        self.chi_ring = torch.zeros(m, channels, dtype=torch.float64)
        self.psi_ring = torch.zeros(m, channels, dtype=torch.float64)
        self.running_var = torch.ones(channels, dtype=torch.float64)

    def _averaged(self):
        return not (self.t <= self.m or self.t < self.warmup)

    def step(self, x, dy, gamma, beta):
        c = lambda v: v.view(1, -1, 1, 1)  # noqa: E731
        self.t += 1
        chi = (x * x).mean(dim=(0, 2, 3))
        self.chi_ring[self.t % self.m] = chi
        s2 = self.chi_ring.mean(0) if self._averaged() else chi
        sigma = torch.sqrt(s2 + EPS)
        z = x / c(sigma)
        if self.t <= max(self.renorm_warmup, self.warmup):
            r = torch.ones_like(s2)
        else:
            r = (sigma / torch.sqrt(self.running_var + EPS)).clamp(1 / self.clip, self.clip)
        y = c(gamma * r) * z + c(beta)
        self.running_var = (1 - self.momentum) * self.running_var + self.momentum * s2

        g = dy * c(gamma * r)
        psi = (g * z).mean(dim=(0, 2, 3))
        self.psi_ring[self.t % self.m] = psi
        psi_bar = self.psi_ring.mean(0) if self._averaged() else psi
        dx = (g - z * c(psi_bar)) / c(sigma)
        dgamma = (dy * c(r) * z).sum(dim=(0, 2, 3))
        dbeta = dy.sum(dim=(0, 2, 3))
        return y, dx, dgamma, dbeta, r


def test_matches_equations_in_every_phase():
    torch.manual_seed(0)
    settings = dict(m=4, warmup=20, renorm_warmup=50, clip=1.25, momentum=0.02)
    ref = ReferenceMABN(3, **settings)
    layer = MABN2d(3, buffer_size=4, warmup_iters=20, renorm_warmup_iters=50, renorm_clip=1.25,
                   momentum=0.02, eps=EPS).double()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([0.5, 1.5, -2.0]))
        layer.bias.copy_(torch.tensor([0.1, -0.3, 0.0]))
    gamma, beta = layer.weight.detach().clone(), layer.bias.detach().clone()
    clipped_steps = unclipped_steps = 0
    for step in range(1, 1201):
        # Slowly drifting per-channel scales plus occasional jumps make r both hit and miss the clip.
        scale = 1.0 + 0.5 * torch.sin(step / 37.0 + torch.arange(3.0))
        if step % 97 == 0:
            scale = scale * 3.0
        x = (torch.randn(2, 3, 4, 5, dtype=torch.float64) * scale.view(1, 3, 1, 1).double()
             + 0.2).requires_grad_()
        dy = torch.randn(2, 3, 4, 5, dtype=torch.float64)
        y_ref, dx_ref, dgamma_ref, dbeta_ref, r = ref.step(x.detach(), dy, gamma, beta)

        layer.zero_grad()
        y = layer(x)
        y.backward(dy)
        for name, got, want in [("y", y, y_ref), ("dx", x.grad, dx_ref),
                                ("dgamma", layer.weight.grad, dgamma_ref),
                                ("dbeta", layer.bias.grad, dbeta_ref),
                                ("running_var", layer.running_var, ref.running_var)]:
            err = (got.detach() - want).abs().max().item()
            assert err <= 1e-10, f"step {step}: {name} differs by {err}"
        at_clip = torch.isclose(r, torch.tensor(1.25, dtype=torch.float64)) | torch.isclose(
            r, torch.tensor(0.8, dtype=torch.float64))
        clipped_steps += int(step > 50 and at_clip.any())
        unclipped_steps += int(step > 50 and not at_clip.all())
    assert clipped_steps > 20 and unclipped_steps > 20, (clipped_steps, unclipped_steps)
    assert int(layer.iteration) == 1200


def test_gradcheck_in_warmup_regime():
    torch.manual_seed(1)
    layer = MABN2d(3, buffer_size=4, warmup_iters=10**6, renorm_warmup_iters=10**6).double()
    x = torch.randn(2, 3, 3, 4, dtype=torch.float64, requires_grad=True)
    gamma = torch.randn(3, dtype=torch.float64, requires_grad=True)
    beta = torch.randn(3, dtype=torch.float64, requires_grad=True)

    def fn(x, gamma, beta):
        return torch.func.functional_call(layer, {"weight": gamma, "bias": beta}, (x,))

    assert torch.autograd.gradcheck(fn, (x, gamma, beta))


@pytest.mark.parametrize("t_phase", ["batch", "averaged", "renormalised"])
def test_eval_is_affine_map_of_running_var(t_phase):
    steps = {"batch": 2, "averaged": 8, "renormalised": 30}[t_phase]
    layer = MABN2d(4, buffer_size=2, warmup_iters=5, renorm_warmup_iters=20)
    for _ in range(steps):
        layer(torch.randn(2, 4, 3, 3) * 2).sum().backward()
    layer.eval()
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(3, 4, 5, 5)
    expected = (layer.weight.view(1, 4, 1, 1) * x / torch.sqrt(layer.running_var + 1e-5).view(
        1, 4, 1, 1) + layer.bias.view(1, 4, 1, 1))
    torch.testing.assert_close(layer(x), expected)
    for k, v in layer.state_dict().items():
        assert torch.equal(v, state[k]), f"eval changed {k}"
