"""The v2 names (`azure.ai.ml`) against a real coordinator."""

from __future__ import annotations

import io
import os
import textwrap
from pathlib import Path

import pytest

from shoal import JobFailed, NotFoundError, ShoalError, ValidationError
from shoal.ml import Input, MLClient, Output, command, dsl, load_compute, load_job
from shoal.ml.entities import (
    AmlCompute,
    Data,
    Environment,
    IdentityConfiguration,
    ManagedIdentityConfiguration,
    MpiDistribution,
)
from shoal.ml.parallel import RunFunction, parallel_run_function
from shoal.ml.sweep import BanditPolicy, Choice


def _cluster(ml_client: MLClient, name: str, max_instances: int = 2) -> AmlCompute:
    return ml_client.compute.begin_create_or_update(
        AmlCompute(
            name=name,
            size="STANDARD_D2_V2",
            min_instances=0,
            max_instances=max_instances,
            idle_time_before_scale_down=5,
        )
    ).result()


def test_compute_with_identity_and_delete(coordinator, unique: str) -> None:
    ml_client = MLClient.from_config()
    ml_client._connection.json("POST", "/api/v1/identities", json_body={"name": f"{unique}-id"})
    made = ml_client.compute.begin_create_or_update(
        AmlCompute(
            name=unique,
            size="STANDARD_D2_V2",
            min_instances=0,
            max_instances=3,
            tier="low_priority",
            idle_time_before_scale_down=60,
            identity=IdentityConfiguration(
                type="system_assigned,user_assigned",
                user_assigned_identities=[
                    ManagedIdentityConfiguration(
                        resource_id=f"/subscriptions/s/resourceGroups/g/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{unique}-id"
                    )
                ],
            ),
        )
    ).result(timeout=30)
    assert made.tier == "low_priority" and made.max_instances == 3
    assert made.provisioning_state == "Succeeded"
    assert sorted(i["type"] for i in made.identities or []) == ["SystemAssigned", "UserAssigned"]
    assert unique in [c.name for c in ml_client.compute.list()]
    # Again, with other bounds: an update.
    changed = ml_client.compute.begin_create_or_update(
        AmlCompute(name=unique, size="STANDARD_D2_V2", max_instances=1)
    ).result(timeout=30)
    assert changed.max_instances == 1
    ml_client.compute.begin_delete(unique).wait(timeout=30)
    with pytest.raises(NotFoundError):
        ml_client.compute.get(unique)


def test_load_compute(coordinator, unique: str, workdir: Path) -> None:
    (workdir / "compute.yml").write_text(
        f"$schema: https://azuremlschemas.azureedge.net/latest/amlCompute.schema.json\n"
        f"name: {unique}\ntype: amlcompute\nsize: STANDARD_DS3_v2\nmin_instances: 0\n"
        f"max_instances: 2\nidle_time_before_scale_down: 120\ntier: dedicated\n"
    )
    compute = load_compute("compute.yml")
    made = MLClient.from_config().compute.begin_create_or_update(compute).result(timeout=30)
    assert made.size is not None and made.size.lower() == "standard_ds3_v2"
    assert made.idle_time_before_scale_down == 120


def test_bad_size_is_refused_with_the_coordinators_message(coordinator, unique: str) -> None:
    with pytest.raises(ValidationError) as bad:
        MLClient.from_config().compute.begin_create_or_update(
            AmlCompute(name=unique, size="Standard_Huge_v0", max_instances=1)
        )
    assert "Standard_Huge_v0" in bad.value.message


