"""The RL sections of a run config (`rl:`, its `rewards:` terms), re-exported by jaxllm.config.
Like config.py, this imports nothing from jaxllm but errors.py."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from jaxllm.errors import ConfigError


@dataclass
class RewardConfig:
    """One reward term. kind=function: `fn` is "module:function" taking (prompt, completion,
    reference) -> float; kind=model: `path` is a reward-model checkpoint (RM stage output)."""
    kind: Literal["function", "model"] = "function"
    fn: str = ""
    path: str = ""
    weight: float = 1.0

    def validate(self) -> None:
        if self.kind == "function":
            if ":" not in self.fn:
                raise ConfigError(f"rl.rewards: fn={self.fn!r} must be 'module.path:function', "
                                  f"e.g. 'jaxllm.rl.rewards:exact_match'")
        if self.kind == "model" and not self.path:
            raise ConfigError("rl.rewards: kind=model needs path=REWARD_MODEL_RUN_DIR")


@dataclass
class RLConfig:
    """PPO / GRPO. A rollout is train.batch_size * minibatches sequences (prompts * group_size);
    each rollout is used for epochs * minibatches optimizer steps (train.steps counts those)."""
    group_size: int = 1  # G samples per prompt (GRPO: > 1)
    minibatches: int = 1
    epochs: int = 1
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    rewards: list[RewardConfig] = field(default_factory=list)
    length_penalty: float = 0.0  # subtracted per generated token
    no_eos_penalty: float = 0.0  # subtracted when a completion never reached EOS
    kl_coef: float = 0.05  # PPO: per-token KL penalty in the reward; GRPO: beta of the KL loss term
    kl_estimator: str = "k1"  # a key of jaxllm.rl.algorithms.KL_ESTIMATORS
    loss_type: str = "grpo"  # policy loss, a key of jaxllm.rl.algorithms.POLICY_LOSSES
    advantage: str = ""  # a key of jaxllm.rl.algorithms.ADVANTAGES; "" = the objective's (grpo: group, ppo: gae)
    kl_clamp: float = 10.0  # |per-token KL| is clamped to this (0 = off)
    target_kl: float = 0.0  # PPO: > 0 turns on the adaptive KL controller (Ziegler et al.)
    kl_horizon: int = 10000
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    clip_low: float = 0.2
    clip_high: float = 0.2
    value_clip: float = 0.2
    vf_coef: float = 0.1
    critic_warmup: int = 0  # PPO: the first N rollouts fit only the critic (policy advantages zeroed)
    critic_init: str = ""  # PPO critic's checkpoint (e.g. the RM run); "" = checkpoint.init_from
    advantage_norm: Literal["std", "mean"] = "std"  # GRPO: "mean" = Dr. GRPO (no std division)
    loss_agg: Literal["token", "sequence"] = "token"
    eval_prompts: int = 64  # held-out prompts scored at each eval
    eval_temperature: float = 0.0
    eval_sampled: bool = True  # also score them at rl.temperature (eval_sampled_* metrics) when it differs
    # DAPO's rollout pieces; "auto" / -1 = what rl.loss_type's entry asks for (dapo: on, max_new_tokens // 4)
    dynamic_sampling: Literal["auto", "on", "off"] = "auto"  # refill all-equal groups with new prompts
    max_sampling_rounds: int = 4  # dynamic sampling: sampling rounds per rollout at most
    overlong_buffer: int = -1  # soft length penalty over the last N tokens before max_new_tokens; 0 = off
    overlong_penalty: float = 1.0  # that penalty at max_new_tokens (and for truncated completions)
    tis_cap: float = 0.0  # truncated importance sampling: min(pi_trainer / pi_sampler, cap) per token; 0 = off
    reward_norm: Literal["none", "whiten", "clip"] = "none"  # each reward term, over the rollout, before its weight
    reward_clip: float = 5.0  # reward_norm=clip: each term clipped to +-reward_clip
    # The sampler's own layout: mesh axis sizes as in `mesh:` (data/fsdp/tensor, dcn_*) over the same
    # devices and rules table, e.g. {data: -1, fsdp: 1} = weights replicated, batch split; {} = the
    # training mesh. The policy is resharded once per rollout, not gathered at every decode step.
    sampler_mesh: dict[str, int] = field(default_factory=dict)
    off_policy_steps: Literal[0, 1] = 0  # 1: rollout k+1 samples with the pre-update weights while rollout k trains

    def validate(self) -> None:
        for n in ("group_size", "minibatches", "epochs", "max_new_tokens"):
            if getattr(self, n) <= 0:
                raise ConfigError(f"rl.{n}={getattr(self, n)} must be > 0")
        for r in self.rewards:
            r.validate()
        if not 0.0 < self.top_p <= 1.0 or self.top_k < 0 or self.temperature < 0:
            raise ConfigError("rl: need 0 < top_p <= 1, top_k >= 0, temperature >= 0")
        if self.kl_coef < 0 or self.target_kl < 0:
            raise ConfigError("rl.kl_coef and rl.target_kl must be >= 0")
        if self.tis_cap < 0 or (0 < self.tis_cap < 1):
            raise ConfigError(f"rl.tis_cap={self.tis_cap}: 0 (off) or a cap >= 1 on the importance weight (e.g. 2)")
        if self.max_sampling_rounds < 1 or self.overlong_buffer > self.max_new_tokens or self.reward_clip <= 0:
            raise ConfigError("rl: need max_sampling_rounds >= 1, overlong_buffer <= max_new_tokens, reward_clip > 0")
