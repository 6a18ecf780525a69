"""Video MixStyle (heads/mixstyle.py): statistics mixed as specified, identity at evaluation and with p = 0."""
from __future__ import annotations

import pytest
import torch

from heads import HeadError
from heads.mixstyle import VideoMixStyle, crosshalf_partners, mix_video_styles


def test_mixstyle_mixes_each_videos_channel_statistics_with_its_partner():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 2, 2, 5) * (0.5 + 4 * torch.rand(4, 1, 1, 1, 5)) + 3 * torch.randn(4, 1, 1, 1, 5)
    lam, partner = torch.tensor([0.2, 1.0, 0.5, 0.0]), torch.tensor([3, 2, 1, 0])
    mixed = mix_video_styles(x, lam, partner)
    assert mixed.shape == x.shape
    mu, sigma = x.mean(dim=(1, 2, 3)), x.std(dim=(1, 2, 3))                 # [B, C], over time and space
    expected_mu = lam[:, None] * mu + (1 - lam[:, None]) * mu[partner]
    expected_sigma = lam[:, None] * sigma + (1 - lam[:, None]) * sigma[partner]
    assert torch.allclose(mixed.mean(dim=(1, 2, 3)), expected_mu, atol=1e-5)
    assert torch.allclose(mixed.std(dim=(1, 2, 3)), expected_sigma, atol=1e-4)
    assert torch.allclose(mixed[1], x[1], atol=1e-5)                         # lam = 1 keeps the video's own style


def test_mixstyle_is_the_identity_in_eval_and_with_p_zero_and_mixes_in_training():
    x = torch.rand(6, 3, 2, 2, 4)
    assert VideoMixStyle(1.0, 0.1, "random").eval()(x) is x
    assert VideoMixStyle(0.0, 0.1, "random").train()(x) is x
    torch.manual_seed(0)
    mixed = VideoMixStyle(1.0, 0.1, "crosshalf").train()(x)
    assert mixed.shape == x.shape and not torch.allclose(mixed, x, atol=1e-3)


def test_crosshalf_partners_pair_the_two_halves():
    torch.manual_seed(0)
    partners = crosshalf_partners(8).tolist()
    assert sorted(partners) == list(range(8))
    assert set(partners[:4]) == {4, 5, 6, 7} and set(partners[4:]) == {0, 1, 2, 3}


@pytest.mark.parametrize("batch_size", [3, 5])
def test_crosshalf_partners_of_an_odd_batch_lie_in_the_other_half(batch_size):
    torch.manual_seed(0)
    half = batch_size // 2                                      # B = 5: first half {0, 1}, second half {2, 3, 4}
    extra_partners = set()
    for _ in range(20):
        partners = crosshalf_partners(batch_size).tolist()
        assert len(partners) == batch_size
        assert all((video < half) != (partner < half) for video, partner in enumerate(partners))   # never itself
        assert len(set(partners[:half])) == half                # the first half's partners are distinct
        assert set(partners[half:]) == set(range(half))         # every first-half video is someone's partner
        extra_partners.add(partners[-1])
    assert extra_partners == set(range(half))                   # the extra video's partner is drawn at random


def test_crosshalf_partners_need_two_videos():
    with pytest.raises(HeadError, match="batch_size >= 2"):
        crosshalf_partners(1)
