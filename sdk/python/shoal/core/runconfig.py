"""Distributed training configurations, as `azureml.core.runconfig` has them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class MpiConfiguration:
    """Open MPI across ``node_count`` nodes, ``process_count_per_node`` ranks each (no SSH)."""

    process_count_per_node: int = 1
    node_count: int = 1

    def distribution(self) -> dict[str, Any]:
        return {"type": "mpi", "process_count_per_instance": self.process_count_per_node}


@dataclass
class PyTorchConfiguration:
    """``torch.distributed``: ``process_count`` processes in all over ``node_count`` nodes
    (MASTER_ADDR, MASTER_PORT, RANK, LOCAL_RANK and WORLD_SIZE set for each)."""

    communication_backend: str = "Nccl"
    distributed_backend: str | None = None
    process_count: int | None = None
    node_count: int = 1

    def distribution(self) -> dict[str, Any]:
        per_node = max(1, (self.process_count or self.node_count) // max(1, self.node_count))
        return {"type": "pytorch", "process_count_per_instance": per_node}


@dataclass
class TensorflowConfiguration:
    """``tf.distribute``: TF_CONFIG for ``worker_count`` workers and ``parameter_server_count`` servers."""

    worker_count: int = 1
    parameter_server_count: int = 0

    @property
    def node_count(self) -> int:
        return self.worker_count + self.parameter_server_count

    def distribution(self) -> dict[str, Any]:
        return {
            "type": "tensorflow",
            "worker_count": self.worker_count,
            "parameter_server_count": self.parameter_server_count,
        }


DistributedConfig = MpiConfiguration | PyTorchConfiguration | TensorflowConfiguration
