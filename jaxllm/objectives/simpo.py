"""SimPO (Meng et al. 2024): reference-free preference optimisation on (chosen, rejected) pairs.

    loss = -log sigmoid(beta/|y_w| * log pi(y_w) - beta/|y_l| * log pi(y_l) - gamma)

The implicit reward of a completion is its length-normalised log-probability times beta, so no
reference model is held or run; gamma is a target margin between chosen and rejected rewards.
Config: `objective.name=simpo objective.options.beta=2.0 objective.options.gamma=1.0` on
preference data (completion 0 is the chosen one).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxllm.errors import ConfigError
from jaxllm.objectives.preference import per_completion, preference_batch_shapes, rows_of
from jaxllm.core.xent import lm_token_logps
from jaxllm.train.objective import LossContext, LossOut, Objective


@dataclasses.dataclass
class SimPOOptions:
    beta: float = 2.0  # scale of the length-normalised log-prob reward
    gamma: float = 1.0  # target reward margin

    def validate(self) -> None:
        if self.beta <= 0 or self.gamma < 0:
            raise ConfigError(f"objective.options: simpo needs beta > 0 and gamma >= 0 (got beta={self.beta}, "
                              f"gamma={self.gamma})")


def simpo_loss(chosen_logps, rejected_logps, chosen_len, rejected_len, beta: float = 2.0, gamma: float = 1.0):
    """Summed log-probs and token counts of chosen/rejected [B] -> (per-pair losses, chosen rewards
    beta*logp/len, rejected rewards)."""
    r_c = beta * jnp.asarray(chosen_logps, jnp.float32) / jnp.maximum(jnp.asarray(chosen_len, jnp.float32), 1.0)
    r_r = beta * jnp.asarray(rejected_logps, jnp.float32) / jnp.maximum(jnp.asarray(rejected_len, jnp.float32), 1.0)
    return -jax.nn.log_sigmoid(r_c - r_r - gamma), r_c, r_r


def simpo_objective(model, batch, ctx: LossContext) -> LossOut:
    rows = rows_of(batch)
    logps, _ = lm_token_logps(model, rows, 1.0, ctx.cfg.xent_chunk_tokens)  # [rows, T]
    mask = rows["loss_mask"].astype(jnp.float32)
    seq_logps, valid = per_completion(batch, logps * mask)  # [N, 2], [N]
    lengths, _ = per_completion(batch, mask)
    opts = ctx.options
    losses, r_c, r_r = simpo_loss(seq_logps[:, 0], seq_logps[:, 1], lengths[:, 0], lengths[:, 1], opts.beta, opts.gamma)
    n = valid.sum()
    s = lambda x: (x * valid).sum()  # noqa: E731 - sums over real examples only
    return LossOut(s(losses), n, {"reward_accuracy": (s(r_c > r_r), n), "reward_margin": (s(r_c - r_r), n),
                                  "chosen_reward": (s(r_c), n), "rejected_reward": (s(r_r), n)})


SIMPO = Objective("simpo", simpo_objective, ("preference",), options=SimPOOptions,
                  batch_shapes=preference_batch_shapes, sequences_per_example=2,
                  headline=("eval_reward_accuracy", True, "implicit reward accuracy"),
                  curves=("loss", "reward_accuracy"))
