"""Multi-turn environments (`rollout.environments`) and episodes (`rollout.episodes`): the tools,
the hand-checked token and loss-mask layout of a 2-turn episode, and containment of an
environment that raises or hangs."""

import json
import time

import pytest
import torch

from rlhfkit.data.batches import IGNORE_INDEX
from rlhfkit.models.tiny import tiny_causal_lm, tiny_tokenizer
from rlhfkit.recipes.sft import SFTConfig, run_sft
from rlhfkit.rollout import episodes as episodes_module
from rlhfkit.rollout.environments import (
    CalculatorEnvironment,
    EnvConfig,
    StepResult,
    calculate,
    calculator_sft_record,
    lookup,
    make_environment,
)
from rlhfkit.rollout.episodes import EpisodeConfig, episode_rollout, run_episodes, stop_ids, tool_turn_ids
from rlhfkit.rollout.generate import SamplingConfig
from rlhfkit.rollout.prompts import demo_prompts
from rlhfkit.rollout.rollout import pack_left, unpack_left
from rlhfkit.tasks.check import check


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_causal_lm(seed=3)


def arithmetic_prompt(answer: str | None = None):
    (prompt,) = demo_prompts("train", 1, families=("arithmetic",))
    return prompt


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------------------- tools
@pytest.mark.parametrize("expr, expected", [("12 * 7", "84"), ("(3 + 4) × 2", "14"), ("7 x 3", "21"),
                                            ("10 / 4", "2.5"), ("9 / 3", "3"), ("1,000 + 1", "1001")])
def test_calculator_evaluates_arithmetic(expr, expected):
    assert calculate(expr) == expected


@pytest.mark.parametrize("expr", ["__import__('os').system('true')", "2 ** 100", "10 ** 6 * 10 ** 7", "1 / 0",
                                  "abc", "(1"])
def test_calculator_refuses_everything_else_with_an_error_string(expr):
    assert calculate(expr).startswith("error:")


def test_lookup_finds_unit_facts_in_either_number():
    assert "1 kilometer = 1000 meters" in lookup("meters")
    assert "1 meter = 100 centimeters" in lookup("Meter")
    assert lookup("feet") == "1 foot = 12 inches; 1 yard = 3 feet"
    assert lookup("banana").startswith("not found")


def test_calculator_env_runs_tool_calls_then_scores_the_answer():
    prompt = arithmetic_prompt()
    answer = prompt.meta["task"].answer
    env = make_environment("calculator", EnvConfig(max_turns=3))
    first = env.reset(prompt)
    assert "<calc>" in first[-1].content and prompt.prompt[-1].content in first[-1].content
    step = env.step("Let me compute. <calc>2 + 3</calc> and <lookup>meter</lookup>")
    assert step == StepResult("2 + 3 = 5\nmeter: 1 kilometer = 1000 meters; 1 meter = 100 centimeters; "
                              "1 meter = 1000 millimeters", 0.0, False, {"tool_calls": 2})
    assert env.step(f"Answer: {answer}") == StepResult(None, 1.0, True, {"tool_calls": 0})


def test_the_last_turn_is_checked_even_with_a_tool_call():
    prompt = arithmetic_prompt()
    env = make_environment("calculator", EnvConfig(max_turns=1))
    env.reset(prompt)
    step = env.step(f"<calc>1+1</calc>\nAnswer: {prompt.meta['task'].answer}")
    assert step.done and step.reward == 1.0 and step.info["tool_calls"] == 1


def test_python_env_runs_code_in_the_sandbox():
    env = make_environment("python", EnvConfig(max_turns=5, tool_timeout_s=2.0))
    env.reset(arithmetic_prompt())
    assert env.step("```python\nprint(12 * 7)\n```").observation == "output: 84"
    assert env.step("```python\n1/0\n```").observation == "error: ZeroDivisionError: division by zero"
    start = time.monotonic()
    assert env.step("```python\nwhile True: pass\n```").observation == "error: timed out after 2 s"
    assert time.monotonic() - start < 10


def test_unknown_environment_is_one_line():
    with pytest.raises(ValueError, match="unknown environment 'calculater'.*did you mean 'calculator'"):
        make_environment("calculater", EnvConfig())


# ---------------------------------------------------------------------------- the episode layout
def test_tool_turn_is_the_chat_template_user_turn(tok):
    assert tok.decode(tool_turn_ids(tok, "2+3 = 5")) == "\n<|im_start|>user\n2+3 = 5<|im_end|>\n<|im_start|>assistant\n"


