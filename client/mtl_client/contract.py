"""What the served model promises, read from its config on the server: tensor names, tasks, labels, limits.

The client has no copy of any label or task name; everything here comes from `get_model_config`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath

import numpy as np
import tritonclient.grpc as grpcclient

from .errors import ModelContractError
from .predictions import Prediction, TaskPrediction

DEFAULT_OUTPUT_FILENAME = "{task}_predictions.csv"


@dataclass(frozen=True)
class TaskSpec:
    name: str
    labels: tuple[str, ...]


@dataclass(frozen=True)
class ModelContract:
    model: str
    input_name: str
    tasks: tuple[TaskSpec, ...]
    max_batch_size: int
    truncated_output: str
    output_filename: str = DEFAULT_OUTPUT_FILENAME
    max_tokens: int | None = None
    # How the server runs the model (config parameters; "auto" is resolved by the server when it loads).
    precision: str | None = None
    runtime: str | None = None
    device: str | None = None
    tokens_per_forward: int | None = None  # padded tokens per forward pass; 0 = the device's default

    @property
    def task_names(self) -> list[str]:
        return [task.name for task in self.tasks]

    def serving(self) -> dict:
        """The server's run settings as given in its config: precision, runtime, device, tokens per forward."""
        return {
            "precision": self.precision,
            "runtime": self.runtime,
            "device": self.device,
            "tokens_per_forward": self.tokens_per_forward,
        }

    def task(self, name: str) -> TaskSpec:
        for task in self.tasks:
            if task.name == name:
                return task
        raise KeyError(f"no task {name!r}; the model's tasks are {', '.join(self.task_names)}")

    def output_files(self, fmt: str = "csv") -> dict[str, str]:
        """{task: file name} from the server's template; `jsonl` swaps the extension."""
        names = {}
        for task in self.tasks:
            name = self.output_filename.replace("{task}", task.name)
            if fmt != "csv":
                name = str(PurePosixPath(name).with_suffix(f".{fmt}"))
            names[task.name] = name
        return names

    # -- parsing -------------------------------------------------------------------------------------
    @classmethod
    def from_model_config(cls, config: dict, model: str | None = None) -> ModelContract:
        """Parse `get_model_config(model, as_json=True)` (the whole response or its "config")."""
        if isinstance(config, dict) and isinstance(config.get("config"), dict):
            config = config["config"]
        if not isinstance(config, dict):
            raise ModelContractError(f"model config is not a JSON object: {config!r:.200}")
        model = model or config.get("name", "?")
        where = f"model '{model}'"
        max_batch_size = _int(config.get("max_batch_size", 0), f"{where}: max_batch_size")
        if max_batch_size <= 0:
            raise ModelContractError(
                f"{where}: max_batch_size is {max_batch_size}; this client needs a batching model (> 0)"
            )

        inputs = config.get("input") or []
        strings = [i for i in inputs if i.get("data_type") == "TYPE_STRING"]
        if len(inputs) != 1 or len(strings) != 1:
            found = ", ".join(f"{i.get('name')} ({i.get('data_type')})" for i in inputs) or "none"
            raise ModelContractError(f"{where}: expected exactly one TYPE_STRING input, found {found}")

        parameters = {k: (v or {}).get("string_value") for k, v in (config.get("parameters") or {}).items()}
        tasks = _parse_tasks(parameters.get("tasks"), where)
        outputs = {o.get("name"): o for o in config.get("output") or []}
        for task in tasks:
            _check_output(
                outputs,
                task.name,
                "TYPE_FP32",
                len(task.labels),
                where,
                f"task '{task.name}' ({len(task.labels)} labels)",
            )
        truncated = parameters.get("truncated_output") or "TRUNCATED"
        _check_output(outputs, truncated, "TYPE_BOOL", 1, where, "the truncated flag")

        max_tokens = parameters.get("max_tokens")
        tokens_per_forward = parameters.get("tokens_per_forward")
        contract = cls(
            model=model,
            input_name=strings[0]["name"],
            tasks=tasks,
            max_batch_size=max_batch_size,
            truncated_output=truncated,
            output_filename=parameters.get("output_filename") or DEFAULT_OUTPUT_FILENAME,
            max_tokens=_int(max_tokens, f"{where}: parameter max_tokens") if max_tokens else None,
            precision=parameters.get("precision") or None,
            runtime=parameters.get("runtime") or None,
            device=parameters.get("device") or None,
            tokens_per_forward=(
                _int(tokens_per_forward, f"{where}: parameter tokens_per_forward") if tokens_per_forward else None
            ),
        )
        _check_filenames(contract, where)
        return contract

    # -- requests and responses ----------------------------------------------------------------------
    def request(self, encoded: Sequence[bytes]) -> tuple[list, list]:
        """(inputs, requested outputs) for a batch of UTF-8 texts; shape [N, 1]."""
        tensor = grpcclient.InferInput(self.input_name, [len(encoded), 1], "BYTES")
        array = np.empty((len(encoded), 1), dtype=object)
        array[:, 0] = encoded
        tensor.set_data_from_numpy(array)
        outputs = [grpcclient.InferRequestedOutput(name) for name in (*self.task_names, self.truncated_output)]
        return [tensor], outputs

    def decode(self, output: Callable[[str], np.ndarray | None], texts: Sequence[str]) -> list[Prediction]:
        """Turn a response (`InferResult.as_numpy`) for `texts` into Predictions, in row order."""
        rows = len(texts)
        flags = _tensor(output, self.truncated_output, rows, 1).reshape(-1).astype(bool).tolist()
        per_task = []
        for task in self.tasks:
            probabilities = _tensor(output, task.name, rows, len(task.labels))
            best = probabilities.argmax(axis=1).tolist()
            per_task.append((task, best, probabilities.tolist()))
        predictions = []
        for row, text in enumerate(texts):
            results = {}
            for task, best, probabilities in per_task:
                values = probabilities[row]
                results[task.name] = TaskPrediction(
                    label=task.labels[best[row]],
                    score=values[best[row]],
                    probabilities=dict(zip(task.labels, values)),
                )
            predictions.append(Prediction(text=text, tasks=results, truncated=flags[row]))
        return predictions


