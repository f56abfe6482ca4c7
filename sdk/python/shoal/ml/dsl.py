"""``@dsl.pipeline``: a Python function whose component calls become a pipeline's steps."""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from .. import errors
from .._util import drop_none
from . import _nodes
from ._nodes import Node, PipelineInput, PipelineJob, StepOutput

F = TypeVar("F", bound=Callable[..., Any])


def _step_names(steps: list[Node], scope: dict[str, Any]) -> dict[str, Node]:
    """Each step named as the function's variable holding it (as the service does),
    else its own name or ``step``, made unique."""
    by_variable = {id(v): k for k, v in scope.items() if isinstance(v, Node)}
    named: dict[str, Node] = {}
    for step in steps:
        base = by_variable.get(id(step)) or step.name or "step"
        name, n = base, 1
        while name in named:
            n += 1
            name = f"{base}_{n}"
        named[name] = step
    return named


def pipeline(
    func: Callable[..., Any] | None = None,
    *,
    name: str | None = None,
    display_name: str | None = None,
    description: str | None = None,
    experiment_name: str | None = None,
    compute: str | None = None,
    default_compute: str | None = None,
    continue_on_step_failure: bool | None = None,
    force_rerun: bool | None = None,
    tags: dict[str, str] | None = None,
) -> Any:
    """Make a pipeline of a function: calling it gives a ``PipelineJob`` to submit.

    Its parameters are the pipeline's inputs (literals or ``Input``); each
    component called in it is a step; the dict it returns names the pipeline's
    outputs (``{"model": train.outputs.model}``).
    """

    def wrap(function: Callable[..., Any]) -> Callable[..., PipelineJob]:
        signature = inspect.signature(function)

        @functools.wraps(function)
        def build(*args: Any, **kwargs: Any) -> PipelineJob:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            values = dict(bound.arguments)
            placeholders = {k: PipelineInput(k) for k in values}
            steps: list[Node] = []
            scope: dict[str, Any] = {}

            def watch(frame: Any, event: str, arg: Any) -> None:
                if event == "return" and frame.f_code is function.__code__:
                    scope.update(frame.f_locals)

            _nodes._BUILDING.append(steps)
            previous = sys.getprofile()
            sys.setprofile(watch)
            try:
                returned = function(**placeholders)
            finally:
                sys.setprofile(previous)
                _nodes._BUILDING.pop()
            if isinstance(returned, PipelineJob):
                raise errors.ValidationError("a pipeline inside a pipeline is not supported here yet")
            outputs: dict[str, StepOutput] = {}
            for key, value in (returned or {}).items():
                if not isinstance(value, StepOutput):
                    raise errors.ValidationError(f"pipeline output `{key}` must be a step's output (step.outputs.NAME)")
                outputs[key] = value
            settings = drop_none(
                {
                    "default_compute": default_compute,
                    "continue_on_step_failure": continue_on_step_failure,
                    "force_rerun": force_rerun,
                }
            )
            job = PipelineJob(
                steps=_step_names(steps, scope),
                inputs=drop_none(values),
                outputs=outputs,
                settings=settings,
                compute=compute,
                display_name=display_name or name or function.__name__,
                experiment_name=experiment_name,
                description=description or inspect.getdoc(function),
                tags=tags,
            )
            return job

        return build

    if func is not None:
        return wrap(func)
    return wrap
