"""How often the judge agrees with people: agreement, agreement on decided pairs, Cohen's κ and
the confusion table, on the same pairs in the same (a, b) order."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rlhfkit.data.errors import DataError
from rlhfkit.data.schemas import PreferencePair
from rlhfkit.feedback.agreement import cohen_kappa_of_labels
from rlhfkit.judge.pairwise import JudgeBatch, PairwiseJudge, Verdict, Winner

_CATEGORIES: tuple[Winner, ...] = ("a", "b", "tie")


def _as_winner(label: Any, field_name: str) -> Winner:
    if isinstance(label, Verdict):
        return label.winner
    if isinstance(label, str) and label.lower() in _CATEGORIES:
        return label.lower()  # type: ignore[return-value]
    if isinstance(label, (int, float)) and not isinstance(label, bool) and 0 <= label <= 1:
        return "a" if label > 0.5 else "b" if label < 0.5 else "tie"
    raise DataError(f"expected 'a', 'b', 'tie', a Verdict or P(a wins) in [0, 1], got {label!r}",
                    field=field_name)


def judge_agreement(judge_verdicts: Sequence[Any], human_labels: Sequence[Any]) -> dict[str, Any]:
    """How often the judge agrees with people, on the same pairs in the same (a, b) order.

    Labels are "a" / "b" / "tie", `Verdict`s, or P(a wins) (>0.5 → a, <0.5 → b, 0.5 → tie).
    Returns
      * `agreement`: fraction of pairs with the same label, ties included;
      * `agreement_decided`: the same over pairs neither rater called a tie (NaN if none);
      * `cohen_kappa`: κ = (p_o − p_e) / (1 − p_e) over the three categories, where p_o is
        `agreement` and p_e = Σ_k p_judge(k)·p_human(k) is the agreement expected by chance
        from each rater's label frequencies (NaN when p_e = 1: both raters used one
        category only, and chance explains everything);
      * `confusion[judge][human]`: counts; `n`.
    """
    if len(judge_verdicts) != len(human_labels):
        raise DataError(f"{len(judge_verdicts)} judge verdicts but {len(human_labels)} human "
                        f"labels; they must describe the same pairs", field="human_labels")
    if not judge_verdicts:
        raise DataError("no pairs to compare", field="judge_verdicts")
    judged = [_as_winner(v, f"judge_verdicts[{i}]") for i, v in enumerate(judge_verdicts)]
    human = [_as_winner(v, f"human_labels[{i}]") for i, v in enumerate(human_labels)]
    n = len(judged)
    confusion = {j: {h: 0 for h in _CATEGORIES} for j in _CATEGORIES}
    for j, h in zip(judged, human):
        confusion[j][h] += 1
    observed = sum(confusion[k][k] for k in _CATEGORIES) / n
    decided = [(j, h) for j, h in zip(judged, human) if j != "tie" and h != "tie"]
    decided_agreement = (sum(j == h for j, h in decided) / len(decided) if decided
                         else float("nan"))
    return {"n": n, "agreement": observed, "agreement_decided": decided_agreement,
            "cohen_kappa": cohen_kappa_of_labels(judged, human), "confusion": confusion}


def judge_vs_human(judge: PairwiseJudge, pairs: Sequence[PreferencePair]) -> tuple[dict[str, Any], JudgeBatch]:
    """(judge_agreement report, JudgeBatch) of `judge` on human `PreferencePair`s: A = chosen,
    so the human label P(chosen ≻ rejected) is directly P(A wins)."""
    batch = judge.judge_many([(p.prompt, p.chosen, p.rejected) for p in pairs])
    return judge_agreement(batch.verdicts, [p.label for p in pairs]), batch
