"""The node image (docker/): built here for real from docker/Dockerfile on a Debian base with the
CPU torch (fixture `node_image`, docker/cpu-image.sh), stages run inside it through its
entrypoint, and the container runtimes' command lines (pyxis, apptainer, podman) as
cluster/container.py produces them. A Slurm job whose engine runs in the image:
tests/test_cluster.py."""

from __future__ import annotations

import json
import subprocess
import tomllib
from pathlib import Path

import pytest
from conftest import REPO, TINY_MODEL, logged_losses

from cluster.container import Container
from cluster.profiles import Profile
from engine.manifest import read_manifest


def _podman(node_image: dict, *args: str, mounts: tuple[Path, ...] = (),
            entrypoint: str | None = None) -> str:
    volumes = [f"--volume={m}:{m}" for m in mounts]
    extra = [f"--entrypoint={entrypoint}"] if entrypoint else []
    proc = subprocess.run(["podman", "run", "--rm", *node_image["podman_options"], *volumes,
                           *extra, node_image["tag"], *args],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_stages_run_in_the_built_image(node_image, tmp_path):
    """generate-corpus → train-tokenizer → tokenize → pretrain, each `podman run IMAGE STAGE`,
    on the image's own Python and torch; the labels name the version and the base."""
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    inspect = subprocess.run(["podman", "image", "inspect", node_image["tag"]],
                             capture_output=True, text=True, check=True)
    labels = json.loads(inspect.stdout)[0]["Labels"]
    assert labels["org.opencontainers.image.version"] == version
    assert labels["org.opencontainers.image.base.name"] == "localhost/lmforge-base:debian-cpu"
    where = _podman(node_image, "-c", "import engine, torch, sys; "
                    "print(engine.__file__, torch.__version__, sys.executable)",
                    entrypoint="python3")
    assert where.split() == ["/usr/local/lib/python3.11/dist-packages/engine/__init__.py",
                             "2.13.0+cpu", "/usr/bin/python3"]

    corpus, tok, data, save = (tmp_path / n for n in ("corpus", "tok", "ds", "ckpt"))
    run = [("generate-corpus", "--output", str(corpus), "--documents", "300", "--shards", "1"),
           ("train-tokenizer", "--input", str(corpus), "--output", str(tok), "--vocab-size", "512"),
           ("tokenize", "--input", str(corpus), "--output-prefix", f"{data}/stories",
            "--tokenizer", f"{tok}/tokenizer.model", "--append-eod", "--no-progress")]
    for args in run:
        _podman(node_image, *args, mounts=(tmp_path,))
    model = [f"--model.{k.replace('_', '-')}={v}" for k, v in TINY_MODEL.items()]
    out = _podman(node_image, "pretrain", "--data.blend", f"{data}/stories_text_document",
                  "--data.seq-length", "32", "--checkpoint.save", str(save), "--iters", "12",
                  "--global-batch-size", "4", "--micro-batch-size", "4", "--precision", "fp32",
                  "--log-interval", "1", "--optim.lr", "3e-3", "--optim.warmup-iters", "2",
                  *model, mounts=(tmp_path,))
    manifest = read_manifest(save)
    assert json.loads(out)["fingerprint"] == manifest.fingerprint
    assert manifest.summary["iterations"] == 12
    losses = logged_losses(save)
    assert sorted(losses) == list(range(1, 13)) and losses[12] < losses[1] - 0.3, losses


def test_runtime_command_lines():
    """pyxis: srun's documented --container-* options; apptainer and podman: the engine started
    through the image's entrypoint, the environment passed by name only, host paths left out."""
    mounts = ["/shared:/shared", "/scratch:/data:ro"]
    pyxis = Container(image="/shared/images/lmforge.sqsh", mounts=mounts, workdir="/shared")
    assert pyxis.srun_args() == ["--container-image=/shared/images/lmforge.sqsh",
                                 "--container-mounts=/shared:/shared,/scratch:/data:ro",
                                 "--container-workdir=/shared"]
    env = {"RANK": "1", "MLFLOW_TRACKING_PASSWORD": "s3cret", "PATH": "/usr/bin",
           "PYTHONPATH": "/home/me/venv", "BASH_FUNC_module%%": "() {", "NCCL_DEBUG": "WARN"}
    apptainer = Container(runtime="apptainer", image="lmforge.sif", mounts=mounts)
    app, app_env = apptainer.engine_command(env, gpus=True, name="x")
    assert app == ["apptainer", "run", "--cleanenv", "--nv", "--bind", "/shared:/shared",
                   "--bind", "/scratch:/data:ro", "lmforge.sif"]
    assert {k: v for k, v in app_env.items() if k.startswith("APPTAINERENV_")} == {
        "APPTAINERENV_RANK": "1", "APPTAINERENV_MLFLOW_TRACKING_PASSWORD": "s3cret",
        "APPTAINERENV_NCCL_DEBUG": "WARN"}
    podman, podman_env = Container(runtime="podman", image="localhost/lmforge:1", mounts=mounts,
                                   workdir="/shared", options=["--ulimit=nofile=8:8"]
                                   ).engine_command(env, gpus=False, name="lmforge-7-1-ab")
    assert podman == ["podman", "run", "--rm", "--name", "lmforge-7-1-ab", "--network=host",
                      "--ipc=host", "--volume", "/shared:/shared", "--volume", "/scratch:/data:ro",
                      "--workdir", "/shared", "--env", "RANK", "--env", "MLFLOW_TRACKING_PASSWORD",
                      "--env", "NCCL_DEBUG", "--ulimit=nofile=8:8", "localhost/lmforge:1"]
    assert podman_env == env and "s3cret" not in " ".join(podman + app)
    assert Container(runtime="apptainer", image="i", mounts=["/a:/a"]).srun_args() == []


def test_container_checks(tmp_path):
    """A runtime the executor cannot use is refused with the profile; the run folder must be
    mounted at its own path."""
    with pytest.raises(ValueError, match="pyxis is a Slurm plugin: it needs executor: slurm"):
        Profile.model_validate({"executor": "local", "container": {"image": "i"}})
    with pytest.raises(ValueError, match="executor inline runs the stage in this Python process"):
        Profile.model_validate({"executor": "inline",
                                "container": {"runtime": "podman", "image": "i"}})
    c = Container(runtime="podman", image="i", mounts=[f"{tmp_path}:{tmp_path}", "/x:/y"])
    assert c.shows(tmp_path / "jobs" / "run-1")
    assert not c.shows(Path("/x/jobs")) and not c.shows(Path("/elsewhere"))