def _int(value, what: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ModelContractError(f"{what} is not an integer: {value!r}") from None


def _parse_tasks(raw: str | None, where: str) -> tuple[TaskSpec, ...]:
    if raw is None:
        raise ModelContractError(f"{where}: its config has no 'tasks' parameter (the JSON list of tasks and labels)")
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ModelContractError(f"{where}: parameter 'tasks' is not valid JSON ({exc}): {raw!r:.200}") from None
    if not isinstance(data, list) or not data:
        raise ModelContractError(f"{where}: parameter 'tasks' must be a non-empty JSON list, got {raw!r:.200}")
    tasks, names = [], set()
    for position, item in enumerate(data):
        name = item.get("name") if isinstance(item, dict) else None
        labels = item.get("labels") if isinstance(item, dict) else None
        if not isinstance(name, str) or not name:
            raise ModelContractError(f"{where}: tasks[{position}] has no string 'name': {item!r:.200}")
        if not isinstance(labels, list) or not labels or not all(isinstance(label, str) and label for label in labels):
            raise ModelContractError(
                f"{where}: task '{name}' needs a non-empty list of string 'labels', got {labels!r:.200}"
            )
        if len(set(labels)) != len(labels):
            raise ModelContractError(f"{where}: task '{name}' repeats a label: {labels}")
        if name in names:
            raise ModelContractError(f"{where}: task '{name}' is listed twice in parameter 'tasks'")
        names.add(name)
        tasks.append(TaskSpec(name=name, labels=tuple(labels)))
    return tuple(tasks)


def _check_output(outputs: dict, name: str, data_type: str, width: int, where: str, what: str) -> None:
    spec = outputs.get(name)
    if spec is None:
        found = ", ".join(map(str, outputs)) or "none"
        raise ModelContractError(f"{where}: {what} needs an output tensor named '{name}'; the outputs are {found}")
    dims = [_int(d, f"{where}: output '{name}' dims") for d in spec.get("dims") or []]
    if spec.get("data_type") != data_type or dims != [width]:
        raise ModelContractError(
            f"{where}: output '{name}' is {spec.get('data_type')} dims {dims}; {what} needs {data_type} dims [{width}]"
        )


def _check_filenames(contract: ModelContract, where: str) -> None:
    template = contract.output_filename
    if "{task}" not in template:
        raise ModelContractError(f"{where}: parameter output_filename {template!r} must contain '{{task}}'")
    names = contract.output_files()
    for task, name in names.items():
        if "/" in name or "\\" in name or name in (".", "..") or name.startswith("."):
            raise ModelContractError(f"{where}: output file name {name!r} for task '{task}' is not a plain file name")
    if len(set(names.values())) != len(names):
        raise ModelContractError(f"{where}: output_filename {template!r} gives two tasks the same file")


def _tensor(output: Callable[[str], np.ndarray | None], name: str, rows: int, width: int) -> np.ndarray:
    array = output(name)
    if array is None:
        raise ModelContractError(f"the response has no output '{name}'")
    if array.size != rows * width:
        raise ModelContractError(f"output '{name}' has shape {list(array.shape)}; expected [{rows}, {width}]")
    return array.reshape(rows, width)
