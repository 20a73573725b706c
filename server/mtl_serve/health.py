"""How mtl-serve judges whether Triton can serve: what the guards ask their owner, the message Triton 2.51
answers with once a python-backend stub is gone or hung, and the watchdog's canary inference."""

from __future__ import annotations

import json
import math
import re
import urllib.error
import urllib.request
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

# Triton 2.51's answer for every request an instance gets after its stub died or stopped answering.
STUB_FAILURE = re.compile(r"Stub process '[^']*' is not healthy")
CANARY_TEXT = "mtl-serve watchdog canary"
# model.py leaves requests with this id out of its mtl_* metrics (multitask_core.metrics.UNCOUNTED_REQUEST_ID).
CANARY_REQUEST_ID = "mtl-serve-canary"


class UpstreamHealth:
    """What a guard asks its owner about Triton; this default (a guard on its own) always forwards."""

    def ready(self) -> bool:
        """False while Triton cannot serve (a stub died or hangs, a restart is under way)."""
        return True

    def generation(self) -> int:
        """Which Triton process answers now: a stub failure seen in an older one's answer is old news."""
        return 0

    def stub_failed(self, generation: int, message: str) -> bool:
        """An answer from Triton `generation` carried a stub failure; True when a restart is coming."""
        return False


def canary_request(config: dict) -> bytes:
    """A one-row HTTP/JSON inference request that a model with this config (as Triton serves it) accepts."""
    batched = int(config.get("max_batch_size") or 0) > 0
    inputs = []
    for tensor in config.get("input", []):
        if tensor.get("optional"):
            continue
        shape = ([1] if batched else []) + [max(int(d), 1) for d in tensor.get("dims", [])]
        datatype = tensor.get("data_type", "").removeprefix("TYPE_")
        value = {"STRING": CANARY_TEXT, "BOOL": False}.get(datatype, 0)
        inputs.append(
            {
                "name": tensor["name"],
                "shape": shape,
                "data": [value] * math.prod(shape),
                "datatype": "BYTES" if datatype == "STRING" else datatype,
            }
        )
    return json.dumps({"id": CANARY_REQUEST_ID, "inputs": inputs}).encode()


def send_canary(url: str, request: bytes, deadline_s: float) -> tuple[int | None, str]:
    """(HTTP status, error text) of one canary inference; status None when no answer came within the deadline."""
    call = urllib.request.Request(url, request, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(call, timeout=deadline_s) as response:
            response.read()
            return response.status, ""
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")
    except (urllib.error.URLError, OSError) as exc:
        timed_out = isinstance(exc, TimeoutError) or isinstance(getattr(exc, "reason", None), TimeoutError)
        return (None, "no answer") if timed_out else (0, str(exc))


@dataclass
class Probe:
    """The watchdog's canary for one model, sent straight to Triton's own HTTP endpoint."""

    model: str
    url: str
    request: bytes
    future: Future | None = None
    sent_at: float = 0.0
    cpu_at_send: int = 0
    answered: bool = False  # a model that never accepted its canary is not probed again

    def send(self, pool: ThreadPoolExecutor, now: float, cpu: int, deadline_s: float) -> None:
        self.sent_at, self.cpu_at_send = now, cpu
        self.future = pool.submit(send_canary, self.url, self.request, deadline_s)

    def result(self) -> tuple[int | None, str] | None:
        """The answer once it came (or its deadline passed), else None."""
        if self.future is None or not self.future.done():
            return None
        answer, self.future = self.future.result(), None
        return answer
