"""Parallel jobs (``azure.ai.ml.parallel``): ``parallel_run_function`` and ``RunFunction``."""

from ._nodes import Parallel, RunFunction, parallel_run_function

__all__ = ["Parallel", "RunFunction", "parallel_run_function"]
