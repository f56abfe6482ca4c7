"""The managed service's v2 SDK names (``azure.ai.ml``), against a Shoal coordinator::

from shoal.ml import MLClient, command, Input, Output, load_job, dsl
from shoal.ml.entities import AmlCompute, IdentityConfiguration, Environment, Data
"""

from . import dsl, entities, parallel, sweep
from ._client import MLClient, Poller, load_compute, load_job
from ._nodes import Command, Input, JobFile, Output, PipelineJob, SweepJob, command
from .parallel import RunFunction, parallel_run_function

__all__ = [
    "Command",
    "Input",
    "JobFile",
    "MLClient",
    "Output",
    "PipelineJob",
    "Poller",
    "RunFunction",
    "SweepJob",
    "command",
    "dsl",
    "entities",
    "load_compute",
    "load_job",
    "parallel",
    "parallel_run_function",
    "sweep",
]
