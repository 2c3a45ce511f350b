"""Shared by the recipe tests."""

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread for a whole test module, module-scoped fixtures included: the wiring
    tests compare against hand values at tight tolerances, and the recipes' engines may change
    the thread count."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# The policy-gradient tests' reward: three 0/1 format checks with different weights, so random
# byte responses get varied scores.
REWARD = "format:[a-z]:1.0,format:[0-9]:0.5,format:[A-Z]:0.25"


def pg_config(cls, tmp_path, **kw):
    """A one-step policy-gradient config on the tiny model (`cls`: GRPOConfig, RLOOConfig, …)."""
    base = dict(model="tiny", tasks="demo", demo_per_family=2, output_dir=str(tmp_path / "run"), max_steps=1,
                prompts_per_step=2, samples_per_prompt=4, max_new_tokens=8, batch_size=16, precision="fp32",
                progress=False, seed=5, lr=1e-2, reward=REWARD)
    base.update(kw)
    return cls(**base)
