"""The embedded default corpus: the Python reference documentation that ships with CPython
(`pydoc_data.topics`, ~465 KB of real English + code). Works offline on any machine.

Each topic is cut into documents of whole paragraphs (about `max_chars` long), so there are
enough documents for a document-level held-out split.
"""

from __future__ import annotations

import re


def default_documents(max_chars: int = 1500) -> list[str]:
    from pydoc_data.topics import topics

    docs = []
    for name in sorted(topics):
        paragraphs = [p for p in re.split(r"\n\s*\n", topics[name]) if p.strip()]
        current = ""
        for p in paragraphs:
            if current and len(current) + len(p) > max_chars:
                docs.append(current)
                current = ""
            current = f"{current}\n\n{p}" if current else p
        if current:
            docs.append(current)
    return docs
