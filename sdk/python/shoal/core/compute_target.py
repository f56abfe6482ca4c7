"""`ComputeTargetException`, as `azureml.core.compute_target` has it."""

from __future__ import annotations

from ..errors import ShoalError


class ComputeTargetException(ShoalError):
    """A cluster that cannot be made, found, changed or deleted (the coordinator's message)."""