def test_command_job_with_inputs_and_a_named_output(coordinator, unique: str, workdir: Path) -> None:
    ml_client = MLClient.from_config()
    _cluster(ml_client, unique)
    (workdir / "src").mkdir()
    (workdir / "src" / "train.py").write_text(
        textwrap.dedent("""
        import argparse, os, pathlib
        p = argparse.ArgumentParser()
        p.add_argument("--epochs", type=int)
        p.add_argument("--data")
        p.add_argument("--model")
        a = p.parse_args()
        rows = pathlib.Path(a.data, "rows.csv").read_text().splitlines()
        print(f"training {a.epochs} epochs on {len(rows)} rows", flush=True)
        pathlib.Path(a.model).mkdir(parents=True, exist_ok=True)
        pathlib.Path(a.model, "weights.txt").write_text(f"epochs={a.epochs} rows={len(rows)}\\n")
    """)
    )
    (workdir / "data").mkdir()
    (workdir / "data" / "rows.csv").write_text("a\nb\nc\n")
    job = command(
        code="./src",
        command="python train.py --epochs ${{inputs.epochs}} --data ${{inputs.training}} --model ${{outputs.model}}",
        inputs={"epochs": 3, "training": Input(type="uri_folder", path="./data")},
        outputs={"model": Output(type="uri_folder")},
        compute=unique,
        display_name="v2-command",
        experiment_name="v2",
    )
    submitted = ml_client.jobs.create_or_update(job)
    assert submitted.name.startswith("job-") and submitted.display_name == "v2-command"
    out = io.StringIO()
    ml_client.jobs.stream(submitted.name, out=out)
    assert "training 3 epochs on 3 rows" in out.getvalue(), out.getvalue()
    assert ml_client.jobs.get(submitted.name).status == "Completed"
    ml_client.jobs.download(submitted.name, download_path="got", output_name="model")
    assert (workdir / "got" / "named-outputs" / "model" / "weights.txt").read_text() == "epochs=3 rows=3\n"
    with pytest.raises(NotFoundError, match="model"):
        ml_client.jobs.download(submitted.name, download_path="got", output_name="nope")
    assert submitted.name in [j.name for j in ml_client.jobs.list()]


def test_job_from_yaml_with_load_job(coordinator, unique: str, workdir: Path) -> None:
    ml_client = MLClient.from_config()
    _cluster(ml_client, unique, max_instances=2)
    project = workdir / "project"
    (project / "src").mkdir(parents=True)
    (project / "src" / "hello.py").write_text("import os, sys; os.write(1, f'hello from {sys.argv[1]}\\n'.encode())\n")
    (project / "job.yml").write_text(
        textwrap.dedent(f"""
        $schema: https://azuremlschemas.azureedge.net/latest/commandJob.schema.json
        code: src
        command: python hello.py ${{{{inputs.who}}}}
        inputs:
          who: yaml
        compute: azureml:{unique}
        resources:
          instance_count: 2
        distribution:
          type: mpi
          process_count_per_instance: 1
        experiment_name: v2-yaml
    """)
    )
    os.chdir(workdir)  # the file's paths are its own folder's, wherever we are
    job = ml_client.jobs.create_or_update(load_job("project/job.yml"))
    out = io.StringIO()
    ml_client.jobs.stream(job.name, out=out)
    assert out.getvalue().count("hello from yaml") == 2, out.getvalue()


def test_unknown_cluster_and_bad_file(coordinator, workdir: Path) -> None:
    ml_client = MLClient.from_config()
    with pytest.raises(ShoalError) as unknown:
        ml_client.jobs.create_or_update(command(command="echo hi", compute="no-such-cluster"))
    assert "no-such-cluster" in unknown.value.message
    (workdir / "bad.yml").write_text("command: echo hi\ncompute: x\nresources: {instance_count: zero}\n")
    with pytest.raises(ValidationError) as bad:
        ml_client.jobs.create_or_update(load_job("bad.yml"))
    assert "instance_count" in bad.value.message
    with pytest.raises(ValidationError, match="does not exist"):
        ml_client.jobs.create_or_update(command(command="ls", code="./missing", compute="x"))


def test_failed_job_stream_raises(coordinator, unique: str) -> None:
    ml_client = MLClient.from_config()
    _cluster(ml_client, unique, max_instances=1)
    job = ml_client.jobs.create_or_update(command(command="echo bye; exit 2", compute=unique))
    with pytest.raises(JobFailed, match="Failed"):
        ml_client.jobs.stream(job.name, out=io.StringIO())


