"""The final answer of a response: the content of its last ``\\boxed{...}`` (or ``\\fbox{...}``)."""
from __future__ import annotations

import re
from typing import Optional

_BOX = re.compile(r"\\(?:boxed|fbox)\s*")


def extract_boxed_answer(text: str) -> Optional[str]:
    """Content of the last ``\\boxed{...}``/``\\fbox{...}`` with nested braces; ``\\boxed 5`` form too.

    None when there is no box or the last one is unbalanced (a truncated response).
    """
    starts = [m for m in _BOX.finditer(text)]
    for m in reversed(starts):
        i = m.end()
        if i < len(text) and text[i] == "{":
            depth = 0
            for k in range(i, len(text)):
                if text[k] == "{" and (k == 0 or text[k - 1] != "\\"):
                    depth += 1
                elif text[k] == "}" and text[k - 1] != "\\":
                    depth -= 1
                    if depth == 0:
                        return text[i + 1:k]
            return None  # unbalanced: the last box was cut off
        if m.group(0).endswith(" ") or m.group(0).endswith("\t"):
            tail = re.match(r"[^\s$]+", text[i:])  # "\boxed 5" (no braces)
            if tail:
                return tail.group(0)
    return None
