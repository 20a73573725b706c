"""Splitting texts into requests: at most `max_rows` rows and `max_bytes` of tensor data per request."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidInputError, text_error
from .texts import EMPTY_TEXT, has_content

# gRPC's usual 4 MiB message limit (proxies and servers default to it), less room for the request's framing.
DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024 - 64 * 1024
# Each element of a BYTES tensor is sent as a 4-byte length followed by the bytes.
ELEMENT_OVERHEAD = 4


def element_cost(item: str | bytes | int) -> int:
    """Bytes one text adds to a request: a size in bytes (int), bytes, or a str measured as UTF-8."""
    if isinstance(item, int):
        if item < 0:
            raise ValueError(f"a text size cannot be negative: {item}")
        return item + ELEMENT_OVERHEAD
    if isinstance(item, str):
        item = item.encode("utf-8", "surrogatepass")
    return len(item) + ELEMENT_OVERHEAD


class _Packer:
    """Greedy packing in input order: a request closes when the next row would break a limit."""

    def __init__(self, max_rows: int, max_bytes: int):
        if max_rows < 1:
            raise ValueError(f"max_rows must be at least 1, got {max_rows}")
        if max_bytes < ELEMENT_OVERHEAD + 1:
            raise ValueError(f"max_bytes must be at least {ELEMENT_OVERHEAD + 1}, got {max_bytes}")
        self.max_rows, self.max_bytes = max_rows, max_bytes
        self.rows = self.used = 0

    def check(self, index: int, cost: int) -> None:
        if cost > self.max_bytes:
            raise too_large(index, cost - ELEMENT_OVERHEAD, self.max_bytes)

    def fits(self, cost: int) -> bool:
        return self.rows == 0 or (self.rows < self.max_rows and self.used + cost <= self.max_bytes)

    def add(self, cost: int) -> None:
        self.rows += 1
        self.used += cost

    def reset(self) -> None:
        self.rows = self.used = 0


def too_large(index: int, size: int, max_bytes: int) -> InvalidInputError:
    return text_error(
        index, f"text is {size:,} bytes of UTF-8, over the {max_bytes - ELEMENT_OVERHEAD:,}-byte limit of one request"
    )


def plan_batches(texts_or_sizes: Sequence[str | bytes | int], max_rows: int, max_bytes: int) -> list[tuple[int, int]]:
    """Half-open (start, stop) ranges covering every item in order, each within `max_rows` and `max_bytes`.

    Items are texts (str, measured as UTF-8), bytes, or sizes in bytes. Ranges are as long as the
    limits allow (greedy). An item too big for a request on its own raises InvalidInputError naming it.
    """
    packer = _Packer(max_rows, max_bytes)
    ranges, start = [], 0
    for index, item in enumerate(texts_or_sizes):
        cost = element_cost(item)
        packer.check(index, cost)
        if not packer.fits(cost):
            ranges.append((start, index))
            start = index
            packer.reset()
        packer.add(cost)
    if packer.rows:
        ranges.append((start, start + packer.rows))
    return ranges


def encode_text(index: int, text: Any) -> bytes:
    """The UTF-8 bytes the server gets for `text`, or InvalidInputError naming its index."""
    if not isinstance(text, str):
        raise text_error(index, f"expected a str, got {type(text).__name__}")
    try:  # first: a lone surrogate is "not UTF-8", which says more than "empty"
        encoded = text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise text_error(index, f"cannot be encoded as UTF-8 ({exc.reason} at character {exc.start})") from None
    if not has_content(text):
        raise text_error(index, EMPTY_TEXT)
    return encoded


def check_texts(texts: Sequence[str], shown: int = 10) -> list[bytes]:
    """Encode every text, or one InvalidInputError listing the empty ones (first few and the count)."""
    encoded, empty = [], []
    for index, text in enumerate(texts):
        if isinstance(text, str) and not has_content(text):
            empty.append(index)
            continue
        encoded.append(encode_text(index, text))
    if empty:
        listed = ", ".join(str(i) for i in empty[:shown]) + (", ..." if len(empty) > shown else "")
        raise InvalidInputError(
            f"{len(empty)} empty text(s) (nothing but whitespace, control or format characters) at index {listed}",
            index=empty[0],
            indices=empty[:shown],
            count=len(empty),
            reason=EMPTY_TEXT,
        )
    return encoded


@dataclass
class Batch:
    """Consecutive items of a stream: the ones with text become one request, the others pass through."""

    first: int
    tags: list = field(default_factory=list)
    texts: list = field(default_factory=list)  # str, or None for a pass-through item
    sent: list[int] = field(default_factory=list)  # stream indices of the rows in the request
    encoded: list[bytes] = field(default_factory=list)

    @property
    def sent_texts(self) -> list[str]:
        return [t for t in self.texts if t is not None]


class BatchBuilder:
    """Groups a stream of (tag, text-or-None) into Batches as it is read; None texts pass through unsent.

    A batch also closes after `max_items` items (default 4 x max_rows), so that a long run of
    pass-through items cannot pile up in memory. Each text is checked (`encode_text`) as it arrives.
    """

    def __init__(self, max_rows: int, max_bytes: int, max_items: int | None = None):
        self.packer = _Packer(max_rows, max_bytes)
        self.max_items = max_items or 4 * max_rows
        self.index = 0
        self.batch = Batch(first=0)

    def add(self, tag: Any, text: str | None) -> Batch | None:
        """Take the next item; return the batch it closed, if any."""
        index, self.index = self.index, self.index + 1
        data = None if text is None else encode_text(index, text)
        cost = 0 if data is None else len(data) + ELEMENT_OVERHEAD
        if data is not None:
            self.packer.check(index, cost)
        closed = None
        if len(self.batch.tags) >= self.max_items or (data is not None and not self.packer.fits(cost)):
            closed, self.batch = self.batch, Batch(first=index)
            self.packer.reset()
        batch = self.batch
        batch.tags.append(tag)
        batch.texts.append(text)
        if data is not None:
            self.packer.add(cost)
            batch.sent.append(index)
            batch.encoded.append(data)
        return closed

    def finish(self) -> Batch | None:
        batch, self.batch = self.batch, Batch(first=self.index)
        self.packer.reset()
        return batch if batch.tags else None


def stream_batches(
    items: Iterable[tuple[Any, str | None]], max_rows: int, max_bytes: int, max_items: int | None = None
) -> Iterator[Batch]:
    """Lazily group (tag, text-or-None) items into Batches (see BatchBuilder)."""
    builder = BatchBuilder(max_rows, max_bytes, max_items)
    for tag, text in items:
        batch = builder.add(tag, text)
        if batch is not None:
            yield batch
    batch = builder.finish()
    if batch is not None:
        yield batch
