"""Search spaces and early-termination policies for sweeps (``azure.ai.ml.sweep``)."""

from __future__ import annotations

from typing import Any

from ._nodes import EarlyTermination, SearchSpace, SweepJob

__all__ = [
    "BanditPolicy",
    "Choice",
    "LogNormal",
    "LogUniform",
    "MedianStoppingPolicy",
    "Normal",
    "QLogNormal",
    "QLogUniform",
    "QNormal",
    "QUniform",
    "Randint",
    "SweepJob",
    "TruncationSelectionPolicy",
    "Uniform",
]


class Choice(SearchSpace):
    type = "choice"

    def __init__(self, values: list[Any]) -> None:
        super().__init__(values=list(values))


class Randint(SearchSpace):
    type = "randint"

    def __init__(self, upper: int) -> None:
        super().__init__(upper=upper)


class Uniform(SearchSpace):
    type = "uniform"

    def __init__(self, min_value: float, max_value: float) -> None:
        super().__init__(min_value=min_value, max_value=max_value)


class LogUniform(SearchSpace):
    type = "loguniform"

    def __init__(self, min_value: float, max_value: float) -> None:
        super().__init__(min_value=min_value, max_value=max_value)


class QUniform(SearchSpace):
    type = "quniform"

    def __init__(self, min_value: float, max_value: float, q: float) -> None:
        super().__init__(min_value=min_value, max_value=max_value, q=q)


class QLogUniform(SearchSpace):
    type = "qloguniform"

    def __init__(self, min_value: float, max_value: float, q: float) -> None:
        super().__init__(min_value=min_value, max_value=max_value, q=q)


class Normal(SearchSpace):
    type = "normal"

    def __init__(self, mu: float, sigma: float) -> None:
        super().__init__(mu=mu, sigma=sigma)


class LogNormal(SearchSpace):
    type = "lognormal"

    def __init__(self, mu: float, sigma: float) -> None:
        super().__init__(mu=mu, sigma=sigma)


class QNormal(SearchSpace):
    type = "qnormal"

    def __init__(self, mu: float, sigma: float, q: float) -> None:
        super().__init__(mu=mu, sigma=sigma, q=q)


class QLogNormal(SearchSpace):
    type = "qlognormal"

    def __init__(self, mu: float, sigma: float, q: float) -> None:
        super().__init__(mu=mu, sigma=sigma, q=q)


class BanditPolicy(EarlyTermination):
    type = "bandit"

    def __init__(
        self,
        *,
        slack_factor: float | None = None,
        slack_amount: float | None = None,
        evaluation_interval: int | None = None,
        delay_evaluation: int | None = None,
    ) -> None:
        super().__init__(
            slack_factor=slack_factor,
            slack_amount=slack_amount,
            evaluation_interval=evaluation_interval,
            delay_evaluation=delay_evaluation,
        )


class MedianStoppingPolicy(EarlyTermination):
    type = "median_stopping"

    def __init__(self, *, evaluation_interval: int | None = None, delay_evaluation: int | None = None) -> None:
        super().__init__(evaluation_interval=evaluation_interval, delay_evaluation=delay_evaluation)


class TruncationSelectionPolicy(EarlyTermination):
    type = "truncation_selection"

    def __init__(
        self,
        *,
        truncation_percentage: int,
        evaluation_interval: int | None = None,
        delay_evaluation: int | None = None,
    ) -> None:
        super().__init__(
            truncation_percentage=truncation_percentage,
            evaluation_interval=evaluation_interval,
            delay_evaluation=delay_evaluation,
        )
