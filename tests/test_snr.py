"""The samplers and the loss target against the paper's formulas."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from studio.engine import snr

N = 200_000


def draw(sampler: snr.NoiseSampler, n: int = N, seed: int = 0) -> np.ndarray:
    return sampler.sample(n, torch.Generator().manual_seed(seed)).double().numpy()


@pytest.mark.parametrize("mu,sigma", [(-6.0, 2.0), (-6.0, 3.0), (-4.0, 1.0)])
def test_style_friendly_log_snr_is_normal(mu, sigma):
    t = draw(snr.NoiseSampler("style_friendly", mu=mu, sigma=sigma))
    lam = 2 * np.log((1 - t) / t)
    assert abs(lam.mean() - mu) < 0.02
    assert abs(lam.std() - sigma) < 0.02
    # the whole distribution, not just two moments
    assert stats.kstest(lam, "norm", args=(mu, sigma)).pvalue > 1e-3


def test_style_friendly_paper_numbers():
    """DESIGN: mu=-6, sigma=2 gives median t ~0.953 and a 10-90 % range of ~0.85-0.99."""
    t = draw(snr.NoiseSampler("style_friendly", mu=-6, sigma=2))
    assert np.median(t) == pytest.approx(0.953, abs=0.002)
    assert np.quantile(t, 0.1) == pytest.approx(0.85, abs=0.01)
    assert np.quantile(t, 0.9) == pytest.approx(0.99, abs=0.005)
    # continuous t, not quantised to a 1/1000 grid (float32 near 1 still repeats a few values)
    assert len(np.unique(t)) > 0.5 * N


def test_sd3_sampler_is_shifted_logit_normal():
    """logit(t) ~ N(0,1) then t' = 3t/(1+2t), i.e. lambda ~ N(-2 ln 3, 2^2)."""
    t = draw(snr.NoiseSampler("sd3", shift=3.0))
    lam = 2 * np.log((1 - t) / t)
    assert stats.kstest(lam, "norm", args=(-2 * math.log(3), 2.0)).pvalue > 1e-3
    unshifted = t / (3 - 2 * t)  # inverse of the shift
    z = np.log(unshifted / (1 - unshifted))
    assert stats.kstest(z, "norm").pvalue > 1e-3


def test_uniform_sampler():
    t = draw(snr.NoiseSampler("uniform"))
    assert stats.kstest(t, "uniform").pvalue > 1e-3


@pytest.mark.parametrize("name", snr.SAMPLERS)
def test_closed_form_quantiles_match_samples(name):
    sampler = snr.NoiseSampler(name, mu=-6, sigma=3)
    t = draw(sampler)
    for q in (0.05, 0.25, 0.5, 0.75, 0.95):
        assert np.quantile(t, q) == pytest.approx(sampler.quantile(q), abs=0.005)


def test_samples_are_strictly_inside_and_reproducible():
    sampler = snr.NoiseSampler("style_friendly", mu=-6, sigma=30)  # extreme tails
    t = sampler.sample(10_000, torch.Generator().manual_seed(1))
    assert t.dtype == torch.float32 and (t > 0).all() and (t < 1).all()
    assert torch.equal(t, sampler.sample(10_000, torch.Generator().manual_seed(1)))


def test_family_defaults():
    assert snr.sampler_for("style_friendly", "flux").sigma == 3.0
    assert snr.sampler_for("style_friendly", "sd3").sigma == 2.0
    assert snr.sampler_for("style_friendly", "flux").mu == -6.0
    with pytest.raises(ValueError):
        snr.NoiseSampler("cosine")


def test_forward_process_and_velocity_target():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([0.25, 0.9])
    xt = snr.add_noise(x0, t, eps)
    assert torch.allclose(xt[0], 0.75 * x0[0] + 0.25 * eps[0])
    assert torch.allclose(snr.add_noise(x0, torch.zeros(2), eps), x0)
    assert torch.allclose(snr.add_noise(x0, torch.ones(2), eps), eps)
    # the velocity is the time derivative of x_t: eps - x0, no weighting or preconditioning
    h = 1e-3
    dx = (snr.add_noise(x0, t + h, eps) - snr.add_noise(x0, t - h, eps)) / (2 * h)
    assert torch.allclose(dx, snr.velocity_target(x0, eps), atol=1e-3)


def test_log_snr_round_trip():
    lam = torch.linspace(-15, 15, 101)
    assert torch.allclose(snr.log_snr(snr.t_from_log_snr(lam.double())), lam.double(), atol=1e-6)


def test_offset_noise_adds_a_per_channel_constant():
    base = snr.offset_noise((2, 3, 16, 16), 0.0, torch.Generator().manual_seed(0))
    plain = torch.randn((2, 3, 16, 16), generator=torch.Generator().manual_seed(0))
    assert torch.equal(base, plain)
    off = snr.offset_noise((2, 3, 16, 16), 0.5, torch.Generator().manual_seed(0))
    diff = off - plain
    assert torch.allclose(diff, diff[..., :1, :1].expand_as(diff))
    assert diff.abs().max() > 0
