"""Multi-turn environments with tools: the protocol, the tool-call formats, and two environments.

An episode (run by `rollout.episodes.run_episodes`) is

    obs_0 = env.reset(prompt)                      the first user turn(s), a Conversation
    repeat up to max_turns:
        text_k = the model's turn, sampled given everything so far
        step_k = env.step(text_k)                  StepResult(observation, reward, done, info)
        done → stop; else observation_k becomes the next user turn

Tool calls are plain text inside the model's turn, in formats a small chat model can copy
from one example in the prompt:

    python      a fenced block   ```python\\n<code>\\n```     (its stdout is the observation)
    calculator  <calc>EXPRESSION</calc>                      (e.g. <calc>12 * 7</calc> → 84)
                <lookup>UNIT</lookup>                        (e.g. <lookup>meter</lookup> →
                                                              "1 meter = 100 centimeters")

A model turn with no tool call is the answer: the episode ends and the reward is the demo
task's exact checker (`tasks.check.check`) on that turn. A turn with calls gets reward 0 and
the tool results as the next user turn; when the turns run out, the last turn is checked.
The observation is rendered as a `user` turn (SmolLM2's ChatML template has no tool role).

Environments are in-process objects, one per episode; a step that raises or hangs is
contained by the episode runner, not here. The Python tool runs in `rollout.sandbox`.
"""

from __future__ import annotations

import ast
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from rlhfkit.config import did_you_mean
from rlhfkit.data.schemas import Conversation, Message
from rlhfkit.rollout.prompts import RLPrompt
from rlhfkit.rollout.sandbox import SandboxSetupError, run_python
from rlhfkit.tasks.check import check
from rlhfkit.tasks.generate import Task

PYTHON_BLOCK = re.compile(r"```(?:python|py)[ \t]*\n(.*?)(?:```|$)", re.DOTALL)
CALC_CALL = re.compile(r"<calc>(.*?)</calc>", re.DOTALL)
LOOKUP_CALL = re.compile(r"<lookup>(.*?)</lookup>", re.DOTALL)
MAX_OBSERVATION_CHARS = 300   # a tool's output is cut here: it becomes context tokens every turn


@dataclass(frozen=True)
class StepResult:
    """One environment step: the next user turn (None when done), the reward, done, diagnostics.
    info["tool_calls"]: how many tool calls the model's turn made."""

    observation: str | None
    reward: float
    done: bool
    info: dict[str, Any] = field(default_factory=dict)


class Environment(Protocol):
    """What an episode runner needs from an environment (one instance per episode)."""

    def reset(self, prompt: RLPrompt) -> Conversation:
        """The conversation the model answers first (the task plus how to call the tools)."""

    def step(self, model_text: str) -> StepResult:
        """React to one model turn (its decoded text): run its tool calls or score its answer."""


@dataclass(frozen=True)
class EnvConfig:
    """Per-episode settings of the tools."""

    max_turns: int = 3             # model turns per episode
    tool_timeout_s: float = 5.0    # wall-clock limit of one turn's tool calls


def _task(prompt: RLPrompt) -> Task:
    task = prompt.meta.get("task")
    if not isinstance(task, Task) or not task.checkable:
        raise ValueError("multi-turn environments score demo tasks: use --tasks demo with a checkable family")
    return task


def _clip(text: str) -> str:
    text = text.strip()
    return text if len(text) <= MAX_OBSERVATION_CHARS else text[:MAX_OBSERVATION_CHARS] + " …"


def _with_instructions(prompt: RLPrompt, instructions: str) -> Conversation:
    """The prompt with `instructions` appended to its last user turn."""
    messages = list(prompt.prompt)
    last = max(i for i, m in enumerate(messages) if m.role == "user")
    messages[last] = Message("user", f"{messages[last].content}\n\n{instructions}")
    return tuple(messages)


