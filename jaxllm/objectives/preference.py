"""Preference objectives: reward_bt (Bradley-Terry reward model) and dpo (DPO / IPO against a
frozen reference), on K completions per prompt ranked best first, in either layout:

- padded: [B, K, T], one completion per row;
- packed (`data.packing=first_fit`): [R, T] rows holding whole examples, completion k of the
  row's e-th example is segment e*K + k + 1. Per-completion sums are segment sums, so the loss
  (a sum over examples and a count) equals the padded one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxllm.config import RunConfig
from jaxllm.core.arrays import last_token_index
from jaxllm.core.sharding import use_mesh_rules
from jaxllm.core.xent import lm_token_logps
from jaxllm.train.objective import LossContext, LossOut, Objective


# ---- public math ------------------------------------------------------------------------------
def sequence_logprobs(logits, tokens, mask):
    """Sum over unmasked positions of log_softmax(logits)[t, tokens[t]].

    logits [B, T, V] are already aligned with the tokens they score; tokens, mask [B, T] -> [B].
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    tok_logp = jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]
    return (tok_logp * mask.astype(jnp.float32)).sum(-1)


def reward_pair_loss(chosen_rewards, rejected_rewards, margin=None):
    """Per-pair Bradley-Terry loss -log sigmoid(r_chosen - r_rejected - margin), no reduction."""
    diff = jnp.asarray(chosen_rewards, jnp.float32) - jnp.asarray(rejected_rewards, jnp.float32)
    if margin is not None:
        diff = diff - margin
    return -jax.nn.log_sigmoid(diff)


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
             beta: float = 0.1, label_smoothing: float = 0.0, loss_type: str = "sigmoid"):
    """-> (per-example losses, chosen implicit rewards beta*(pi_c - ref_c), rejected beta*(pi_r - ref_r)).

    sigmoid: -[(1-eps) log sigmoid(beta*D) + eps log sigmoid(-beta*D)], D = (pi_c - pi_r) - (ref_c - ref_r);
    ipo: (D - 1/(2*beta))^2."""
    pc, pr, rc, rr = (jnp.asarray(x, jnp.float32) for x in (policy_chosen_logps, policy_rejected_logps,
                                                            ref_chosen_logps, ref_rejected_logps))
    delta = (pc - pr) - (rc - rr)
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * jax.nn.log_sigmoid(beta * delta) - label_smoothing * jax.nn.log_sigmoid(-beta * delta)
    elif loss_type == "ipo":
        losses = jnp.square(delta - 1.0 / (2.0 * beta))
    else:
        raise ValueError(f"loss_type {loss_type!r}: use 'sigmoid' or 'ipo'")
    return losses, beta * (pc - rc), beta * (pr - rr)


# ---- helpers shared by preference losses ------------------------------------------------------------
def flat_k(batch):
    """[B, K, T] preference batch -> ([B*K, T] arrays, B, K)."""
    B, K, T = batch["inputs"].shape
    return {k: v.reshape(B * K, *v.shape[2:]) for k, v in batch.items() if v.ndim >= 3}, B, K


def is_packed(batch) -> bool:
    return batch["inputs"].ndim == 2


def rows_of(batch) -> dict:
    """Either layout -> [rows, T] arrays the model runs on."""
    return batch if is_packed(batch) else flat_k(batch)[0]


