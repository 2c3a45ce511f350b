import pytest

from rlhfkit.train.kl_control import AdaptiveKLController, FixedKLController


def test_fixed_never_moves():
    ctl = FixedKLController(0.05)
    assert ctl.update(current_kl=100.0, n_steps=256) == 0.05 and ctl.value == 0.05


@pytest.mark.parametrize("kl, expected", [
    # target 6, horizon 10000, n_steps 256 → step size 256/10000 = 0.0256
    (9.0, 0.1 * (1 + 0.2 * 0.0256)),    # 9/6 − 1 = +0.5 → clipped to +0.2: β up
    (6.6, 0.1 * (1 + 0.1 * 0.0256)),    # +0.1 inside the clip
    (6.0, 0.1),                         # on target: unchanged
    (3.0, 0.1 * (1 - 0.2 * 0.0256)),    # −0.5 → clipped to −0.2: β down
])
def test_adaptive_direction_and_magnitude(kl, expected):
    ctl = AdaptiveKLController(init_coef=0.1, target=6.0, horizon=10000)
    assert ctl.update(kl, n_steps=256) == pytest.approx(expected, rel=1e-12)
    assert ctl.value == pytest.approx(expected, rel=1e-12)


def test_adaptive_compounds_and_resumes_exactly():
    ctl = AdaptiveKLController(init_coef=0.2, target=1.0, horizon=100)
    ctl.update(2.0, n_steps=10)                     # ×(1 + 0.2·0.1) = ×1.02
    assert ctl.value == pytest.approx(0.204)
    resumed = AdaptiveKLController(init_coef=0.2, target=1.0, horizon=100)
    resumed.load_state_dict(ctl.state_dict())
    assert resumed.update(0.9, 10) == ctl.update(0.9, 10) == pytest.approx(0.204 * 0.99)
    with pytest.raises(ValueError, match="same config"):
        AdaptiveKLController(0.2, target=2.0, horizon=100).load_state_dict(ctl.state_dict())


def test_fixed_resume():
    ctl = FixedKLController(0.3)
    other = FixedKLController(0.1)
    other.load_state_dict(ctl.state_dict())
    assert other.value == 0.3


@pytest.mark.parametrize("kwargs", [
    dict(init_coef=0.0, target=1.0, horizon=10),
    dict(init_coef=0.1, target=-1.0, horizon=10),
    dict(init_coef=0.1, target=1.0, horizon=0),
])
def test_adaptive_rejects_bad_config(kwargs):
    with pytest.raises(ValueError):
        AdaptiveKLController(**kwargs)


def test_adaptive_rejects_bad_updates():
    ctl = AdaptiveKLController(0.1, target=1.0, horizon=10)
    with pytest.raises(ValueError, match="finite"):
        ctl.update(float("nan"), 1)
    with pytest.raises(ValueError, match="too large"):
        ctl.update(0.0, 60)                         # 1 − 0.2·6 < 0 would flip β's sign
