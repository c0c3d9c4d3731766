"""Language-modelling objectives: causal_lm (pretraining), masked_lm (BERT-style) and sft.

Each loss returns a sum and its count (jaxllm.train.objective.LossOut), through the fused chunked
LM head + cross-entropy (jaxllm.core.xent) unless objective.xent_chunk_tokens=0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxllm.config import RunConfig
from jaxllm.core.sampler import sample_ids
from jaxllm.core.xent import lm_token_loss
from jaxllm.data.chat import prompt_ids
from jaxllm.data.pipeline import heldout_records
from jaxllm.data.tasks import exact_match
from jaxllm.errors import ConfigError
from jaxllm.train.objective import LossContext, LossOut, Objective


def token_batch_shapes(cfg: RunConfig) -> dict:
    """name -> (shape, dtype) of one global step's batch of token rows, micro-batch index first."""
    A, T = cfg.train.grad_accum, cfg.train.seq_len
    lead = (A, cfg.train.batch_size // A)
    return {k: ((*lead, T), jnp.int32) for k in ("inputs", "targets", "segment_ids", "positions", "loss_mask")}


def causal_lm_loss(model, batch, ctx: LossContext) -> LossOut:
    """Next-token cross-entropy on `loss_mask` positions (+ optional z-loss on log Z)."""
    mask = batch["loss_mask"]
    s = lm_token_loss(model, batch["inputs"], batch["positions"], batch["segment_ids"], True, batch["targets"],
                      mask, ctx.cfg.z_loss, ctx.cfg.xent_chunk_tokens)
    n = mask.astype(jnp.float32).sum()
    return LossOut(s["loss"], n, {"nll": (s["nll"], n), "accuracy": (s["correct"], n), "z_loss": (s["z"], n)})


def mask_tokens(rng, tokens, valid, mask_prob: float, mask_id: int, vocab_size: int):
    """BERT corruption: select `mask_prob` of valid tokens; of those 80% -> mask_id,
    10% -> a random token, 10% unchanged. Returns (corrupted tokens, selected mask)."""
    k_sel, k_kind, k_rand = jax.random.split(rng, 3)
    selected = (jax.random.uniform(k_sel, tokens.shape) < mask_prob) & valid
    kind = jax.random.uniform(k_kind, tokens.shape)
    random_tokens = jax.random.randint(k_rand, tokens.shape, 0, vocab_size, dtype=tokens.dtype)
    corrupted = jnp.where(selected & (kind < 0.8), mask_id, tokens)
    corrupted = jnp.where(selected & (kind >= 0.8) & (kind < 0.9), random_tokens, corrupted)
    return corrupted, selected


def masked_lm_loss(model, batch, ctx: LossContext) -> LossOut:
    """BERT-style masked-token prediction with bidirectional attention (within each segment)."""
    tokens = batch["inputs"]
    valid = batch["segment_ids"] != 0
    corrupted, selected = mask_tokens(ctx.rng, tokens, valid, ctx.cfg.mask_prob,
                                      ctx.extras["mask_id"], model.cfg.vocab_size)
    s = lm_token_loss(model, corrupted, batch["positions"], batch["segment_ids"], False, tokens, selected,
                      0.0, ctx.cfg.xent_chunk_tokens)
    n = selected.astype(jnp.float32).sum()
    return LossOut(s["loss"], n, {"nll": (s["nll"], n), "accuracy": (s["correct"], n)})  # metrics carry no gradient


def _needs_mask_token(cfg: RunConfig, stage) -> None:
    tok = stage.tokenizer
    if tok.mask_id is None:
        raise ConfigError(f"objective masked_lm needs a mask token, and tokenizer {tok.path} has none: use a "
                          f"`jaxllm tokenizer train` model or one whose tokenizer_config.json sets mask_token")


# ---- SFT: next-token loss on response tokens (the chat pipeline's loss_mask), exact-match eval ----
def generation_eval(graphdef, state, tok, records: list, max_new: int) -> dict:
    """Greedy completions for held-out prompts; exact match against the reference answers."""
    if not records:
        return {}
    model = nnx.merge(graphdef, state.params, state.rest)
    prompts = [prompt_ids(tok, r["prompt"]) for r in records]
    outs = sample_ids(model, prompts, max_new, stop_ids=tok.chat.stop_ids, pad_id=tok.pad_id)
    texts = [tok.decode(o) for o in outs]
    return {"eval_exact_match": float(np.mean([exact_match(t, r["answer"]) for t, r in zip(texts, records)]))}


def _sft_setup(cfg: RunConfig, stage) -> None:
    """Held-out records with a prompt and a checkable answer, scored by greedy exact match."""
    if not cfg.objective.eval_generate:
        return
    records = heldout_records(cfg.data, 4 * cfg.objective.eval_generate)
    records = [r for r in records if isinstance(r, dict) and "prompt" in r and "answer" in r]
    stage.eval_records = records[: cfg.objective.eval_generate]
    stage.extra_eval = lambda graphdef, state: generation_eval(graphdef, state, stage.tokenizer, stage.eval_records,
                                                               cfg.objective.max_new_tokens)


CAUSAL_LM = Objective("causal_lm", causal_lm_loss, ("text", "chat"), batch_shapes=token_batch_shapes,
                      report_samples="text")
MASKED_LM = Objective("masked_lm", masked_lm_loss, ("text",), batch_shapes=token_batch_shapes, setup=_needs_mask_token,
                      headline=("eval_accuracy", True, "masked-token accuracy"), report_samples="")
SFT = Objective("sft", causal_lm_loss, ("chat",), batch_shapes=token_batch_shapes, setup=_sft_setup,
                headline=("eval_exact_match", True, "exact match of greedy answers"))
OBJECTIVES = (CAUSAL_LM, MASKED_LM, SFT)