def test_cancel(coordinator, unique: str) -> None:
    ml_client = MLClient.from_config()
    _cluster(ml_client, unique, max_instances=1)
    job = ml_client.jobs.create_or_update(command(command="sleep 300", compute=unique))
    ml_client.jobs.begin_cancel(job.name).result(timeout=60)
    assert ml_client.jobs.get(job.name).status == "Canceled"


def test_pipeline_with_dsl(coordinator, unique: str, workdir: Path) -> None:
    ml_client = MLClient.from_config()
    _cluster(ml_client, unique)
    (workdir / "steps").mkdir()
    (workdir / "steps" / "prep.py").write_text(
        "import sys, pathlib\nout = pathlib.Path(sys.argv[2]); out.mkdir(parents=True, exist_ok=True)\n"
        "(out / 'clean.txt').write_text(sys.argv[1].upper())\n"
    )
    (workdir / "steps" / "train.py").write_text(
        "import sys, pathlib\ntext = (pathlib.Path(sys.argv[1]) / 'clean.txt').read_text()\n"
        "out = pathlib.Path(sys.argv[2]); out.mkdir(parents=True, exist_ok=True)\n"
        "(out / 'model.txt').write_text(f'trained on {text}')\n"
    )
    prep = command(
        code="./steps",
        command="python prep.py ${{inputs.word}} ${{outputs.clean}}",
        inputs={"word": Input(type="string")},
        outputs={"clean": Output(type="uri_folder")},
    )
    train = command(
        code="./steps",
        command="python train.py ${{inputs.data}} ${{outputs.model}}",
        inputs={"data": Input(type="uri_folder")},
        outputs={"model": Output(type="uri_folder")},
    )

    @dsl.pipeline(compute=unique, description="prep then train")
    def two_steps(word: str) -> dict[str, object]:
        prep_step = prep(word=word)
        train_step = train(data=prep_step.outputs.clean)
        return {"final": train_step.outputs.model}

    pipeline_job = two_steps(word="shoal")
    doc = pipeline_job.to_job(workdir)
    assert set(doc["jobs"]) == {"prep_step", "train_step"}
    assert doc["jobs"]["train_step"]["inputs"]["data"] == "${{parent.jobs.prep_step.outputs.clean}}"
    submitted = ml_client.jobs.create_or_update(pipeline_job, experiment_name="v2-pipeline")
    assert submitted.type == "pipeline"
    ml_client.jobs.stream(submitted.name, out=io.StringIO())
    steps = list(ml_client.jobs.list(parent_job_name=submitted.name))
    assert sorted(s.status for s in steps) == ["Completed", "Completed"]
    ml_client.jobs.download(submitted.name, download_path="got", output_name="final")
    assert (workdir / "got" / "named-outputs" / "final" / "model.txt").read_text() == "trained on SHOAL"


def test_sweep(coordinator, unique: str, workdir: Path) -> None:
    python = os.environ.get("SHOAL_TEST_PYTHON")
    if not python:
        pytest.fail("SHOAL_TEST_PYTHON (the venv with mlflow, scripts/test-venv.sh) is not set")
    ml_client = MLClient.from_config()
    _cluster(ml_client, unique)
    (workdir / "trial.py").write_text(
        "import sys, mlflow\nlr = float(sys.argv[1])\n"
        "with mlflow.start_run():\n    mlflow.log_metric('accuracy', 1 - abs(lr - 0.1))\n"
    )
    trial = command(
        code=".",
        command=f"{python} trial.py ${{{{inputs.lr}}}}",
        inputs={"lr": 0.5},
        compute=unique,
    )
    sweep_job = trial(lr=Choice([0.01, 0.1, 0.5])).sweep(
        primary_metric="accuracy",
        goal="maximize",
        sampling_algorithm="grid",
        early_termination_policy=BanditPolicy(slack_factor=0.2, evaluation_interval=1),
    )
    sweep_job.set_limits(max_total_trials=3, max_concurrent_trials=2)
    submitted = ml_client.jobs.create_or_update(sweep_job, experiment_name="v2-sweep")
    assert submitted.type == "sweep"
    ml_client.jobs.stream(submitted.name, out=io.StringIO())
    done = ml_client.jobs.get(submitted.name)
    assert done.status == "Completed", done.raw
    sweep = done.raw["sweep"]
    trials = list(ml_client.jobs.list(parent_job_name=submitted.name))
    assert len(trials) == 3
    best = sweep["best_trial"]
    from shoal.core import Experiment, Workspace
    from shoal.core.run import Run

    assert Run(Experiment(Workspace.from_config(), "v2-sweep"), best).get_metrics()["accuracy"] == 1.0


