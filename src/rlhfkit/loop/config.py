"""`LoopConfig`: one YAML file describes a whole feedback loop (flags override any field).

    rlhf loop run --config loop.yaml --rounds 3

Each round: sample k responses per prompt from the current policy → pick the pairs to
compare → collect feedback on them (rules, a reward model, an LLM judge, humans in the
labeling app, or several in order) → train → evaluate against the previous round and
round 0 → register the round in the lineage registry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

from rlhfkit.config import Config, ConfigError, check, param
from rlhfkit.losses.preference_registry import PREFERENCE_LOSSES
from rlhfkit.train.engine import PRECISIONS

RL_TRAINERS = ("rm+grpo", "rm+rloo", "rm+remax", "rm+reinforce", "rm+ppo")
TRAINERS = (*PREFERENCE_LOSSES, "expert_iteration", *RL_TRAINERS)
PAIR_SELECTIONS = ("random", "decided_first", "uncertain")
SOURCES = ("rules", "rm", "judge", "human")
# the fields a round may set for itself in `per_round` (everything else is the loop's)
ROUND_FIELDS = ("prompts", "prompts_per_round", "samples_per_prompt", "pairs_per_prompt", "pair_selection",
                "uncertainty_model", "temperature", "feedback", "label_noise", "overlap", "trainer", "steps",
                "lr", "beta", "nll_weight")


def source_kind(spec: str) -> str:
    """'rules' | 'rm' | 'judge' | 'human' of a feedback spec ('rm:PATH', 'judge:MODEL', …)."""
    return spec.split(":", 1)[0]


@dataclass(frozen=True)
class LoopConfig(Config):
    kind = "loop"

    output_dir: str = param("runs/loop", "run folder: registry.sqlite, config.yaml, rounds/rN/…, report.html",
                            old_names=("out",))
    policy: str = param("embedded", "round-0 policy: 'embedded', a Hugging Face id, a local folder, or 'tiny'")
    rounds: int = param(2, "rounds of sample → feedback → train → evaluate after round 0")
    # prompts and evaluation
    prompts: str = param("demo", "training prompts: 'demo' (the checkable demo tasks) or a JSONL file with "
                                 "'prompt' and optional 'answer', 'task_id', 'family'")
    demo_per_family: int = param(120, "demo train tasks per family in the prompt pool (with prompts: demo)")
    prompts_per_round: int = param(64, "prompts sampled each round (fresh ones while the pool lasts)")
    eval_tasks: str = param("demo", "held-out evaluation: 'demo' (the demo test split) or a JSONL file of tasks "
                                    "with 'prompt' and 'answer'")
    eval_per_family: int = param(50, "demo test tasks per family (with eval_tasks: demo)")
    kl_prompts: int = param(32, "eval prompts sampled once to estimate KL to round 0 (0 = skip)")
    eval_judge: str = param("", "judge the evaluation prompts that have no checker: each round's greedy answer "
                                "against round 0's and the previous round's, in both orders: judge (the embedded "
                                "model), judge:local:PATH or judge:URL (with judge_model); empty = checkable "
                                "prompts only")
    # candidates
    samples_per_prompt: int = param(4, "k: responses sampled per prompt")
    pairs_per_prompt: int = param(4, "pairs shown per prompt (of the k(k−1)/2)")
    pair_selection: str = param("random", "which pairs to show: random; decided_first (pairs the rules can "
                                          "decide first, for rules feedback); uncertain (pairs a reward-model "
                                          "ensemble is least sure about; needs uncertainty_model)",
                                choices=PAIR_SELECTIONS)
    uncertainty_model: str = param("", "reward model (ensemble) used by pair_selection: uncertain")
    temperature: float = param(1.0, "sampling temperature")
    max_new_tokens: int = param(40, "longest response in tokens")
    gen_batch_size: int = param(128, "sequences decoded together (sampling and evaluation); on a 2-core CPU "
                                     "128 decodes 400 prompts 18% faster than 32")
    # feedback
    feedback: tuple[str, ...] = param(("rules",), "feedback sources, tried in order for each pair until one "
                                                  "decides it: rules (exact checkers), rm:PATH (a reward model), "
                                                  "judge, judge:local:PATH or judge:URL (an LLM judge in both "
                                                  "orders; judge alone = the embedded model), human (the "
                                                  "labeling app)")
    label_noise: float = param(0.0, "rules: simulated annotator mis-click rate in [0, 0.5)")
    label_db: str = param("", "human: labeling-app database (default: <output_dir>/labels.db)")
    label_project: str = param("", "human: labeling-app project (default: the run folder's name)")
    overlap: int = param(1, "human: votes needed per item (annotators per item)")
    judge_model: str = param("", "judge:http(s)://…: the model name the endpoint serves")
    judge_max_new_tokens: int = param(48, "judge: tokens a generating judge may write")
    # training
    trainer: str = param("dpo", "dpo-family loss name, expert_iteration (SFT on the preferred responses), or "
                                f"rm+ALGO (reward model on the labels, then {', '.join(RL_TRAINERS)})",
                         choices=TRAINERS)
    init: str = param("previous", "train each round from the previous round's policy on its new labels "
                                  "(previous) or from the round-0 policy on all labels so far (start)",
                      choices=("previous", "start"))
    steps: int = param(16, "optimizer steps per round")
    batch_size: int = param(8, "pairs (or examples) per step")
    lr: float = param(1e-5, "peak learning rate")
    beta: float = param(0.1, "β of the DPO family")
    nll_weight: float = param(1.0, "DPO family: weight of the NLL term on the preferred response (RPO; 0 = off)")
    rl_prompts_per_step: int = param(8, "rm+ALGO: prompts per RL step")
    rl_samples_per_prompt: int = param(4, "rm+ALGO: samples per prompt in an RL step", old_names=("rl_group_size",))
    rl_kl_coef: float = param(0.02, "rm+ALGO: KL coefficient")
    rm_steps: int = param(16, "rm+ALGO: reward-model steps per round")
    seed: int = param(0, "seed of prompt order, sampling, labels and training")
    precision: str = param("auto", "auto, bf16, fp16 or fp32", choices=PRECISIONS)
    per_round: dict[str, Any] = field(default_factory=dict, metadata={"help": (
        "settings of single rounds over the ones above, e.g. {3: {feedback: [human], prompts: hard.jsonl}} "
        f"(YAML; on the command line as inline YAML); a round may set {', '.join(ROUND_FIELDS)}")})

    def __post_init__(self) -> None:
        object.__setattr__(self, "per_round", _normalize_per_round(self.per_round))
        super().__post_init__()

    def for_round(self, round: int) -> LoopConfig:
        """This config with round `round`'s `per_round` settings applied (validated)."""
        changes = self.per_round.get(str(round))
        if not changes:
            return self
        try:
            return self.replace(**changes, per_round={})
        except ConfigError as e:
            raise ConfigError(f"per_round {round}: {e}") from None

    def validate(self) -> None:
        check(self.rounds >= 1, "rounds must be ≥ 1")
        check(self.prompts_per_round >= 1, "prompts_per_round must be ≥ 1")
        check(self.samples_per_prompt >= 2, "samples_per_prompt must be ≥ 2 (pairs need two responses)")
        check(self.pairs_per_prompt >= 1, "pairs_per_prompt must be ≥ 1")
        check(self.steps >= 1, "steps must be ≥ 1")
        check(self.batch_size >= 1, "batch_size must be ≥ 1")
        check(self.lr > 0, "lr must be > 0")
        check(self.temperature > 0, "temperature must be > 0 (sampling)")
        check(0 <= self.label_noise < 0.5, "label_noise must be in [0, 0.5)")
        check(self.overlap >= 1, "overlap must be ≥ 1")
        check(self.kl_prompts >= 0, "kl_prompts must be ≥ 0")
        check(self.gen_batch_size >= 1, "gen_batch_size must be ≥ 1")
        check(bool(self.feedback), "feedback needs at least one source")
        check(not self.eval_judge or source_kind(self.eval_judge) == "judge",
              f"eval_judge {self.eval_judge!r} must be judge, judge:local:PATH or judge:URL")
        for spec in self.feedback:
            check(source_kind(spec) in SOURCES, f"feedback source {spec!r} is not one of {', '.join(SOURCES)}")
            check(source_kind(spec) != "rm" or ":" in spec, "feedback rm needs a path: rm:PATH")
        check("human" not in self.feedback or self.feedback == ("human",),
              "human feedback cannot be mixed with other sources (its round waits for votes)")
        check(self.pair_selection != "uncertain" or bool(self.uncertainty_model),
              "pair_selection uncertain needs uncertainty_model (a reward model, ideally an ensemble)")
        for r in self.per_round:
            self.for_round(int(r))  # each round's settings must make a valid loop too


def _normalize_per_round(value: Any) -> dict[str, Any]:
    """{round: {field: value}} with round numbers as strings (as JSON and the registry keep them) and
    lists for tuples, so a saved config compares equal to the one it was loaded from."""
    if isinstance(value, str):
        try:
            value = yaml.safe_load(value) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"'per_round' is not valid YAML: {e}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"'per_round' must map round numbers to settings, got {value!r}")
    out: dict[str, Any] = {}
    for r, changes in value.items():
        try:
            n = int(r)
        except (TypeError, ValueError):
            raise ConfigError(f"per_round: {r!r} is not a round number") from None
        if n < 1:
            raise ConfigError(f"per_round: round {n} — rounds with settings of their own start at 1")
        if not isinstance(changes, dict):
            raise ConfigError(f"per_round {n}: expected a mapping of settings, got {changes!r}")
        for key in changes:
            if key not in ROUND_FIELDS:
                raise ConfigError(f"per_round {n}: '{key}' cannot change per round; a round may set "
                                  f"{', '.join(ROUND_FIELDS)}")
        out[str(n)] = {k: list(v) if isinstance(v, tuple) else v for k, v in changes.items()}
    return out
