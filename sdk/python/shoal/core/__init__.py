"""The managed service's v1 SDK names (``azureml.core``), against a Shoal coordinator.

A script written for the service runs with its imports changed::

    from shoal.core import Workspace, Experiment, ScriptRunConfig, Environment
    from shoal.core.compute import ComputeTarget, AmlCompute
    from shoal.core.compute_target import ComputeTargetException
    from shoal.core.runconfig import MpiConfiguration
"""

from .compute import AmlCompute, ComputeTarget
from .compute_target import ComputeTargetException
from .environment import Environment
from .run import Experiment, Run, ScriptRunConfig
from .runconfig import MpiConfiguration, PyTorchConfiguration, TensorflowConfiguration
from .workspace import Workspace

__all__ = [
    "AmlCompute",
    "ComputeTarget",
    "ComputeTargetException",
    "Environment",
    "Experiment",
    "MpiConfiguration",
    "PyTorchConfiguration",
    "Run",
    "ScriptRunConfig",
    "TensorflowConfiguration",
    "Workspace",
]
