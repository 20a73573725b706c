"""Text in: the one tokenization object (normalisation, character clip, token limit) and per-row errors.

`TextEncoder` owns the whole path from a request's string to token ids, so the limit is held once. Training
and serving both go through it: the model only ever sees normalised text.
"""

from __future__ import annotations

import html
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import emoji
import numpy as np
from tokenizers import Tokenizer

# A token covers at least one character, and real text averages under 10 per token, so cutting a huge
# string to this many characters per token of the limit keeps every token the limit can hold.
CHARS_PER_TOKEN = 64
# The one format of a per-row error, parsed by the client (docs/contract.md): "row 3: empty text".
ROW_ERROR = "row {index}: {problem}"
EMPTY_TEXT = "empty text (nothing but whitespace, control or format characters)"

_URL = re.compile(r"(?:https?://|www\.)\S+", re.IGNORECASE)
_MENTION = re.compile(r"(?<![\w@])@\w{1,30}")
_HASHTAG = re.compile(r"(?<![\w#])#(\w+)")
_CAMEL = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|\d+")
_ELONGATED = re.compile(r"([^\W\d_])\1{2,}")  # a letter three or more times: "sooooo" -> "soo"
_REPEATED_PUNCT = re.compile(r"([!?.])\1{3,}")
_SPACES = re.compile(r"\s+")


class RowError(ValueError):
    """One row of one request is unusable; the message names the row and the problem."""

    def __init__(self, index: int, problem: str):
        super().__init__(ROW_ERROR.format(index=index, problem=problem))
        self.index = index
        self.problem = problem


def _emoji_words(text: str) -> str:
    """Each emoji as its name ("face with tears of joy"): the encoder's vocabulary has none of them (all
    [UNK]), and they carry much of a post's tone. A run of one emoji repeated is named once."""
    out, last, previous = [], 0, None
    for match in emoji.emoji_list(text):
        start, end, symbol = match["match_start"], match["match_end"], match["emoji"]
        between = text[last:start]
        if not (symbol == previous and not between.strip()):
            out.append(between)
            name = emoji.EMOJI_DATA.get(symbol, {}).get("en", ":emoji:")
            out.append(f" {name.strip(':').replace('_', ' ')} ")
        previous, last = symbol, end
    out.append(text[last:])
    return "".join(out)


def _split_hashtag(match: re.Match) -> str:
    # "#NotMyPresident" -> "#not my president"; "#GoT" and "#iPhone" stay whole (a one-letter part is no word).
    words = _CAMEL.findall(match.group(1))
    if len(words) < 2 or any(len(word) < 2 and not word.isdigit() for word in words):
        return match.group(0)
    return "#" + " ".join(words).lower()


def _link(match: re.Match) -> str:
    url = match.group(0)
    return "http" + url[len(url.rstrip(".,!?;:)]\"'")) :]  # punctuation after a link is the sentence's


def _visible(char: str) -> bool:
    return unicodedata.category(char)[0] in "LNPS"  # letters, numbers, punctuation, symbols


def normalize_text(text: str) -> str:
    """The form every text takes before tokenizing, in training and in serving.

    Social-media noise mapped to what the encoder knows: emoji to their names, links to "http", user
    handles to "@user", CamelCase hashtags to words; elongations capped ("soooo" -> "soo"); HTML entities
    decoded; control and zero-width characters dropped; whitespace collapsed and stripped.
    """
    if not text.isascii():
        text = _emoji_words(text)
        text = "".join(c if unicodedata.category(c) not in ("Cc", "Cf") or c.isspace() else " " for c in text)
    elif any(ord(c) < 32 for c in text):
        text = "".join(" " if ord(c) < 32 else c for c in text)
    if "&" in text:
        text = html.unescape(text)
    text = _URL.sub(_link, text)
    text = _MENTION.sub("@user", text)
    text = _HASHTAG.sub(_split_hashtag, text)
    text = _ELONGATED.sub(r"\1\1", text)
    text = _REPEATED_PUNCT.sub(r"\1\1\1", text)
    return _SPACES.sub(" ", text).strip()


def has_content(text: str) -> bool:
    """False for a text of nothing but whitespace, control, format (zero-width, BOM) or combining characters."""
    return any(_visible(c) for c in text)


class RequestTooLarge(ValueError):
    """A request holds more text bytes than the model accepts in one request."""


def decode_texts(raw: np.ndarray, max_bytes: int | None = None) -> list[str]:
    """BYTES tensor of shape [N, 1] (or [N]) → N strings, or RowError naming the first bad row.

    A request over `max_bytes` of text is refused before any text is decoded, normalised or tokenized."""
    rows = raw.reshape(-1)
    if rows.size == 0:
        raise ValueError("the request holds no rows")
    if max_bytes is not None:
        size = sum(len(value) for value in rows)
        if size > max_bytes:
            raise RequestTooLarge(
                f"the request holds {size:,} bytes of text, more than the {max_bytes:,} this model "
                "accepts in one request: send fewer rows per request"
            )
    texts = []
    for index, value in enumerate(rows):
        if isinstance(value, str):
            text = value
        else:
            try:
                text = bytes(value).decode("utf-8")
            except UnicodeDecodeError as exc:
                raise RowError(index, f"invalid UTF-8 at byte {exc.start}") from None
        if not has_content(text):
            raise RowError(index, EMPTY_TEXT)
        texts.append(text)
    return texts


@dataclass
class Batch:
    ids: np.ndarray  # int64 [rows, longest]
    mask: np.ndarray  # int64 [rows, longest]
    truncated: np.ndarray  # bool [rows]

    @property
    def lengths(self) -> np.ndarray:
        return self.mask.sum(axis=1)

    def __len__(self) -> int:
        return len(self.truncated)


class TextEncoder:
    """Normalisation, the character clip and the token limit, held together (like TEI's Tokenization)."""

    def __init__(self, tokenizer_path: Path, max_tokens: int):
        self.max_tokens = max_tokens
        self.max_chars = max_tokens * CHARS_PER_TOKEN
        self.tokenizer = Tokenizer.from_file(str(tokenizer_path))
        self.tokenizer.enable_truncation(max_length=max_tokens)
        # Pad to the longest row of each batch, not to a fixed length.
        self.tokenizer.enable_padding(pad_id=self.tokenizer.token_to_id("[PAD]") or 0, pad_token="[PAD]")

    def encode(self, texts: list[str]) -> Batch:
        clipped, cut = [], []
        for text in texts:
            # Leading padding is stripped before the clip, so it cannot push the content past it; the raw text is
            # clipped before normalising, so a huge one costs no more than a long one.
            raw = text.lstrip()
            normalized = normalize_text(raw[: self.max_chars])
            clipped.append(normalized[: self.max_chars])
            cut.append(len(raw) > self.max_chars or len(normalized) > self.max_chars)
        encodings = self.tokenizer.encode_batch(clipped)
        ids = np.array([e.ids for e in encodings], dtype=np.int64).reshape(len(texts), -1)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64).reshape(len(texts), -1)
        truncated = np.array([bool(e.overflowing) or was_cut for e, was_cut in zip(encodings, cut)], dtype=bool)
        return Batch(ids, mask, truncated)