def test_parallel_run_function(coordinator, unique: str, workdir: Path) -> None:
    ml_client = MLClient.from_config()
    _cluster(ml_client, unique)
    (workdir / "files").mkdir()
    for i in range(6):
        (workdir / "files" / f"{i}.txt").write_text(str(i))
    (workdir / "score").mkdir()
    (workdir / "score" / "score.py").write_text(
        textwrap.dedent("""
        import pathlib
        def init():
            pass
        def run(mini_batch):
            return [f"{pathlib.Path(f).name} {int(pathlib.Path(f).read_text()) * 2}" for f in mini_batch]
    """)
    )
    job = parallel_run_function(
        inputs={"files": Input(type="uri_folder", path="./files")},
        outputs={"scores": Output(type="uri_folder")},
        input_data="${{inputs.files}}",
        instance_count=2,
        mini_batch_size="2",
        task=RunFunction(code="./score", entry_script="score.py", append_row_to="${{outputs.scores}}/rows.txt"),
        compute=unique,
    )
    submitted = ml_client.jobs.create_or_update(job)
    ml_client.jobs.stream(submitted.name, out=io.StringIO())
    ml_client.jobs.download(submitted.name, download_path="got", output_name="scores")
    rows = sorted((workdir / "got" / "named-outputs" / "scores" / "rows.txt").read_text().split("\n"))
    assert [r for r in rows if r] == sorted(f"{i}.txt {i * 2}" for i in range(6))


def test_data_asset_from_a_local_folder(coordinator, unique: str, workdir: Path) -> None:
    ml_client = MLClient.from_config()
    _cluster(ml_client, unique, max_instances=1)
    (workdir / "corpus").mkdir()
    (workdir / "corpus" / "a.txt").write_text("alpha\n")
    made = ml_client.data.create_or_update(Data(name=f"{unique}-corpus", version="1", path="./corpus"))
    assert made.version == "1"
    assert ml_client.data.get(f"{unique}-corpus", version="1").name == f"{unique}-corpus"
    job = ml_client.jobs.create_or_update(
        command(
            command="cat ${{inputs.corpus}}/a.txt",
            inputs={"corpus": Input(type="uri_folder", path=f"azureml:{unique}-corpus:1")},
            compute=unique,
        )
    )
    out = io.StringIO()
    ml_client.jobs.stream(job.name, out=out)
    assert "alpha" in out.getvalue()


def test_environment_registered_and_used(coordinator, unique: str) -> None:
    ml_client = MLClient.from_config()
    made = ml_client.environments.create_or_update(
        Environment(name=f"{unique}-env", version="1", image="shoal/base:latest")
    )
    assert made.name == f"{unique}-env" and made.version == "1"
    assert ml_client.environments.get(f"{unique}-env").version == "1"
    with pytest.raises(NotFoundError):
        ml_client.environments.get(f"{unique}-none")


def test_mpi_distribution_object(coordinator, unique: str) -> None:
    ml_client = MLClient.from_config()
    _cluster(ml_client, unique)
    job = ml_client.jobs.create_or_update(
        command(
            command="echo rank $OMPI_COMM_WORLD_RANK",
            compute=unique,
            instance_count=2,
            distribution=MpiDistribution(process_count_per_instance=1),
        )
    )
    out = io.StringIO()
    ml_client.jobs.stream(job.name, out=out)
    assert "rank 0" in out.getvalue() and "rank 1" in out.getvalue()
