"""Chat formats: messages -> token ids + a loss mask that covers assistant turns.

Every tokenizer has one format, `tok.chat` (chosen by `chat_format`), with one interface:
`render(messages, add_generation_prompt, marked) -> (ids, mask)` and `stop_ids`, the ids that end an
assistant turn (generation stops there). Two implementations:

* `JaxllmChat` (jaxllm's own tokenizers): BOS, then per message `<|role|> content <|end|>`. The mask
  is 1 on each assistant turn's content and its closing `<|end|>` (so the model learns to stop);
  generation prompts end with `<|assistant|>` and stop at `<|end|>` or EOS. The role tokens are
  reserved in every jaxllm tokenizer (tokenizer.SPECIAL_TOKENS).
* `TemplateChat` (a Hugging Face tokenizer whose tokenizer_config.json / chat_template.jinja has a
  `chat_template`): the model's own Jinja template, rendered like transformers'
  `apply_chat_template` (sandboxed Jinja, trim_blocks/lstrip_blocks, the special-token strings as
  variables, `raise_exception`, `tojson`, `strftime_now`; `{% generation %}` blocks render as is).
  The assistant mask is found by rendering prefixes: for assistant message i, the text of
  messages[:i] with the generation prompt and the text of messages[:i+1] bound that turn's
  characters (its content and whatever the template closes it with, e.g. `<|eot_id|>`). The whole
  conversation is tokenized once and a token is marked when its first character lies in such a
  span. Limits: the template must be prefix-stable (rendering fewer messages gives a prefix of the
  full text; templates that rewrite earlier turns, e.g. drop past reasoning, raise DataError); a
  token merged across a span boundary counts with the side it starts on; special-token text inside
  message content is encoded as that special token (transformers can escape it, jaxllm does not).
  stop_ids: the tokenizer's eos ids plus the token the template puts right after an assistant
  message's content, when that is a special (added) token.

Module functions take a tokenizer: render, prompt_ids, pair (prompt + one completion), stop_ids.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Optional, Sequence

import numpy as np

from jaxllm.errors import DataError, require

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


def _prompt_messages(prompt) -> list[dict]:
    return list(prompt) if isinstance(prompt, list) else [{"role": "user", "content": prompt}]


# ---- the interface, for any tokenizer --------------------------------------------------------
def render(tok, messages: Sequence[dict], add_generation_prompt: bool = False):
    """-> (ids [N] int32, loss_mask [N] int32). mask[i] = 1 iff ids[i] is assistant output."""
    return tok.chat.render(messages, add_generation_prompt)


def prompt_ids(tok, prompt) -> np.ndarray:
    """Prompt (text or messages) -> ids ending with the assistant turn's opening."""
    return tok.chat.render(_prompt_messages(prompt), add_generation_prompt=True)[0]


def pair(tok, prompt, completion: str):
    """Prompt + one assistant completion -> (ids, mask); the mask covers the completion only (not
    assistant turns inside a multi-turn prompt). Used for preference pairs and reward scoring."""
    msgs = _prompt_messages(prompt) + [{"role": "assistant", "content": completion}]
    return tok.chat.render(msgs, marked={len(msgs) - 1})


def stop_ids(tok) -> tuple[int, ...]:
    """Ids that end an assistant turn in `tok`'s chat format."""
    return tok.chat.stop_ids


def chat_format(tok):
    """The tokenizer's chat template if it has one, else jaxllm's format if it has jaxllm's tokens."""
    if tok.chat_template:
        return TemplateChat(tok)
    if all(t in tok.specials for t in ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")):
        return JaxllmChat(tok)
    raise DataError(f"tokenizer {tok.path} has no chat format: neither jaxllm's chat tokens (train one "
                    f"with `jaxllm tokenizer train`) nor a chat_template (use a Hugging Face tokenizer.json "
                    f"with a tokenizer_config.json that has one)")


def _is_marked(m: dict, i: int, marked: Optional[set]) -> bool:
    return m["role"] == "assistant" and (marked is None or i in marked)


# ---- jaxllm's own format ----------------------------------------------------------------------
class JaxllmChat:
    def __init__(self, tok):
        self.tok = tok
        self.role_ids = {r: tok.specials[f"<|{r}|>"] for r in ROLES}
        self.end = tok.specials["<|end|>"]
        self.stop_ids = tuple(dict.fromkeys([self.end, *tok.eos_ids]))

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = False,
               marked: Optional[set] = None):
        """marked: indices of the assistant messages the mask covers (None = every one)."""
        bos = [] if self.tok.bos_id is None else [self.tok.bos_id]
        ids, mask = list(bos), [0] * len(bos)
        for i, m in enumerate(messages):
            content = self.tok.encode(m["content"])
            out = int(_is_marked(m, i, marked))
            ids += [self.role_ids[m["role"]]] + content + [self.end]
            mask += [0] + [out] * len(content) + [out]
        if add_generation_prompt:
            ids.append(self.role_ids["assistant"])
            mask.append(0)
        return np.asarray(ids, np.int32), np.asarray(mask, np.int32)


# ---- a Hugging Face chat template --------------------------------------------------------------
def compile_template(template: str, where: str):
    """A chat template -> a jinja2 Template in the environment transformers renders them in."""
    jinja2 = require("jinja2")
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask marker) renders its body."""
        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # like transformers: no HTML escaping (jinja's own tojson escapes <, >, &, ')
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise DataError(f"chat template of {where} does not parse: {e} (line {e.lineno})") from None


class TemplateChat:
    PROBE = "jaxllm probe answer"  # assistant content used to find the template's end-of-turn token

    def __init__(self, tok):
        self.tok = tok
        self.template = compile_template(tok.chat_template, tok.path)
        self.stop_ids = tuple(dict.fromkeys([*self._turn_end(), *tok.eos_ids]))

    def text(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        import jinja2
        try:
            return self.template.render(messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt,
                                        tools=None, documents=None, **self.tok.special_tokens)
        except jinja2.exceptions.TemplateError as e:  # raise_exception() in the template, or a bad access
            raise DataError(f"chat template of {self.tok.path}: {e}") from None

    def spans(self, messages: Sequence[dict], full: str, marked: Optional[set]) -> list[tuple[int, int]]:
        """Character spans [start, end) of the marked assistant turns in `full`."""
        out = []
        for i, m in enumerate(messages):
            if not _is_marked(m, i, marked):
                continue
            start = self.text(messages[:i], add_generation_prompt=True)
            end = self.text(messages[:i + 1])
            if not (end.startswith(start) and full.startswith(end)):
                raise DataError(f"chat template of {self.tok.path} is not prefix-stable (the first {i} messages do "
                                f"not render as a prefix of the conversation), so assistant turn {i} cannot be "
                                f"located for the loss mask")
            out.append((len(start), len(end)))
        return out

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = False,
               marked: Optional[set] = None):
        full = self.text(messages, add_generation_prompt)
        spans = self.spans(messages, full, marked)
        ids, starts = self.tok.encode_with_offsets(full)
        mask = [int(any(a <= s < b for a, b in spans)) for s in starts]
        return np.asarray(ids, np.int32), np.asarray(mask, np.int32)

    def _turn_end(self) -> tuple[int, ...]:
        """The special token the template writes right after an assistant message's content."""
        msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": self.PROBE}]
        full = self.text(msgs)
        after = full[full.rfind(self.PROBE) + len(self.PROBE):].strip() if self.PROBE in full else ""
        first = self.tok.encode(after)[:1] if after else []
        return tuple(i for i in first if i in self.tok.added_ids)
