"""The seed's v1 snippets (`azureml.core`), run against a real coordinator with the imports changed."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import pytest

from shoal.core import Environment, Experiment, ScriptRunConfig, Workspace
from shoal.core.compute import AmlCompute, ComputeTarget
from shoal.core.compute_target import ComputeTargetException
from shoal.core.runconfig import MpiConfiguration, PyTorchConfiguration

RESOURCE_ID = (
    "/subscriptions/00000000-0000-0000-0000-000000000000/resourcegroups/rg/providers/"
    "Microsoft.ManagedIdentity/userAssignedIdentities/{}"
)


def test_from_config_reads_a_config_json(coordinator, workdir: Path) -> None:
    (workdir / ".azureml").mkdir()
    (workdir / ".azureml" / "config.json").write_text(
        json.dumps({"endpoint": coordinator.endpoint, "workspace_name": "lab"})
    )
    (workdir / "sub").mkdir()
    import os

    os.chdir(workdir / "sub")  # found in a folder above, as the service looks
    ws = Workspace.from_config()
    assert ws.name == "lab"
    assert ws.endpoint == coordinator.endpoint
    assert isinstance(ws.compute_targets, dict)


def test_low_priority_cluster(coordinator, unique: str) -> None:
    ws = Workspace.from_config()
    compute_config = AmlCompute.provisioning_configuration(
        vm_size="STANDARD_D2_V2", vm_priority="lowpriority", max_nodes=4
    )
    cluster = ComputeTarget.create(ws, unique, compute_config)
    cluster.wait_for_completion(show_output=True)
    assert isinstance(cluster, AmlCompute)
    status = cluster.get_status()
    assert status.vm_priority == "lowpriority"
    assert status.scale_settings["maxNodeCount"] == 4
    assert status.scale_settings["minNodeCount"] == 0
    assert status.current_node_count == 0
    found = ComputeTarget(workspace=ws, name=unique)
    assert found.vm_size.lower() == "standard_d2_v2"
    found.update(min_nodes=0, max_nodes=2, idle_seconds_before_scaledown=30)
    assert found.scale_settings["maxNodeCount"] == 2
    assert found.scale_settings["nodeIdleTimeBeforeScaleDown"] == "PT30S"
    assert unique in ws.compute_targets
    found.delete()
    with pytest.raises(ComputeTargetException) as refused:
        ComputeTarget(workspace=ws, name=unique)
    assert unique in str(refused.value)


def test_system_assigned_identity(coordinator, unique: str) -> None:
    ws = Workspace.from_config()
    compute_config = AmlCompute.provisioning_configuration(
        vm_size="STANDARD_D2_V2", max_nodes=4, identity_type="SystemAssigned"
    )
    cluster = ComputeTarget.create(ws, unique, compute_config)
    cluster.wait_for_completion(show_output=True)
    assert [i["type"] for i in cluster.identity] == ["SystemAssigned"]
    cluster.remove_identity()
    assert cluster.identity == []
    cluster.add_identity(identity_type="SystemAssigned")
    assert [i["type"] for i in cluster.identity] == ["SystemAssigned"]
    cluster.delete()


def test_user_assigned_identity(coordinator, unique: str) -> None:
    ws = Workspace.from_config()
    made = ws.create_user_assigned_identity(f"{unique}-id")
    assert made["name"] == f"{unique}-id" and made["client_id"]
    compute_config = AmlCompute.provisioning_configuration(
        vm_size="STANDARD_D2_V2",
        max_nodes=4,
        identity_type="UserAssigned",
        identity_id=[RESOURCE_ID.format(f"{unique}-id")],
    )
    cluster = ComputeTarget.create(ws, unique, compute_config)
    assert [(i["type"], i["name"]) for i in cluster.identity] == [("UserAssigned", f"{unique}-id")]
    cluster.delete()


def test_add_identity_to_an_existing_cluster(coordinator, unique: str) -> None:
    ws = Workspace.from_config()
    ws.create_user_assigned_identity(f"{unique}-late")
    cluster = ComputeTarget.create(
        ws, unique, AmlCompute.provisioning_configuration(vm_size="STANDARD_D2_V2", max_nodes=1)
    )
    assert cluster.identity == []
    cluster.add_identity(identity_type="SystemAssigned")
    cluster.add_identity(identity_type="UserAssigned", identity_id=[RESOURCE_ID.format(f"{unique}-late")])
    kinds = sorted((i["type"], i["name"]) for i in cluster.identity)
    assert ("UserAssigned", f"{unique}-late") in kinds
    assert any(kind == "SystemAssigned" for kind, _ in kinds)
    cluster.remove_identity(identity_id=[RESOURCE_ID.format(f"{unique}-late")])
    assert all(i["type"] == "SystemAssigned" for i in ComputeTarget(ws, unique).identity)
    with pytest.raises(ComputeTargetException, match="needs the identities"):
        cluster.add_identity(identity_type="UserAssigned")
    cluster.delete()


def test_bad_size_and_unknown_cluster(coordinator, unique: str, workdir: Path) -> None:
    ws = Workspace.from_config()
    with pytest.raises(ComputeTargetException) as bad:
        ComputeTarget.create(ws, unique, AmlCompute.provisioning_configuration(vm_size="STANDARD_NOPE_V9", max_nodes=1))
    assert "STANDARD_NOPE_V9" in bad.value.message and bad.value.status == 400
    with pytest.raises(ComputeTargetException) as missing:
        ComputeTarget(workspace=ws, name=f"{unique}-none")
    assert missing.value.status == 404
    (workdir / "train.py").write_text("print('never runs')\n")
    config = ScriptRunConfig(source_directory=".", script="train.py", compute_target=f"{unique}-none")
    from shoal import ShoalError

    with pytest.raises(ShoalError) as refused:
        Experiment(ws, "errors").submit(config)
    assert f"{unique}-none" in refused.value.message


def test_supported_vmsizes(coordinator) -> None:
    sizes = AmlCompute.supported_vmsizes(Workspace.from_config())
    by_name = {s["name"].lower(): s for s in sizes}
    assert by_name["standard_d2_v2"]["vCPUs"] == 2
    assert any(s["gpus"] > 0 for s in sizes)


def _cluster(ws: Workspace, name: str, max_nodes: int = 2) -> ComputeTarget:
    return ComputeTarget.create(
        ws,
        name,
        AmlCompute.provisioning_configuration(
            vm_size="STANDARD_D2_V2", max_nodes=max_nodes, idle_seconds_before_scaledown=5
        ),
    )


def test_script_run_with_logs_streamed(coordinator, unique: str, workdir: Path) -> None:
    ws = Workspace.from_config()
    cluster = _cluster(ws, unique)
    src = workdir / "src"
    src.mkdir()
    (src / "train.py").write_text(
        "import os, sys\n"
        "print('epoch 1 loss 0.5', flush=True)\n"
        "print('args', sys.argv[1:], flush=True)\n"
        "os.makedirs('outputs', exist_ok=True)\n"
        "open('outputs/model.txt', 'w').write('w=0.25\\n')\n"
    )
    (src / "big.bin").write_bytes(b"x" * 1000)
    (src / ".amlignore").write_text("big.bin\n")
    config = ScriptRunConfig(
        source_directory="src",
        script="train.py",
        arguments=["--lr", 0.1],
        compute_target=cluster,
        environment=Environment("host"),
    )
    run = Experiment(workspace=ws, name="v1-script").submit(config)
    assert run.id.startswith("job-")
    out = io.StringIO()
    details = run.wait_for_completion(show_output=True, out=out)
    text = out.getvalue()
    assert "epoch 1 loss 0.5" in text, text
    assert "args ['--lr', '0.1']" in text, text
    assert details["status"] == "Completed"
    assert run.get_status() == "Completed"
    files = run.download_files(output_directory=str(workdir / "got"))
    assert "outputs/model.txt" in files
    assert (workdir / "got" / "outputs" / "model.txt").read_text() == "w=0.25\n"
    assert "epoch 1" in (workdir / "got" / "user_logs" / "std_log.txt").read_text()


def test_ignored_files_stay_out_of_the_snapshot(coordinator, unique: str, workdir: Path) -> None:
    ws = Workspace.from_config()
    cluster = _cluster(ws, unique, max_nodes=1)
    (workdir / "keep.txt").write_text("kept\n")
    (workdir / "secret.txt").write_text("left out\n")
    (workdir / ".gitignore").write_text("secret.txt\n")
    config = ScriptRunConfig(source_directory=".", command="ls; cat keep.txt", compute_target=cluster)
    run = Experiment(ws, "v1-ignore").submit(config)
    out = io.StringIO()
    run.wait_for_completion(show_output=True, out=out)
    assert "kept" in out.getvalue()
    assert "secret.txt" not in out.getvalue()


def test_failed_run_raises_with_its_reason(coordinator, unique: str, workdir: Path) -> None:
    ws = Workspace.from_config()
    cluster = _cluster(ws, unique, max_nodes=1)
    config = ScriptRunConfig(source_directory=".", command=["sh", "-c", "echo dying; exit 3"], compute_target=cluster)
    run = Experiment(ws, "v1-fail").submit(config)
    from shoal import JobFailed

    with pytest.raises(JobFailed) as failed:
        run.wait_for_completion(show_output=False)
    assert "Failed" in failed.value.message
    assert run.get_status() == "Failed"
    assert run.wait_for_completion(raise_on_error=False)["status"] == "Failed"


def test_mpi_configuration(coordinator, unique: str, workdir: Path) -> None:
    ws = Workspace.from_config()
    cluster = _cluster(ws, unique, max_nodes=2)
    (workdir / "rank.py").write_text(
        "import os\n"
        "# One write a line: the ranks' output interleaves.\n"
        "os.write(1, f\"rank {os.environ['OMPI_COMM_WORLD_RANK']} of {os.environ['OMPI_COMM_WORLD_SIZE']}\\n\".encode())\n"
    )
    config = ScriptRunConfig(
        source_directory=".",
        script="rank.py",
        compute_target=cluster,
        distributed_job_config=MpiConfiguration(process_count_per_node=2, node_count=2),
    )
    run = Experiment(ws, "v1-mpi").submit(config)
    out = io.StringIO()
    run.wait_for_completion(show_output=True, out=out)
    for rank in range(4):
        assert f"rank {rank} of 4" in out.getvalue(), out.getvalue()
    assert run.get_details()["shoal"]["instance_count"] == 2


def test_pytorch_configuration(coordinator, unique: str, workdir: Path) -> None:
    ws = Workspace.from_config()
    cluster = _cluster(ws, unique, max_nodes=2)
    (workdir / "dist.py").write_text(
        "import os\n"
        "line = f\"torch rank {os.environ['RANK']} world {os.environ['WORLD_SIZE']} master {os.environ['MASTER_ADDR'] != ''}\\n\"\n"
        "os.write(1, line.encode())\n"
    )
    config = ScriptRunConfig(
        source_directory=".",
        script="dist.py",
        compute_target=cluster,
        distributed_job_config=PyTorchConfiguration(process_count=2, node_count=2),
    )
    run = Experiment(ws, "v1-torch").submit(config)
    out = io.StringIO()
    run.wait_for_completion(show_output=True, out=out, raise_on_error=False)
    assert run.get_status() == "Completed", out.getvalue()
    for rank in range(2):
        assert f"torch rank {rank} world 2 master True" in out.getvalue(), out.getvalue()


def test_lock_quota_nodes_and_why(coordinator, unique: str, workdir: Path) -> None:
    ws = Workspace.from_config()
    cluster = _cluster(ws, unique, max_nodes=1)
    cluster.lock("cannot-delete")
    with pytest.raises(ComputeTargetException, match="lock"):
        cluster.delete()
    cluster.unlock()
    before = {q["scope"]: q for q in ws.get_quotas()}
    after = {q["scope"]: q for q in ws.set_quota(family="standardDv2Family", cores=64)}
    assert after["family standardDv2Family"]["limit"] == 64, (before, after)
    config = ScriptRunConfig(source_directory=".", command="sleep 30", compute_target=cluster)
    run = Experiment(ws, "v1-why").submit(config)
    deadline = time.monotonic() + 30
    while run.get_status() != "Running":
        assert time.monotonic() < deadline, run.explain()
        time.sleep(0.1)
    nodes = cluster.list_nodes()
    assert len(nodes) == 1 and nodes[0]["runId"] == run.id, nodes
    assert any(run.id in line or "running" in line.lower() for line in run.explain()), run.explain()
    run.cancel()
    assert run.wait_for_completion(raise_on_error=False)["status"] == "Canceled"
    cluster.delete()
