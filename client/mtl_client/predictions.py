"""Typed results: one Prediction per input text, one TaskPrediction per task."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TaskPrediction:
    """One task's answer for one text: the top label, its probability, and every label's probability."""

    label: str
    score: float
    probabilities: dict[str, float]


@dataclass(frozen=True)
class Prediction:
    """Every task's answer for one text, in the model's task order. `pred["topic"].label`."""

    text: str
    tasks: dict[str, TaskPrediction]
    truncated: bool = field(default=False)

    def __getitem__(self, task: str) -> TaskPrediction:
        try:
            return self.tasks[task]
        except KeyError:
            raise KeyError(f"no task {task!r}; the model's tasks are {', '.join(self.tasks)}") from None

    def __iter__(self):
        return iter(self.tasks)

    def __len__(self) -> int:
        return len(self.tasks)

    @property
    def labels(self) -> dict[str, str]:
        """{task: top label}."""
        return {name: result.label for name, result in self.tasks.items()}

    def to_dict(self) -> dict:
        return {
            "text": self.text,
            "truncated": self.truncated,
            "tasks": {
                name: {"label": r.label, "score": r.score, "probabilities": dict(r.probabilities)}
                for name, r in self.tasks.items()
            },
        }
