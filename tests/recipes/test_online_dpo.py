"""Online DPO: best/worst pairs of each prompt's fresh samples, the pair loss by hand, the
recipe end to end on the tiny model (step-0 loss ln 2, β and the NLL term reach the loss)."""

from __future__ import annotations

import math

import pytest
import torch

from rlhfkit.config import ConfigError
from rlhfkit.recipes.online_dpo import OnlineDPOConfig, best_worst_pairs, pair_loss, pair_sides, run_online_dpo
from rlhfkit.train.metrics import read_metrics


def test_best_and_worst_of_each_group_when_they_differ():
    scores = torch.tensor([1.0, 0.0, 0.5,   0.0, 0.0, 0.0,   2.0, 3.0, 1.0,   1.0, 1.0, 0.0])
    chosen, rejected = best_worst_pairs(scores, group_size=3)
    assert chosen.tolist() == [0, 7, 9]          # ties: the first best …
    assert rejected.tolist() == [1, 8, 11]       # … and the group of equal scores gives no pair


def test_pair_sides_turns_interleaved_rows_into_chosen_then_rejected():
    assert pair_sides(torch.tensor([10, 20, 11, 21, 12, 22])).tolist() == [10, 11, 12, 20, 21, 22]


def _cfg(**kw):
    base = dict(model="tiny", tasks="demo", output_dir="unused")
    return OnlineDPOConfig(**{**base, **kw})


def test_pair_loss_by_hand():
    # 2 pairs laid out [chosen…, rejected…]; log-ratios vs the reference: chosen +1, rejected −1 → h = 2
    policy = torch.tensor([-3.0, -5.0, -7.0, -9.0])
    ref = torch.tensor([-4.0, -6.0, -6.0, -8.0])
    lengths = torch.tensor([2.0, 5.0, 3.0, 3.0])
    for beta in (0.1, 0.5):
        losses, _ = pair_loss(_cfg(beta=beta), policy, ref, lengths, 2)
        expected = -math.log(1 / (1 + math.exp(-beta * 2)))
        assert losses.tolist() == pytest.approx([expected, expected], rel=1e-6)
    losses, metrics = pair_loss(_cfg(beta=0.5, nll_weight=2.0), policy, ref, lengths, 2)
    nll = [3.0 / 2, 5.0 / 5]                      # − chosen sum / chosen length
    assert losses.tolist() == pytest.approx([expected + 2 * nll[0], expected + 2 * nll[1]], rel=1e-6)
    assert metrics["nll/preferred"].tolist() == pytest.approx(nll)
    ipo, _ = pair_loss(_cfg(loss="ipo", beta=0.5), policy, ref, lengths, 2)
    assert ipo.tolist() == pytest.approx([(2 - 1 / (2 * 0.5)) ** 2] * 2, rel=1e-6)   # (h − 1/2β)²


def test_config_mistakes():
    with pytest.raises(ConfigError, match="samples_per_prompt"):
        _cfg(samples_per_prompt=1)
    with pytest.raises(ConfigError, match="kto|loss"):
        _cfg(loss="kto")
    with pytest.raises(ConfigError, match="temperature"):
        _cfg(temperature=0.7)
    with pytest.raises(ConfigError, match="no β"):
        _cfg(loss="orpo", beta=0.5)


def test_online_dpo_end_to_end_starts_at_ln2_and_moves(tmp_path):
    torch.set_num_threads(1)
    cfg = OnlineDPOConfig(model="tiny", tasks="demo", demo_per_family=3, output_dir=str(tmp_path / "run"),
                          max_steps=2, prompts_per_step=4, samples_per_prompt=3, max_new_tokens=8, batch_size=4,
                          precision="fp32", progress=False, seed=5, lr=1e-3, reward="format:[a-m]")
    result = run_online_dpo(cfg)
    rows = read_metrics(cfg.output_dir)
    assert [r["step"] for r in rows] == [1, 2]
    first = rows[0]
    assert first["pairs"] >= 1
    # step 0: π = π_ref, so every pair's DPO loss is −log σ(0) = ln 2, whatever β
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert rows[1]["loss"] != pytest.approx(math.log(2), abs=1e-5)   # the update changed the policy
    assert (tmp_path / "run" / "final").is_dir() and result["final"].endswith("final")



def test_a_pairs_two_sides_share_their_prompt_and_change_no_number(tmp_path, monkeypatch):
    # share_prompts (the default) lays out each update micro-batch as c₀ r₀ c₁ r₁ …, each pair's
    # prompt stored once. The loss must still see [chosen…, rejected…]: every call's chosen half
    # is the higher-scored side of each pair, with that row's own summed log-probs and length.
    # And the two steps (the second after an update) log the unshared run's numbers.
    from rlhfkit.recipes import online_dpo

    calls, forwards = [], []
    real_outputs, real_loss = online_dpo.policy_outputs, online_dpo.pair_loss

    def outputs(module, part, pad_id, **kw):
        out = real_outputs(module, part, pad_id, **kw)
        forwards.append((part, out, kw["share_prompts"]))
        return out

    def loss(cfg, policy, ref, lengths, b):
        calls.append((policy.detach(), lengths, b))
        return real_loss(cfg, policy, ref, lengths, b)

    monkeypatch.setattr(online_dpo, "policy_outputs", outputs)
    monkeypatch.setattr(online_dpo, "pair_loss", loss)
    torch.set_num_threads(1)
    kw = dict(model="tiny", tasks="demo", demo_per_family=3, max_steps=2, prompts_per_step=4, samples_per_prompt=3,
              max_new_tokens=8, batch_size=4, precision="fp32", progress=False, seed=5, lr=1e-3,
              reward="format:[a-m]", nll_weight=0.5)
    run_online_dpo(OnlineDPOConfig(output_dir=str(tmp_path / "plain"), share_prompts=False, **kw))
    assert forwards and not any(shared for _, _, shared in forwards)
    forwards.clear(), calls.clear()
    run_online_dpo(OnlineDPOConfig(output_dir=str(tmp_path / "shared"), **kw))
    assert forwards and all(shared for _, _, shared in forwards) and len(calls) == len(forwards)
    for (part, out, _), (policy, lengths, b) in zip(forwards, calls, strict=True):
        assert torch.equal(part.prompt_ids[0::2], part.prompt_ids[1::2])       # each pair: one prompt
        assert (part.scores[0::2] > part.scores[1::2]).all()                    # c, r, c, r …
        sums = (out.logprobs.float() * part.response_mask).sum(-1)
        assert torch.equal(policy, torch.cat([sums[0::2], sums[1::2]]).detach())
        assert lengths.tolist() == part.response_mask.sum(-1)[0::2].tolist() + part.response_mask.sum(-1)[1::2].tolist()
    plain, shared = read_metrics(tmp_path / "plain"), read_metrics(tmp_path / "shared")
    assert [r["step"] for r in shared] == [1, 2] and plain[0]["pairs"] >= 1
    for a, b in zip(plain, shared, strict=True):
        for key in ("loss", "pairs", "nll/preferred", "rewards/margin", "grad_norm"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
