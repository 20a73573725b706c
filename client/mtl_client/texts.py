"""What counts as an empty text: the server's rule (multitask_core.text.has_content), restated without torch.

tests/client/test_texts.py compares the two over tricky strings, so they cannot drift apart.
"""

from __future__ import annotations

import unicodedata

# Letters, numbers, punctuation and symbols; whitespace (Z*), control (Cc), format (Cf, e.g. U+200B,
# U+FEFF), private-use and unassigned (C*) characters and combining marks (M*) alone show nothing.
_VISIBLE_CATEGORIES = frozenset("LNPS")


def has_content(text: str) -> bool:
    """False for a text of nothing but whitespace, control, format (zero-width, BOM) or combining characters."""
    return any(unicodedata.category(char)[0] in _VISIBLE_CATEGORIES for char in text)


EMPTY_TEXT = "empty text (nothing but whitespace, control or format characters)"
