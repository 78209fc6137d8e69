"""GRPO training of small RL models (the `rl` side of RAST pairs).

    from jaxrast.grpo import GRPOConfig, train
    history = train(cfg, policy=model, tokenizer=tok, rows=rows, reward_fns=[my_reward])

Modules: `config` (GRPOConfig), `losses` (pure math), `rewards`, `batch` (prompt stream,
padding), `step` (jitted score/update), `trainer` (the loop), `log` (JSONL, plots).
"""

from jaxrast.grpo.config import GRPOConfig
from jaxrast.grpo.rewards import MathReward, Reward
from jaxrast.grpo.trainer import GRPOTrainer, train

__all__ = ["GRPOConfig", "GRPOTrainer", "MathReward", "Reward", "train"]
