"""The client's empty-text rule is the server's: mtl_client.texts.has_content against multitask_core's."""

import sys

import pytest

from mtl_client.texts import has_content
from multitask_core import text as server_text

TRICKY = [
    "",
    " ",
    "\t\n\r\x0b\x0c",
    "\x00",
    "\x00\x00",
    "\x1f\x7f",
    "\u200b",
    "\ufeff",
    "\u200b\ufeff\u200d",
    "\u00a0",
    " \u00a0 ",
    "\u2028",
    "\u2029",
    "\u3000",
    "\u180e",
    "\u2060",
    "\u00ad",
    "\U000e0001",
    "\u0301",
    "\u034f\u0301\u0308",
    "\ue000",
    "\U000f0000",
    "\ud800",
    "\u0378",
    "a",
    "a\u0301",
    "\u200bx",
    "1",
    ".",
    "$",
    "\u00a0x\u00a0",
    "🙂",
    "\U0001f3fb",
    "\u20e3",
    "\u0600",
    "\u061c",
    "\u2800",
    "\u3164",
    "\uffa0",
    "ㅤ",
    "\u115f",
    "\u034f",
    "\u17b4",
    "\U0001d173",
    "<br>",
    "&nbsp;",
    "\\n",
]


@pytest.mark.parametrize("text", TRICKY)
def test_tricky_texts_agree_with_the_server(text):
    assert has_content(text) == server_text.has_content(text), ascii(text)


def test_every_single_character_agrees_with_the_server():
    # A text has content when one of its characters does, so agreeing on every code point is agreeing on all texts.
    disagree = [hex(cp) for cp in range(sys.maxunicode + 1) if has_content(chr(cp)) != server_text.has_content(chr(cp))]
    assert disagree == []


def test_what_counts_as_empty():
    for empty in ("\x00", "\u200b", "\ufeff", " \u00a0\u2028\t", "\u0301"):
        assert not has_content(empty), ascii(empty)
    for full in ("x", " 7 ", "\u200b!", "🙂"):
        assert has_content(full), ascii(full)
