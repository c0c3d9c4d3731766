"""Generated tasks with answers checkable by code: the embedded post-training data.

Each record is {"task", "prompt", "answer", "rejected"}: `answer` is the right completion,
`rejected` a plausible wrong one (for preference data). Train and test splits are disjoint by
construction: an example goes to "test" iff a hash of its prompt says so, so held-out metrics
(exact match, reward) are measured on prompts never seen in training.

`demo_noise` models demonstrations pooled from sources with another answer convention: that
fraction of the training records gets a `response` (what SFT imitates, see `chat`) written as
`answer: <answer>`, which the exact-match verifier does not accept. `answer`, `rejected` and the
test split are unchanged, so preference data, verifiers and held-out exact match judge against the
bare answer. SFT learns both conventions; a verifier-driven RL stage can pick the right one.
"""

from __future__ import annotations

import hashlib
import random

TASKS = ("add", "reverse", "sort")
ANSWER_PREFIX = "answer: "  # the other convention of noisy demonstrations (demo_noise)


def _is_test(prompt: str) -> bool:
    return hashlib.blake2b(prompt.encode(), digest_size=4).digest()[0] < 26  # ~10%


def _add(rng: random.Random) -> dict:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    wrong = a + b + rng.choice([-10, -1, 1, 10])
    return {"prompt": f"{a}+{b}=", "answer": str(a + b), "rejected": str(max(wrong, 0) if wrong != a + b else a + b + 1)}


def _reverse(rng: random.Random) -> dict:
    word = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(3, 6)))
    answer = word[::-1]
    rejected = word if word != answer else word + "a"
    return {"prompt": f"reverse {word}", "answer": answer, "rejected": rejected}


def _sort(rng: random.Random) -> dict:
    digits = [rng.randint(0, 9) for _ in range(rng.randint(3, 6))]
    answer = " ".join(map(str, sorted(digits)))
    shuffled = digits[:]
    if sorted(shuffled) == shuffled:
        shuffled = shuffled[::-1] if len(set(shuffled)) > 1 else shuffled + [0]
    return {"prompt": "sort " + " ".join(map(str, digits)), "answer": answer, "rejected": " ".join(map(str, shuffled))}


_MAKERS = {"add": _add, "reverse": _reverse, "sort": _sort}


def generate(name: str, split: str = "train", size: int = 0, seed: int = 1234, demo_noise: float = 0.0) -> list[dict]:
    """`name` is a task or "mix" (all tasks). Deterministic in (name, split, size, seed, demo_noise);
    `demo_noise` changes only the `response` of train records."""
    from jaxllm.errors import DataError
    names = TASKS if name == "mix" else (name,)
    for n in names:
        if n not in _MAKERS:
            raise DataError(f"generated task {n!r} unknown; choose one of {', '.join(TASKS)} or mix")
    if split not in ("train", "test"):
        raise DataError(f"generated data split {split!r}: use train or test")
    size = size or (4000 if split == "train" else 300)
    rng = random.Random(f"{name}:{seed}")
    teacher = random.Random(f"{name}:{seed}:teacher")  # own stream: the examples do not depend on demo_noise
    out, seen = [], set()
    attempts = 0
    while len(out) < size and attempts < size * 50:
        attempts += 1
        task = names[len(out) % len(names)]
        ex = _MAKERS[task](rng)
        if ex["prompt"] in seen or _is_test(ex["prompt"]) != (split == "test"):
            continue
        seen.add(ex["prompt"])
        if split == "train" and teacher.random() < demo_noise:
            ex["response"] = ANSWER_PREFIX + ex["answer"]
        out.append({"task": task, **ex})
    return out


def exact_match(completion: str, answer: str) -> float:
    return float(completion.strip() == answer.strip())
