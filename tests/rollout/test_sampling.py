"""The token draw of the generation engine: inverse-CDF sampling as the last logits processor."""

import math

import torch

from rlhfkit.rollout.generate import InverseCDFSampler, SamplingConfig, sampling_processors

PROBS = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.0])


def _draw(processor, probs: torch.Tensor, rows: int) -> torch.Tensor:
    scores = probs.log().expand(rows, -1).clone()  # log 0 = −inf: a token that must never come
    out = processor(torch.zeros(rows, 1, dtype=torch.long), scores)
    return out


def test_the_draw_puts_all_mass_on_one_token_per_row_and_follows_the_distribution():
    rows = 40_000
    out = _draw(InverseCDFSampler(torch.Generator().manual_seed(0)), PROBS, rows)
    # One 0 per row, −inf elsewhere: generate's argmax takes exactly the drawn token.
    assert torch.all((out == 0).sum(-1) == 1) and torch.all(torch.isinf(out).sum(-1) == PROBS.numel() - 1)
    tokens = out.argmax(-1)
    counts = torch.bincount(tokens, minlength=PROBS.numel()).double()
    assert counts[4] == 0  # probability 0
    expected = PROBS.double() * rows
    # each count within 4 binomial standard deviations of n·p
    sd = (rows * PROBS.double() * (1 - PROBS.double())).sqrt()
    assert torch.all((counts[:4] - expected[:4]).abs() < 4 * sd[:4]), counts
    chi2 = float((((counts[:4] - expected[:4]) ** 2) / expected[:4]).sum())
    assert chi2 < 16.3  # χ² with 3 degrees of freedom: P(> 16.27) = 0.001


def test_the_draw_is_a_pure_function_of_the_seed():
    a = _draw(InverseCDFSampler(torch.Generator().manual_seed(5)), PROBS, 64).argmax(-1)
    b = _draw(InverseCDFSampler(torch.Generator().manual_seed(5)), PROBS, 64).argmax(-1)
    c = _draw(InverseCDFSampler(torch.Generator().manual_seed(6)), PROBS, 64).argmax(-1)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_the_inverse_cdf_by_hand():
    # F = [0.1, 0.3, 0.6, 1.0, 1.0]; the uniform u picks min{v : F_v > u}.
    gen = torch.Generator().manual_seed(11)
    u = torch.rand((3, 1), generator=torch.Generator().manual_seed(11), dtype=torch.float64).squeeze(1)
    cdf = [0.1, 0.3, 0.6, 1.0]
    expected = [next(v for v, f in enumerate(cdf) if f > x) for x in u.tolist()]
    got = _draw(InverseCDFSampler(gen), PROBS, 3).argmax(-1).tolist()
    assert got == expected


def test_temperature_top_k_and_top_p_act_before_the_draw():
    rows = 20_000
    # top-k 2 keeps 0.3 and 0.4: drawn 3 : 4
    proc = sampling_processors(SamplingConfig(temperature=1.0, top_k=2), torch.Generator().manual_seed(1))
    counts = torch.bincount(_draw(proc, PROBS, rows).argmax(-1), minlength=5).double()
    assert counts[0] == counts[1] == counts[4] == 0
    assert abs(counts[3] / rows - 4 / 7) < 4 * math.sqrt((4 / 7) * (3 / 7) / rows)
    # top-p 0.65 keeps the smallest set of most likely tokens with mass ≥ 0.65: {0.4, 0.3}
    proc = sampling_processors(SamplingConfig(temperature=1.0, top_p=0.65), torch.Generator().manual_seed(1))
    assert set(_draw(proc, PROBS, 2_000).argmax(-1).tolist()) == {2, 3}
    # temperature 0.5 squares the odds: p ∝ [0.01, 0.04, 0.09, 0.16]
    proc = sampling_processors(SamplingConfig(temperature=0.5), torch.Generator().manual_seed(2))
    counts = torch.bincount(_draw(proc, PROBS, rows).argmax(-1), minlength=5).double()
    sharp = torch.tensor([0.01, 0.04, 0.09, 0.16, 0.0], dtype=torch.float64) / 0.30
    sd = (rows * sharp * (1 - sharp)).sqrt()
    assert torch.all((counts[:4] - rows * sharp[:4]).abs() < 4 * sd[:4]), counts
