"""RL machinery: algorithm registries and math (algorithms.py), reward sources (rewards.py),
rollouts as a batch source (rollout.py). The grpo/ppo objectives live in jaxllm.objectives.rl."""
