import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hclafter.core.config import LossConfig
from hclafter.core.emotions import EKMAN6, MIKELS8, Wheel, strategy1, wheel_distance
from hclafter.models.losses import dual_task_loss, stage_consistency_loss, task_loss


def test_wheel_distance_is_steps_around_the_circle():
    assert wheel_distance(MIKELS8, 0, 7) == 1  # amusement - anger are neighbours on the circle
    assert wheel_distance(MIKELS8, 0, 4) == 4  # amusement - fear: opposite
    assert wheel_distance(EKMAN6, 0, 5) == 1
    assert wheel_distance(EKMAN6, 1, 4) == 3


def test_strategy1_mikels_amusement_by_hand():
    # N(d; 0, 1) for d = 0..4: 0.3989423, 0.2419707, 0.0539910, 0.0044318, 0.0001338; + eps/C = 0.0125.
    # distances from amusement: 0 1 2 3 4 3 2 1 -> sum of terms 1.0998631.
    expected = np.array([0.4114423, 0.2544707, 0.0664910, 0.0169318, 0.0126338, 0.0169318, 0.0664910, 0.2544707])
    expected /= 1.0998631
    d = strategy1(MIKELS8, MIKELS8.index("amusement"), sigma=1.0, epsilon=0.1)
    assert np.allclose(d, expected, atol=1e-6)
    assert np.allclose(d[:2], [0.374089, 0.231365], atol=1e-6)


def test_strategy1_ekman_sadness_by_hand():
    # distances from sadness (index 3): 3 2 1 0 1 2; eps/C = 0.0166667; sum of terms 1.0952977.
    d = strategy1(EKMAN6, EKMAN6.index("sadness"), sigma=1.0, epsilon=0.1)
    assert np.allclose(d, [0.019263, 0.064510, 0.236135, 0.379448, 0.236135, 0.064510], atol=1e-6)


def test_strategy1_exclusion_zeroes_the_opposite_polarity():
    d = strategy1(MIKELS8, 0, exclusion=True)
    terms = np.array([0.4114423, 0.2544707, 0.0664910, 0.0169318])
    assert np.allclose(d[:4], terms / terms.sum(), atol=1e-6)
    assert (d[4:] == 0).all()


def test_wheel_lookup_by_name_and_errors():
    assert MIKELS8.index(" Fear ") == 4
    with pytest.raises(KeyError, match="unknown class 'joy'.*amusement"):
        MIKELS8.index("joy")
    with pytest.raises(ValueError, match="unique"):
        Wheel("bad", ("a", "a"), (0, 1))


def test_dual_task_gradient_at_t1_is_softmax_minus_target_over_batch():
    torch.manual_seed(0)
    z = torch.randn(4, 8, requires_grad=True)
    y = torch.tensor([0, 3, 5, 7])
    d = torch.softmax(torch.randn(4, 8), dim=1)
    dual_task_loss(z, y, d, lam=0.8, temperature=1.0).backward()
    u = 0.2 * F.one_hot(y, 8).float() + 0.8 * d
    assert torch.allclose(z.grad, (torch.softmax(z.detach(), 1) - u) / 4, atol=1e-6)


def test_dual_task_value_and_temperature():
    z = torch.tensor([[2.0, 0.0, -1.0]])
    y = torch.tensor([0])
    d = torch.tensor([[0.5, 0.3, 0.2]])
    u = torch.tensor([0.2 * 1 + 0.8 * 0.5, 0.8 * 0.3, 0.8 * 0.2])  # 0.6, 0.24, 0.16
    for t in (1.0, 4.0):
        log_p = torch.log_softmax(z / t, 1)[0]
        expected = t**2 * (u * (u.log() - log_p)).sum()
        assert torch.allclose(dual_task_loss(z, y, d, lam=0.8, temperature=t), expected, atol=1e-6)


def test_stage_consistency_is_mean_pairwise_kl():
    torch.manual_seed(1)
    logits = torch.randn(3, 5, 4)
    p = torch.softmax(logits, -1)
    pairs = [(0, 1), (0, 2), (1, 2)]
    expected = sum((p[j] * (p[j].log() - p[i].log())).sum(-1).mean() for i, j in pairs) / 3
    assert torch.allclose(stage_consistency_loss(logits), expected, atol=1e-6)
    assert stage_consistency_loss(torch.randn(1, 5, 4)).item() == 0.0
    same = torch.randn(5, 4).expand(3, 5, 4)
    assert stage_consistency_loss(same).abs().item() < 1e-6


def test_task_loss_variants():
    z = torch.randn(6, 8)
    y = torch.randint(0, 8, (6,))
    d = torch.full((6, 8), 1 / 8)
    assert torch.allclose(task_loss(LossConfig(name="ce"), z, y, d), F.cross_entropy(z, y))
    assert torch.allclose(task_loss(LossConfig(name="ls_ce", label_smoothing=0.1), z, y, d),
                          F.cross_entropy(z, y, label_smoothing=0.1))
    assert torch.allclose(task_loss(LossConfig(), z, y, d), dual_task_loss(z, y, d, 0.8, 1.0))