class _TaskEnvironment:
    """Shared by both environments: turn counting, and the answer check that ends an episode."""

    instructions = ""

    def __init__(self, cfg: EnvConfig):
        self.cfg = cfg
        self.task: Task | None = None
        self.turn = 0

    def reset(self, prompt: RLPrompt) -> Conversation:
        self.task, self.turn = _task(prompt), 0
        return _with_instructions(prompt, self.instructions)

    def tool_results(self, model_text: str) -> list[str]:
        raise NotImplementedError

    def step(self, model_text: str) -> StepResult:
        if self.task is None:
            raise RuntimeError("step() before reset()")
        self.turn += 1
        results = self.tool_results(model_text)
        if not results or self.turn >= self.cfg.max_turns:
            reward = 1.0 if check(self.task, model_text) else 0.0
            return StepResult(None, reward, True, {"tool_calls": len(results)})
        return StepResult(_clip("\n".join(results)), 0.0, False, {"tool_calls": len(results)})


# ============================================================================ the calculator
_BINARY: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY: dict[type, Callable[[Any], Any]] = {ast.USub: operator.neg, ast.UAdd: operator.pos}
MAX_MAGNITUDE = 10 ** 12


def calculate(expression: str) -> str:
    """The value of an arithmetic expression (numbers, + − × ÷ // % **, parentheses; '×', '÷'
    and 'x' between numbers accepted) as text, or "error: …". Never evaluates names or calls;
    exponents are capped at 64 and every intermediate value at 1e12."""
    text = expression.strip().replace("×", "*").replace("÷", "/").replace(",", "")
    text = re.sub(r"(?<=\d)\s*x\s*(?=\d)", "*", text)
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        return f"error: cannot read '{_clip(expression)}'"

    def value(node: ast.AST) -> int | float:
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](value(node.operand))
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > 64:
                raise ValueError("exponent too large")
            out = _BINARY[type(node.op)](left, right)
            if abs(out) > MAX_MAGNITUDE:
                raise ValueError("number too large")
            return out
        raise ValueError("only numbers and + - * / // % ** are allowed")

    try:
        result = value(tree.body)
    except (ValueError, ZeroDivisionError, OverflowError, TypeError) as e:
        return f"error: {e}"
    if isinstance(result, float) and result.is_integer():
        result = int(result)
    return str(round(result, 6) if isinstance(result, float) else result)


# The lookup tool's knowledge: how many of the small unit make one big unit.
UNIT_FACTS: tuple[tuple[str, str, int], ...] = (
    ("kilometer", "meters", 1000), ("meter", "centimeters", 100), ("meter", "millimeters", 1000),
    ("centimeter", "millimeters", 10), ("kilogram", "grams", 1000), ("liter", "milliliters", 1000),
    ("hour", "minutes", 60), ("minute", "seconds", 60), ("day", "hours", 24), ("week", "days", 7),
    ("year", "months", 12), ("dozen", "items", 12), ("foot", "inches", 12), ("yard", "feet", 3),
    ("mile", "yards", 1760), ("pound", "ounces", 16), ("gallon", "quarts", 4), ("ton", "kilograms", 1000))


def _singular(word: str) -> str:
    word = word.strip().lower().rstrip(".?! ")
    return {"feet": "foot", "inches": "inch"}.get(word, word[:-1] if word.endswith("s") else word)


def lookup(query: str) -> str:
    """Every unit fact that mentions the queried unit (singular or plural), e.g. "meter" →
    "1 kilometer = 1000 meters; 1 meter = 100 centimeters; …"; "not found: …" otherwise."""
    unit = _singular(query)
    facts = [f"1 {big} = {n} {small}" for big, small, n in UNIT_FACTS if unit in (big, _singular(small))]
    return "; ".join(facts) if facts else f"not found: '{_clip(query)}'"