def test_two_turn_episode_layout_by_hand(tok, model, monkeypatch):
    """Turn 1 calls the calculator, turn 2 answers: response = turn 1 + tool turn + turn 2,
    loss mask 1 on the turns (stop tokens included), 0 on the tool turn."""
    prompt = arithmetic_prompt()
    end = stop_ids(tok)[0]
    turn1 = ids(tok, "<calc>2+3</calc>") + [end]
    turn2 = ids(tok, f"Answer: {prompt.meta['task'].answer}") + [end]
    script = iter([[(turn1, True)], [(turn2, True)]])
    contexts = []

    def scripted(model, tokenizer, ctxs, cfg, share=None):
        contexts.append([list(c) for c in ctxs])
        return next(script)

    monkeypatch.setattr(episodes_module, "decode_turns", scripted)
    cfg = EpisodeConfig("calculator", EnvConfig(max_turns=3), max_length=1024)
    (ep,) = run_episodes(model, tok, [prompt], cfg, SamplingConfig(n=1))
    tool = tool_turn_ids(tok, "2+3 = 5")
    assert ep.response_ids == turn1 + tool + turn2
    assert ep.loss_mask == [1] * len(turn1) + [0] * len(tool) + [1] * len(turn2)
    assert ep.reward == 1.0 and ep.done and ep.finished
    assert ep.counts == {"turns": 2, "tool_calls": 1, "errors": 0, "timeouts": 0, "truncated": 0}
    assert contexts[1] == [ep.prompt_ids + turn1 + tool]     # turn 2 read exactly turn 1's tokens

    r = episode_rollout([ep], group_size=1, pad_id=0)
    assert r.response_mask[0].tolist() == [float(m) for m in ep.loss_mask]
    assert r.response_attention_mask[0].tolist() == [1.0] * len(ep.response_ids)
    assert r.num_tokens == len(ep.prompt_ids) + len(ep.response_ids)
    batch = r.lm_batch(pad_id=0)
    p = len(ep.prompt_ids)
    assert batch.input_ids[0].tolist() == ep.prompt_ids + ep.response_ids
    labels = batch.labels[0].tolist()
    assert labels[p - 1:p - 1 + len(turn1)] == turn1
    assert labels[p - 1 + len(turn1):p - 1 + len(turn1) + len(tool)] == [IGNORE_INDEX] * len(tool)
    assert labels[p - 1 + len(turn1) + len(tool):-1] == turn2
    # label-layout values land on the model's tokens only
    per_position = torch.arange(batch.labels.shape[1], dtype=torch.float32).unsqueeze(0) + 1
    laid = r.response_layout(per_position, batch)[0]
    assert (laid[len(turn1):len(turn1) + len(tool)] == 0).all()
    assert laid[len(turn1) - 1] == p - 1 + len(turn1)       # the stop token of turn 1, at its label position
    assert laid[len(turn1) + len(tool)] == p - 1 + len(turn1) + len(tool) + 1


def test_an_unfinished_turn_is_closed_by_an_untrained_stop_token(tok, model, monkeypatch):
    prompt = arithmetic_prompt()
    turn1 = ids(tok, "<calc>2+3</calc> and so")                      # hit the token limit
    turn2 = ids(tok, "Answer: 0") + [stop_ids(tok)[0]]
    script = iter([[(turn1, False)], [(turn2, True)]])
    monkeypatch.setattr(episodes_module, "decode_turns", lambda *a, **k: next(script))
    (ep,) = run_episodes(model, tok, [prompt], EpisodeConfig("calculator"), SamplingConfig(n=1))
    tool = [stop_ids(tok)[0]] + tool_turn_ids(tok, "2+3 = 5")
    assert ep.response_ids == turn1 + tool + turn2
    assert ep.loss_mask == [1] * len(turn1) + [0] * len(tool) + [1] * len(turn2)


# ---------------------------------------------------------------------------- containment
class Raising:
    def reset(self, prompt):
        return prompt.prompt

    def step(self, text):
        raise RuntimeError("the tool broke")


class Hanging(Raising):
    def step(self, text):
        time.sleep(30)


class Talking(Raising):
    """Never done: answers every turn with an observation."""

    def step(self, text):
        return StepResult("keep going", 0.0, False, {"tool_calls": 1})


