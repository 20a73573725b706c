"""mtl-client: Python and command-line client of the multi-task classifier served by Triton (gRPC).

from mtl_client import MultiTaskClient

with MultiTaskClient("localhost:8001") as client:
    for pred in client.predict(["Shares rallied after the earnings call"]):
        print(pred["topic"].label, pred["sentiment"].score)
"""

import os

# grpc reads this once, when it is first imported: a TLS mismatch is then our one error line, not also grpc's log.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from .aio import AsyncMultiTaskClient
from .base import Health, ModelInfo
from .batching import DEFAULT_MAX_REQUEST_BYTES, plan_batches
from .client import MultiTaskClient
from .contract import ModelContract, TaskSpec
from .errors import (
    InvalidInputError,
    ModelContractError,
    ModelNotFoundError,
    MTLClientError,
    RequestTimeoutError,
    ServerError,
    ServerUnavailableError,
)
from .predictions import Prediction, TaskPrediction

__version__ = "0.1.0"

__all__ = [
    "AsyncMultiTaskClient",
    "DEFAULT_MAX_REQUEST_BYTES",
    "Health",
    "InvalidInputError",
    "MTLClientError",
    "ModelContract",
    "ModelContractError",
    "ModelInfo",
    "ModelNotFoundError",
    "MultiTaskClient",
    "Prediction",
    "RequestTimeoutError",
    "ServerError",
    "ServerUnavailableError",
    "TaskPrediction",
    "TaskSpec",
    "plan_batches",
]
