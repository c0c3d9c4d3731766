"""Chat template: messages -> token ids + a loss mask that covers every assistant turn.

Layout: BOS, then per message `<|role|> content <|end|>`. The loss mask is 1 on each assistant
turn's content and its closing `<|end|>` (so the model learns to stop), 0 elsewhere. Generation
prompts end with `<|assistant|>` and stop at `<|end|>`. The role tokens are reserved in every
jaxllm tokenizer (tokenizer.SPECIAL_TOKENS); this module is the only place that lays them out.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from jaxllm.data.tokenizer import BOS_ID, Tokenizer
from jaxllm.errors import DataError

ROLES = ("system", "user", "assistant")


def messages_of(record: dict) -> list[dict]:
    """Accepts {"messages": [...]} or {"prompt", "response"|"answer"} records."""
    if "messages" in record:
        msgs = record["messages"]
        if not isinstance(msgs, list) or not all(isinstance(m, dict) and m.get("role") in ROLES
                                                 and isinstance(m.get("content"), str) for m in msgs):
            raise DataError("chat record: messages must be a list of {role: system|user|assistant, content: str}")
        return msgs
    response = record.get("response", record.get("answer"))
    if not isinstance(record.get("prompt"), str) or not isinstance(response, str):
        raise DataError("chat record needs messages, or prompt and response/answer text fields")
    return [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": response}]


def render(tok: Tokenizer, messages: Sequence[dict], add_generation_prompt: bool = False):
    """-> (ids [N] int32, loss_mask [N] int32). mask[i] = 1 iff ids[i] is assistant output."""
    ids, mask = [BOS_ID], [0]
    end = tok.specials["<|end|>"]
    for m in messages:
        role_tok = tok.specials[f"<|{m['role']}|>"]
        content = tok.encode(m["content"])
        is_out = int(m["role"] == "assistant")
        ids += [role_tok] + content + [end]
        mask += [0] + [is_out] * len(content) + [is_out]
    if add_generation_prompt:
        ids.append(tok.specials["<|assistant|>"])
        mask.append(0)
    return np.asarray(ids, np.int32), np.asarray(mask, np.int32)


def prompt_ids(tok: Tokenizer, prompt) -> np.ndarray:
    """Prompt (text or messages) -> ids ending with the assistant marker."""
    msgs = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    return render(tok, msgs, add_generation_prompt=True)[0]


def completion_ids(tok: Tokenizer, text: str) -> np.ndarray:
    return np.asarray(tok.encode(text) + [tok.specials["<|end|>"]], np.int32)