@pytest.mark.parametrize("env, count", [(Raising, "errors"), (Hanging, "timeouts")])
def test_a_raising_or_hanging_environment_is_contained(tok, model, env, count):
    prompts = demo_prompts("train", 2, families=("arithmetic",))
    cfg = EpisodeConfig("calculator", EnvConfig(max_turns=3), step_timeout_s=0.5)
    start = time.monotonic()
    eps = run_episodes(model, tok, prompts, cfg, SamplingConfig(max_new_tokens=4, temperature=1.0, n=2),
                       make_env=lambda name, c: env())
    assert time.monotonic() - start < 10                            # one 0.5 s limit per turn, not 30 s per step
    assert [ep.reward for ep in eps] == [0.0] * 4
    assert all(ep.done and ep.counts[count] == 1 and ep.counts["turns"] == 1 for ep in eps)
    r = episode_rollout(eps, group_size=2, pad_id=0)
    assert r.episode[count].tolist() == [1.0] * 4


def test_turn_and_length_limits_end_an_episode(tok, model):
    prompts = demo_prompts("train", 1, families=("arithmetic",))
    cfg = EpisodeConfig("calculator", EnvConfig(max_turns=2))
    (ep,) = run_episodes(model, tok, prompts, cfg, SamplingConfig(max_new_tokens=4, temperature=1.0),
                         make_env=lambda name, c: Talking())
    assert ep.counts["turns"] == 2 and ep.counts["tool_calls"] == 2 and ep.counts["truncated"] == 1
    r = episode_rollout([ep], group_size=1, pad_id=0)
    assert r.response_mask[0, -1] == 1                                 # the trailing tool turn is trimmed
    short = EpisodeConfig("calculator", EnvConfig(max_turns=5), max_length=len(ep.prompt_ids) + 12)
    (ep,) = run_episodes(model, tok, prompts, short, SamplingConfig(max_new_tokens=4, temperature=1.0),
                         make_env=lambda name, c: Talking())
    assert ep.counts["truncated"] == 1 and ep.counts["turns"] < 5
    assert episode_rollout([ep], group_size=1, pad_id=0).num_tokens <= short.max_length   # what is trained fits


def test_episodes_are_a_pure_function_of_the_seed(tok, model):
    prompts = demo_prompts("train", 2, families=("arithmetic",))
    cfg = EpisodeConfig("calculator", EnvConfig(max_turns=2))
    sampling = SamplingConfig(max_new_tokens=6, temperature=1.0, n=2, seed=7)
    a = run_episodes(model, tok, prompts, cfg, sampling, make_env=lambda name, c: Talking())
    b = run_episodes(model, tok, prompts, cfg, sampling, make_env=lambda name, c: Talking())
    assert [e.response_ids for e in a] == [e.response_ids for e in b]


# ---------------------------------------------------------------------------- packing
def test_pack_left_and_back_by_hand():
    x = torch.tensor([[1., 2., 3., 4., 5.], [6., 7., 8., 0., 0.]])
    mask = torch.tensor([[1, 0, 0, 1, 1], [1, 1, 1, 0, 0]])
    packed = pack_left(x, mask)
    assert packed.tolist() == [[1., 4., 5., 0., 0.], [6., 7., 8., 0., 0.]]
    assert pack_left(mask.float(), mask).tolist() == [[1., 1., 1., 0., 0.], [1., 1., 1., 0., 0.]]
    assert unpack_left(packed, mask).tolist() == [[1., 0., 0., 4., 5.], [6., 7., 8., 0., 0.]]


def test_calculator_warm_start_records_are_episodes_the_environment_would_produce(tmp_path):
    """The SFT conversations that teach the tool call: the user turn is the environment's
    opening, the tool's reply is what the calculator answers to that call, the final answer
    passes the task's checker, and `rlhf sft` reads the file."""
    prompts = demo_prompts("train", 4, families=("arithmetic", "units"))
    records = [calculator_sft_record(p) for p in prompts]
    assert all(records)
    for prompt, record in zip(prompts, records, strict=True):
        env = CalculatorEnvironment(EnvConfig(max_turns=2))
        opening = env.reset(prompt)
        user, call, reply = record["prompt"]
        assert user == {"role": "user", "content": opening[-1].content}
        assert call["role"] == "assistant" and call["content"].startswith("<calc>")
        assert reply == {"role": "user", "content": env.step(call["content"]).observation}
        assert reply["content"].split(" = ")[-1] in record["completion"]  # the tool confirms the reference's result
        assert check(prompt.meta["task"], record["completion"])
    data = tmp_path / "warm.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    result = run_sft(SFTConfig(model="tiny", train_data=str(data), output_dir=str(tmp_path / "sft"), max_steps=1,
                               batch_size=4, precision="fp32", progress=False))
    assert (tmp_path / "sft" / "final" / "config.json").exists() and result
