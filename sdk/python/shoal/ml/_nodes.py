"""Jobs built in Python: command jobs, sweeps, parallel jobs and the steps of pipelines.

Each builds the job file the coordinator's admission reads (the managed service's
commandJob, sweepJob, parallelJob and pipelineJob schemas): what a key means and
what is refused stays the coordinator's.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import errors
from .._util import drop_none as _drop_none
from .entities import Distribution, Environment, JobResourceConfiguration

# The pipeline being built (`dsl.pipeline`), where a called component lands as a step.
_BUILDING: list[list[Node]] = []


@dataclass
class Input:
    """A job input: data (``type``: uri_folder, uri_file, mltable, ...; ``path``; ``mode``)
    or, as a component's declaration, a literal's type (string, integer, number, boolean)."""

    type: str = "uri_folder"
    path: str | None = None
    mode: str | None = None
    default: Any = None
    optional: bool | None = None
    description: str | None = None
    min: float | None = None
    max: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return _drop_none(
            {
                "type": self.type,
                "path": self.path,
                "mode": self.mode,
                "default": self.default,
                "optional": self.optional,
                "description": self.description,
                "min": self.min,
                "max": self.max,
            }
        )


@dataclass
class Output:
    """A named output (``type`` uri_folder or uri_file; ``mode`` rw_mount or upload)."""

    type: str = "uri_folder"
    path: str | None = None
    mode: str | None = None
    description: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return _drop_none({"type": self.type, "path": self.path, "mode": self.mode, "description": self.description})


class PipelineInput:
    """A pipeline function's parameter, bound as ``${{parent.inputs.NAME}}``."""

    def __init__(self, name: str) -> None:
        self.name = name

    def expression(self, names: dict[int, str]) -> str:
        return "${{parent.inputs.%s}}" % self.name


class StepOutput:
    """A step's named output, bound as ``${{parent.jobs.STEP.outputs.NAME}}``."""

    def __init__(self, step: Node, name: str) -> None:
        self.step = step
        self.name = name

    def expression(self, names: dict[int, str]) -> str:
        step = names.get(id(self.step))
        if step is None:
            raise errors.ValidationError(f"output `{self.name}` belongs to a step that is not part of this pipeline")
        return "${{parent.jobs.%s.outputs.%s}}" % (step, self.name)


Binding = PipelineInput | StepOutput


class _Outputs:
    """``step.outputs.NAME`` (or ``["NAME"]``): a binding to that output."""

    def __init__(self, node: Node) -> None:
        object.__setattr__(self, "_node", node)

    def __getattr__(self, name: str) -> StepOutput:
        node: Node = object.__getattribute__(self, "_node")
        if name not in node._outputs:
            raise AttributeError(f"no output `{name}`; its outputs: {', '.join(node._outputs) or 'none'}")
        return StepOutput(node, name)

    def __getitem__(self, name: str) -> StepOutput:
        return self.__getattr__(name)

    def __iter__(self) -> Any:
        node: Node = object.__getattribute__(self, "_node")
        return iter(node._outputs)


def _value(value: Any, names: dict[int, str] | None) -> Any:
    if isinstance(value, (PipelineInput, StepOutput)):
        if names is None:
            raise errors.ValidationError(
                "a binding to a pipeline's inputs or steps is only meaningful inside @dsl.pipeline"
            )
        return value.expression(names)
    if isinstance(value, (Input, Output)):
        return value.to_dict()
    return value


class Node:
    """What a job and a pipeline step have in common: inputs, outputs, a compute."""

    def __init__(
        self,
        *,
        inputs: dict[str, Any] | None,
        outputs: dict[str, Any] | None,
        compute: str | None,
        name: str | None,
        display_name: str | None,
        experiment_name: str | None,
        description: str | None,
        tags: dict[str, str] | None,
    ) -> None:
        self._inputs: dict[str, Any] = dict(inputs or {})
        self._outputs: dict[str, Any] = {k: v if v is not None else Output() for k, v in (outputs or {}).items()}
        self.compute = compute
        self.name = name
        self.display_name = display_name
        self.experiment_name = experiment_name
        self.description = description
        self.tags = dict(tags or {})

    @property
    def inputs(self) -> dict[str, Any]:
        return self._inputs

    @property
    def outputs(self) -> _Outputs:
        return _Outputs(self)

    def __call__(self, **values: Any) -> Node:
        """This component with its inputs given: in a ``@dsl.pipeline`` function, a step of it."""
        unknown = [k for k in values if k not in self._inputs]
        if unknown:
            raise errors.ValidationError(
                f"{type(self).__name__} has no input {', '.join(f'`{k}`' for k in unknown)}; "
                f"its inputs: {', '.join(self._inputs) or 'none'}"
            )
        made = copy.copy(self)
        made._inputs = {**self._inputs, **values}
        made._outputs = dict(self._outputs)
        made.tags = dict(self.tags)
        if _BUILDING:
            _BUILDING[-1].append(made)
        return made

    def _common(self, names: dict[int, str] | None) -> dict[str, Any]:
        return _drop_none(
            {
                "inputs": {k: _value(v, names) for k, v in self._inputs.items()} or None,
                "outputs": {k: _value(v, names) for k, v in self._outputs.items()} or None,
                "compute": self.compute,
                "display_name": self.display_name,
                "experiment_name": self.experiment_name,
                "description": self.description,
                "tags": self.tags or None,
            }
        )

    def to_job(self, base: Path) -> dict[str, Any]:
        """The job file the coordinator admits (paths relative to ``base``)."""
        raise NotImplementedError

    def to_step(self, names: dict[int, str], base: Path) -> dict[str, Any]:
        """As a step of a pipeline; its bindings named."""
        raise NotImplementedError