class CalculatorEnvironment(_TaskEnvironment):
    """Multi-step arithmetic and unit conversion with a calculator and a unit lookup, in process."""

    instructions = ("You may use tools. Write <calc>12 * 7</calc> to compute, or <lookup>meter</lookup> "
                    "to look up a unit; the results come back in the next message. When you know the "
                    "answer, end with a last line 'Answer: <value>'.")

    def tool_results(self, model_text: str) -> list[str]:
        calls = [(m.start(), f"{m.group(1).strip()} = {calculate(m.group(1))}") for m in CALC_CALL.finditer(model_text)]
        calls += [(m.start(), f"{m.group(1).strip()}: {lookup(m.group(1))}") for m in LOOKUP_CALL.finditer(model_text)]
        return [text for _, text in sorted(calls)]


# ============================================================================ the Python tool
class PythonEnvironment(_TaskEnvironment):
    """Solve the task by writing a program: each ```python block runs in the sandbox (one
    process per block, `tool_timeout_s` wall clock, the sandbox's memory and process limits);
    its stdout (or the last line of its error) is the observation."""

    instructions = ("You may run Python: write a ```python code block that prints what you need; its "
                    "output comes back in the next message. When you know the answer, end with a last "
                    "line 'Answer: <value>'.")

    def tool_results(self, model_text: str) -> list[str]:
        return [self.run(code) for code in PYTHON_BLOCK.findall(model_text) if code.strip()]

    def run(self, code: str) -> str:
        try:
            result = run_python(code, timeout_s=self.cfg.tool_timeout_s, memory_mb=256)
        except SandboxSetupError as e:  # not the model's fault: tell the run, do not score it
            raise RuntimeError(f"the sandbox could not start: {e}") from e
        if result.timed_out:
            return f"error: timed out after {self.cfg.tool_timeout_s:g} s"
        if not result.ok:
            lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
            return "error: " + (lines[-1] if lines else result.killed_reason or f"exit {result.returncode}")
        return "output: " + (_clip(result.stdout) or "(nothing printed)")


ENVIRONMENTS: dict[str, Callable[[EnvConfig], Environment]] = {
    "python": PythonEnvironment,
    "calculator": CalculatorEnvironment,
}


def make_environment(name: str, cfg: EnvConfig) -> Environment:
    """A fresh environment of the named kind, e.g. make_environment("calculator", EnvConfig())."""
    if name not in ENVIRONMENTS:
        raise ValueError(f"unknown environment '{name}' (choose from {sorted(ENVIRONMENTS)})"
                         f"{did_you_mean(name, ENVIRONMENTS)}")
    return ENVIRONMENTS[name](cfg)


# ============================================================================ a warm start for the tools
EQUATION = re.compile(r"(\d[\d ×x*÷/+\-.]*?)\s*=\s*(-?\d[\d.]*)")


def calculator_sft_record(prompt: RLPrompt) -> dict[str, Any] | None:
    """An SFT record in which the model uses the calculator before answering `prompt` (a demo
    task): the last equation of the task's reference solution ("29 × 12 = 348") is asked of
    the tool first, and the reference follows the tool's reply. The prompt turn and the reply are
    the calculator environment's own (`reset`, `step`), so the record is an episode the
    environment would produce. None when the reference has no equation the tool confirms.

    {"prompt": [user, assistant "<calc>29 × 12</calc>", user "29 × 12 = 348"], "completion": reference}
    """
    task = _task(prompt)
    equations = [(lhs.strip(), rhs) for lhs, rhs in EQUATION.findall(task.reference)]
    if not equations:
        return None
    lhs, rhs = equations[-1]
    env = CalculatorEnvironment(EnvConfig(max_turns=2))
    opening = env.reset(prompt)
    call = f"<calc>{lhs}</calc>"
    reply = env.step(call)
    if reply.observation is None or calculate(lhs) != rhs.rstrip("."):
        return None
    turns = [*opening, Message("assistant", call), Message("user", reply.observation)]
    return {"prompt": [{"role": m.role, "content": m.content} for m in turns], "completion": task.reference,
            "task_id": task.id}
