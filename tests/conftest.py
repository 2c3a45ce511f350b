"""Test-wide settings.

Unit tests use tiny models, where several threads per process only add synchronization
cost; on a 2-core machine running subprocess tests (DDP) beside the main process,
oversubscribed OpenMP threads make steps tens of times slower. One thread each.
"""

import logging
import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from rlhfkit.ops.logprobs import IGNORE_INDEX  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture
def train_reward_model_on_export(tmp_path):
    """train(path, steps=3, output_dir=None) → `run_reward`'s dict: the tiny random reward model
    trained a few steps on an exported pairs file, every pair in training (no held-out split)."""
    from rlhfkit.recipes.reward import RewardConfig, run_reward

    def train(path, *, steps: int = 3, output_dir=None) -> dict:
        cfg = RewardConfig(model="tiny", train_data=str(path), output_dir=str(output_dir or tmp_path / "rm"),
                           max_steps=steps, batch_size=8, test_fraction=0.0, resume=False, progress=False,
                           lr=1e-3, precision="fp32")
        return run_reward(cfg)

    return train


def _token_logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits)[labels] from full-vocabulary logits, 0 where labels = IGNORE_INDEX.

    logits: (B, T, V); labels: (B, T), already shifted. Returns (B, T) fp32."""
    mask = labels != IGNORE_INDEX
    safe = labels.masked_fill(~mask, 0)
    lp = torch.log_softmax(logits.float(), dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return lp * mask


@pytest.fixture(scope="session")
def token_logprobs_from_logits():
    """token_logprobs_from_logits(logits, labels) → (B, T): the plain, unchunked per-token
    log-probs that tests compare the package's chunked `ops.logprobs` paths against."""
    return _token_logprobs_from_logits


LABELING_PASSWORD = "correct horse battery"


def _labeling_accounts(path, accounts: dict[str, str], password: str = LABELING_PASSWORD):
    """Create (or open) the labeling-app database at `path` with these accounts (name → role)."""
    from rlhfkit.feedback.db import open_database
    from rlhfkit.feedback.users import create_user

    database = open_database(str(path))
    with database.write() as session:
        for name, role in accounts.items():
            create_user(session, name, password, role)
        session.commit()
    database.close()
    return path


@pytest.fixture(scope="session")
def labeling_accounts():
    """labeling_accounts(db_path, {"ann1": "annotator", "admin": "admin"}) → db_path, every account
    with the password "correct horse battery"."""
    return _labeling_accounts



@pytest.fixture(autouse=True)
def restore_root_logger():
    """The CLI's callback installs a rich logging handler on the root logger; put it back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