def _environment(env: str | Environment | None, base: Path) -> str | dict[str, Any] | None:
    if isinstance(env, Environment):
        if env.name and env.version and not (env.image or env.conda_file or env.build):
            return f"azureml:{env.name}:{env.version}"
        definition = env.definition(base)
        definition.pop("name", None)
        definition.pop("version", None)
        return definition
    return env


class Command(Node):
    """A command job (``command(...)``), and the component its calls make steps of."""

    def __init__(
        self,
        *,
        command: str,
        code: str | None = None,
        environment: str | Environment | None = None,
        inputs: dict[str, Any] | None = None,
        outputs: dict[str, Any] | None = None,
        compute: str | None = None,
        instance_count: int | None = None,
        distribution: Distribution | dict[str, Any] | None = None,
        environment_variables: dict[str, str] | None = None,
        resources: JobResourceConfiguration | dict[str, Any] | None = None,
        timeout: int | None = None,
        name: str | None = None,
        display_name: str | None = None,
        experiment_name: str | None = None,
        description: str | None = None,
        tags: dict[str, str] | None = None,
        is_deterministic: bool = True,
    ) -> None:
        super().__init__(
            inputs=inputs,
            outputs=outputs,
            compute=compute,
            name=name,
            display_name=display_name,
            experiment_name=experiment_name,
            description=description,
            tags=tags,
        )
        self.command = command
        self.code = code
        self.environment = environment
        self.instance_count = instance_count
        self.distribution = distribution
        self.environment_variables = dict(environment_variables or {})
        self.resources = resources
        self.timeout = timeout
        self.is_deterministic = is_deterministic

    def _body(self, base: Path) -> dict[str, Any]:
        resources: dict[str, Any] = {}
        if isinstance(self.resources, JobResourceConfiguration):
            resources = self.resources.to_dict()
        elif isinstance(self.resources, dict):
            resources = dict(self.resources)
        if self.instance_count is not None:
            resources["instance_count"] = self.instance_count
        distribution = self.distribution
        if distribution is not None and not isinstance(distribution, dict):
            distribution = distribution.to_dict()
        return _drop_none(
            {
                "command": self.command,
                "code": self.code,
                "environment": _environment(self.environment, base),
                "distribution": distribution,
                "environment_variables": self.environment_variables or None,
                "resources": resources or None,
                "limits": {"timeout": self.timeout} if self.timeout else None,
            }
        )

    def to_job(self, base: Path) -> dict[str, Any]:
        searched = [k for k, v in self._inputs.items() if isinstance(v, SearchSpace)]
        if searched:
            raise errors.ValidationError(
                f"inputs {', '.join(searched)} are search spaces: call .sweep(...) on the job to search them"
            )
        return {"type": "command", **self._body(base), **self._common(None)}

    def to_step(self, names: dict[int, str], base: Path) -> dict[str, Any]:
        step = {"type": "command", **self._body(base), **self._common(names)}
        step.pop("experiment_name", None)
        return step

    def sweep(
        self,
        *,
        primary_metric: str,
        goal: str,
        sampling_algorithm: str = "random",
        compute: str | None = None,
        early_termination_policy: EarlyTermination | None = None,
        max_total_trials: int | None = None,
        max_concurrent_trials: int | None = None,
        timeout: int | None = None,
        trial_timeout: int | None = None,
    ) -> SweepJob:
        """A sweep over the inputs given search spaces (``job(lr=Uniform(0.001, 0.1))``)."""
        return SweepJob(
            trial=self,
            primary_metric=primary_metric,
            goal=goal,
            sampling_algorithm=sampling_algorithm,
            compute=compute or self.compute,
            early_termination=early_termination_policy,
            limits=_drop_none(
                {
                    "max_total_trials": max_total_trials,
                    "max_concurrent_trials": max_concurrent_trials,
                    "timeout": timeout,
                    "trial_timeout": trial_timeout,
                }
            ),
        )