def _segment_ids_flat(batch, K: int):
    """Packed rows -> (flat segment index [R*T] into R*S slots (R*S = padding), S) with S = (T//K)*K."""
    R, T = batch["segment_ids"].shape
    S = (T // K) * K
    seg = batch["segment_ids"]
    ids = jnp.where(seg > 0, seg - 1 + jnp.arange(R)[:, None] * S, R * S)
    return ids.reshape(-1), R, S


def per_completion(batch, values, K: int = 2):
    """values [rows, T] (zero where not counted) -> (per-completion sums [N, K], valid [N] float).
    Padded: N = B, all valid. Packed: N = R * (T // K) example slots, valid where the slot holds one."""
    if not is_packed(batch):
        B = batch["inputs"].shape[0]
        return values.sum(-1).reshape(B, K), jnp.ones((B,), jnp.float32)
    ids, R, S = _segment_ids_flat(batch, K)
    sums = jax.ops.segment_sum(values.reshape(-1), ids, num_segments=R * S + 1)[:-1]
    counts = jax.ops.segment_sum(jnp.ones_like(ids, jnp.float32), ids, num_segments=R * S + 1)[:-1]
    valid = (counts.reshape(-1, K)[:, 0] > 0).astype(jnp.float32)
    return sums.reshape(-1, K), valid


def per_completion_last(batch, values, K: int = 2):
    """values [rows, T] -> (value at each completion's last real token [N, K], valid [N])."""
    if not is_packed(batch):
        flat, B, _ = flat_k(batch)
        idx = last_token_index(flat["segment_ids"])
        return jnp.take_along_axis(values, idx[:, None], axis=1)[:, 0].reshape(B, K), jnp.ones((B,), jnp.float32)
    ids, R, S = _segment_ids_flat(batch, K)
    T = values.shape[1]
    t = jnp.broadcast_to(jnp.arange(R)[:, None] * T + jnp.arange(T), (R, T)).reshape(-1)
    last = jax.ops.segment_max(t, ids, num_segments=R * S + 1)[:-1]  # empty slots: a very negative int
    present = last >= 0
    picked = jnp.where(present, values.reshape(-1)[jnp.clip(last, 0, R * T - 1)], 0.0)
    valid = present.reshape(-1, K)[:, 0].astype(jnp.float32)
    return picked.reshape(-1, K), valid


def completion_logps(model, batch, K: int = 2, chunk_tokens: int = 512):
    """Either layout -> (summed log-probs of each completion's loss_mask targets [N, K], valid [N])."""
    rows = rows_of(batch)
    logps, _ = lm_token_logps(model, rows, 1.0, chunk_tokens)
    return per_completion(batch, logps * rows["loss_mask"].astype(jnp.float32), K)


def pair_indices(K: int):
    """All K(K-1)/2 pairs (i, j) with i ranked above j (completions are ranked best first)."""
    i, j = np.triu_indices(K, 1)
    return jnp.asarray(i), jnp.asarray(j)


def policy_logps(model, flat, chunk_tokens: int = 512):
    """[N, T] batch -> [N] summed log-probs of the loss_mask targets."""
    logps, _ = lm_token_logps(model, flat, 1.0, chunk_tokens)
    return (logps * flat["loss_mask"].astype(jnp.float32)).sum(-1)


def preference_batch_shapes(cfg: RunConfig) -> dict:
    """One global step's [A, b, K=2, T] preference batch (planning)."""
    A, T = cfg.train.grad_accum, cfg.train.seq_len
    lead = (A, cfg.train.batch_size // A, 2)
    return {k: ((*lead, T), jnp.int32) for k in ("inputs", "targets", "segment_ids", "positions", "loss_mask")}


# ---- reward model -------------------------------------------------------------------------------
def reward_bt_loss(model, batch, ctx: LossContext) -> LossOut:
    """Bradley-Terry over all ranked pairs of each prompt, reward read at the last real token."""
    K = 2 if is_packed(batch) else batch["inputs"].shape[1]
    rows = rows_of(batch)
    scores = model.scores(rows["inputs"], rows["positions"], rows["segment_ids"])  # [rows, T]
    r, valid = per_completion_last(batch, scores, K)  # [N, K], [N]
    i, j = pair_indices(K)
    better, worse = r[:, i], r[:, j]  # [N, P]
    losses = reward_pair_loss(better, worse, ctx.cfg.margin or None) * valid[:, None]
    n = valid.sum() * i.shape[0]
    center = (jnp.square(r.mean(-1)) * valid).sum() * i.shape[0]  # in pair units, like the main term
    loss_sum = losses.sum() + ctx.cfg.center_coef * center
    diff = (better - worse) * valid[:, None]
    return LossOut(loss_sum, n, {"pair_accuracy": (((better > worse) * valid[:, None]).sum(), n),
                                 "margin": (diff.sum(), n), "reward_mean": ((r * valid[:, None]).sum(), valid.sum() * K)})


# ---- DPO ----------------------------------------------------------------------------------------
def dpo_objective(model, batch, ctx: LossContext) -> LossOut:
    """DPO/IPO on (chosen, rejected) = completions 0 and 1 of each example. The reference is the
    frozen SFT model (ctx.frozen["reference"]) or log-probs precomputed into the batch."""
    logps, valid = completion_logps(model, batch, 2, ctx.cfg.xent_chunk_tokens)  # [N, 2], [N]
    if "ref_logps" in batch:
        ref = batch["ref_logps"]
    else:
        ref_model = nnx.merge(nnx.graphdef(model), ctx.frozen["reference"])
        ref = jax.lax.stop_gradient(completion_logps(ref_model, batch, 2, ctx.cfg.xent_chunk_tokens)[0])
    losses, r_c, r_r = dpo_loss(logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1], ctx.cfg.beta,
                                ctx.cfg.label_smoothing, ctx.cfg.loss_type)
    n = valid.sum()
    s = lambda x: (x * valid).sum()  # noqa: E731 - sums over real examples only
    return LossOut(s(losses), n, {
        "reward_accuracy": (s(r_c > r_r), n), "reward_margin": (s(r_c - r_r), n),
        "chosen_reward": (s(r_c), n), "rejected_reward": (s(r_r), n),
        "chosen_logp_drift": (s(logps[:, 0] - ref[:, 0]), n),
        "rejected_logp_drift": (s(logps[:, 1] - ref[:, 1]), n)})


def precompute_reference_logps(graphdef, reference, pipeline, mesh, rules, steps: int, chunk: int = 64,
                               xent_chunk_tokens: int = 512) -> None:
    """DPO speed option: the reference log-probs of the run's `steps` batches computed once and
    carried in them (`ref_logps` [B, K]), so the train step runs no reference forward pass. The
    run's batches are then held in host memory: an option for preference sets of modest size."""
    import grain

    @jax.jit
    def logps(batch):
        with use_mesh_rules(mesh, rules):
            return completion_logps(nnx.merge(graphdef, reference), batch, 2, xent_chunk_tokens)[0]

    def fill(b):
        b = dict(b)
        b["ref_logps"] = np.asarray(logps({k: jnp.asarray(v) for k, v in b.items() if k != "ref_logps"}))
        return b
    it = pipeline.iterator()
    batches = [fill(next(it)) for _ in range(steps)]
    if hasattr(it, "close"):
        it.close()
    pipeline.train_dataset = grain.MapDataset.source(batches).to_iter_dataset()
    pipeline.eval_batches = [fill(b) for b in pipeline.eval_batches]


def _dpo_prepare(trainer, frozen):
    """objective.precompute_ref: the batches carry ref_logps, so the step holds no reference model."""
    cfg = trainer.cfg
    if frozen is None or not cfg.objective.precompute_ref:
        return frozen
    precompute_reference_logps(trainer.graphdef, frozen["reference"], trainer.stage.pipeline, trainer.mesh,
                               trainer.rules, cfg.train.steps, xent_chunk_tokens=cfg.objective.xent_chunk_tokens)
    return None


def _dpo_batch_shapes(cfg: RunConfig) -> dict:
    out = preference_batch_shapes(cfg)
    if cfg.objective.precompute_ref:
        A = cfg.train.grad_accum
        out["ref_logps"] = ((A, cfg.train.batch_size // A, 2), jnp.float32)
    return out


REWARD_BT = Objective("reward_bt", reward_bt_loss, ("preference",), model="scalar", new_params=("score",),
                      batch_shapes=preference_batch_shapes, sequences_per_example=2,
                      headline=("eval_pair_accuracy", True, "held-out pair accuracy"),
                      curves=("loss", "pair_accuracy"), report_samples="")
DPO = Objective("dpo", dpo_objective, ("preference",), needs_reference=True, batch_shapes=_dpo_batch_shapes,
                sequences_per_example=2, reference_flops=True, prepare=_dpo_prepare,
                headline=("eval_reward_accuracy", True, "implicit reward accuracy"),
                curves=("loss", "reward_accuracy"))
OBJECTIVES = (REWARD_BT, DPO)