# `command(...)`, as the service spells it: a command job, to submit with
# `ml_client.jobs.create_or_update`, or to call with inputs inside a
# `@dsl.pipeline` function to make it a step.
command = Command


class SearchSpace:
    """A sweep's distribution for one input."""

    type = ""

    def __init__(self, **params: Any) -> None:
        self.params = params

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, **_drop_none(self.params)}


class EarlyTermination:
    """A sweep's early-termination policy."""

    type = ""

    def __init__(self, **params: Any) -> None:
        self.params = params

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, **_drop_none(self.params)}


class SweepJob(Node):
    """A sweep: trials of one command over a search space, the best by ``primary_metric``."""

    def __init__(
        self,
        *,
        trial: Command,
        primary_metric: str,
        goal: str,
        sampling_algorithm: str,
        compute: str | None,
        early_termination: EarlyTermination | None,
        limits: dict[str, Any],
    ) -> None:
        data_inputs = {k: v for k, v in trial._inputs.items() if not isinstance(v, SearchSpace)}
        super().__init__(
            inputs=data_inputs,
            outputs=dict(trial._outputs),
            compute=compute,
            name=trial.name,
            display_name=trial.display_name,
            experiment_name=trial.experiment_name,
            description=trial.description,
            tags=trial.tags,
        )
        self.trial = trial
        self.search_space = {k: v for k, v in trial._inputs.items() if isinstance(v, SearchSpace)}
        if not self.search_space:
            raise errors.ValidationError(
                "a sweep needs inputs given search spaces: job(lr=Uniform(0.001, 0.1)).sweep(...)"
            )
        self.primary_metric = primary_metric
        self.goal = goal
        self.sampling_algorithm = sampling_algorithm
        self.early_termination = early_termination
        self.limits = dict(limits)

    def set_limits(
        self,
        *,
        max_total_trials: int | None = None,
        max_concurrent_trials: int | None = None,
        timeout: int | None = None,
        trial_timeout: int | None = None,
    ) -> None:
        self.limits.update(
            _drop_none(
                {
                    "max_total_trials": max_total_trials,
                    "max_concurrent_trials": max_concurrent_trials,
                    "timeout": timeout,
                    "trial_timeout": trial_timeout,
                }
            )
        )

    def _body(self, base: Path) -> dict[str, Any]:
        trial = self.trial._body(base)
        trial.pop("limits", None)
        # The trial's command names searched inputs as the sweep file does.
        for name in self.search_space:
            trial["command"] = re.sub(
                r"\$\{\{\s*inputs\.%s\s*\}\}" % re.escape(name),
                "${{search_space.%s}}" % name,
                trial["command"],
            )
        return _drop_none(
            {
                "trial": trial,
                "search_space": {k: v.to_dict() for k, v in self.search_space.items()},
                "sampling_algorithm": self.sampling_algorithm,
                "objective": {"goal": self.goal, "primary_metric": self.primary_metric},
                "early_termination": self.early_termination.to_dict() if self.early_termination else None,
                "limits": self.limits or None,
            }
        )

    def to_job(self, base: Path) -> dict[str, Any]:
        return {"type": "sweep", **self._body(base), **self._common(None)}

    def to_step(self, names: dict[int, str], base: Path) -> dict[str, Any]:
        step = {"type": "sweep", **self._body(base), **self._common(names)}
        step.pop("experiment_name", None)
        return step


@dataclass
class RunFunction:
    """A parallel job's task: ``entry_script``'s ``init()`` and ``run(mini_batch)`` in a driver."""

    code: str
    entry_script: str
    program_arguments: str | None = None
    environment: str | Environment | None = None
    append_row_to: str | None = None

    def to_dict(self, base: Path) -> dict[str, Any]:
        return _drop_none(
            {
                "type": "run_function",
                "code": self.code,
                "entry_script": self.entry_script,
                "program_arguments": self.program_arguments,
                "environment": _environment(self.environment, base),
                "append_row_to": self.append_row_to,
            }
        )


class Parallel(Node):
    """A parallel job (``parallel_run_function(...)``): the input data cut into mini-batches."""

    def __init__(self, *, task: RunFunction, input_data: str, fields: dict[str, Any], **node: Any) -> None:
        super().__init__(**node)
        self.task = task
        self.input_data = input_data
        self.fields = fields

    def _body(self, base: Path) -> dict[str, Any]:
        return {"input_data": self.input_data, **_drop_none(self.fields), "task": self.task.to_dict(base)}

    def to_job(self, base: Path) -> dict[str, Any]:
        return {"type": "parallel", **self._body(base), **self._common(None)}

    def to_step(self, names: dict[int, str], base: Path) -> dict[str, Any]:
        step = {"type": "parallel", **self._body(base), **self._common(names)}
        step.pop("experiment_name", None)
        return step


def parallel_run_function(
    *,
    task: RunFunction,
    input_data: str,
    inputs: dict[str, Any] | None = None,
    outputs: dict[str, Any] | None = None,
    instance_count: int | None = None,
    max_concurrency_per_instance: int | None = None,
    mini_batch_size: str | int | None = None,
    mini_batch_error_threshold: int | None = None,
    error_threshold: int | None = None,
    retry_settings: dict[str, Any] | None = None,
    logging_level: str | None = None,
    partition_keys: list[str] | None = None,
    compute: str | None = None,
    name: str | None = None,
    display_name: str | None = None,
    experiment_name: str | None = None,
    description: str | None = None,
    tags: dict[str, str] | None = None,
) -> Parallel:
    """A parallel job: ``input_data`` (``${{inputs.NAME}}``) cut into mini-batches, each given to
    ``task``'s ``run(mini_batch)`` on ``instance_count`` nodes."""
    return Parallel(
        task=task,
        input_data=input_data,
        fields={
            "resources": {"instance_count": instance_count} if instance_count else None,
            "max_concurrency_per_instance": max_concurrency_per_instance,
            "mini_batch_size": str(mini_batch_size) if mini_batch_size is not None else None,
            "mini_batch_error_threshold": mini_batch_error_threshold,
            "error_threshold": error_threshold,
            "retry_settings": retry_settings,
            "logging_level": logging_level,
            "partition_keys": partition_keys,
        },
        inputs=inputs,
        outputs=outputs,
        compute=compute,
        name=name,
        display_name=display_name,
        experiment_name=experiment_name,
        description=description,
        tags=tags,
    )


class PipelineJob(Node):
    """A pipeline (``@dsl.pipeline``): steps that run when the steps they read have completed."""

    def __init__(
        self,
        *,
        steps: dict[str, Node],
        inputs: dict[str, Any],
        outputs: dict[str, StepOutput],
        settings: dict[str, Any],
        compute: str | None,
        display_name: str | None,
        experiment_name: str | None,
        description: str | None,
        tags: dict[str, str] | None,
    ) -> None:
        super().__init__(
            inputs=inputs,
            outputs={k: Output() for k in outputs},
            compute=compute,
            name=None,
            display_name=display_name,
            experiment_name=experiment_name,
            description=description,
            tags=tags,
        )
        self.jobs = steps
        self._bound = outputs
        self.settings = settings

    def to_job(self, base: Path) -> dict[str, Any]:
        names = {id(step): name for name, step in self.jobs.items()}
        steps = {name: step.to_step(names, base) for name, step in self.jobs.items()}
        # A step output the pipeline returns is bound to the pipeline's output.
        for output, bound in self._bound.items():
            step = names.get(id(bound.step))
            if step is None:
                raise errors.ValidationError(f"pipeline output `{output}` is bound to a step outside this pipeline")
            steps[step].setdefault("outputs", {})[bound.name] = "${{parent.outputs.%s}}" % output
        doc = {"type": "pipeline", **self._common(None), "jobs": steps}
        if self.settings:
            doc["settings"] = dict(self.settings)
        return doc

    def to_step(self, names: dict[int, str], base: Path) -> dict[str, Any]:
        raise errors.ValidationError("a pipeline inside a pipeline is not supported here yet")


class JobFile:
    """A job file read with ``load_job``: submitted as ``shoal job submit -f`` submits it."""

    def __init__(self, doc: dict[str, Any], base: Path, source: str) -> None:
        self.doc = doc
        self.base = base
        self.source = source
        self.name: str | None = doc.get("name")
        self.display_name: str | None = doc.get("display_name")
        self.experiment_name: str | None = doc.get("experiment_name")
        self.compute: str | None = doc.get("compute")
        self.type: str = str(doc.get("type") or "command")

    @property
    def inputs(self) -> dict[str, Any]:
        return dict(self.doc.get("inputs") or {})

    def __repr__(self) -> str:
        return f"JobFile({self.source!r}, type={self.type!r})"
