"""The deployment files in cluster/: Ray's own launcher validation, KubeRay manifests, runtime env.

Expected values come from the deployment plan in cluster/README.md: a CPU head with 0 logical
CPUs, 0–2 nodes of 8 GPUs, 0–8 CPU ingest nodes, S3 through an instance profile / IRSA service
account, nothing listening publicly, no credentials in any file.
"""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.runtime_env import RuntimeEnv

from mama_ray.config import load

CLUSTER = Path(__file__).resolve().parents[2] / "cluster"

# Access key ids (long-term AKIA…, temporary ASIA…), secret/session assignments, private keys.
SECRET_PATTERNS = [
    re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    re.compile(r"(?i)aws_(secret_access_key|access_key_id|session_token)\s*[:=]"),
    re.compile(r"(?i)\bRAY_AUTH_TOKEN\s*[:=]\s*['\"]?[A-Za-z0-9+/_-]{16,}"),  # a literal, not $(…)
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
]


def secrets_in(text: str) -> list[str]:
    return [m.group(0) for p in SECRET_PATTERNS for m in p.finditer(text)]


@pytest.fixture(scope="module")
def aws() -> dict:
    return yaml.safe_load((CLUSTER / "aws.yaml").read_text())


@pytest.fixture(scope="module")
def kube() -> dict[str, list[dict]]:
    return {name: list(yaml.safe_load_all((CLUSTER / name).read_text()))
            for name in ("kuberay-raycluster.yaml", "kuberay-rayjob.yaml")}


def test_aws_yaml_passes_ray_validation(aws):
    prepared = prepare_config(copy.deepcopy(aws))  # what `ray up` does before launching
    validate_config(prepared)
    types = prepared["available_node_types"]
    assert prepared["head_node_type"] == "head"
    assert set(types) == {"head", "gpu_8x", "cpu_ingest"}
    assert types["head"]["resources"] == {"CPU": 0}
    assert types["gpu_8x"]["resources"]["GPU"] == 8
    assert (types["gpu_8x"]["min_workers"], types["gpu_8x"]["max_workers"]) == (0, 2)
    assert "GPU" not in types["cpu_ingest"]["resources"]
    assert types["cpu_ingest"]["resources"]["ingest_cpu"] == types["cpu_ingest"]["resources"]["CPU"]
    assert (types["cpu_ingest"]["min_workers"], types["cpu_ingest"]["max_workers"]) == (0, 8)
    assert prepared["max_workers"] == 2 + 8
    # Ray merged our install steps into what runs on every node.
    assert any("pip install -q -e ~/mama-ray" in c for c in prepared["worker_setup_commands"])


def test_aws_yaml_s3_through_instance_profiles_and_private_network(aws):
    for name, node in aws["available_node_types"].items():
        cfg = node["node_config"]
        assert ":instance-profile/mama-ray-" in cfg["IamInstanceProfile"]["Arn"], name
        assert cfg["SecurityGroupIds"], f"{name} would get Ray's default group (SSH from 0.0.0.0/0)"
        assert cfg["MetadataOptions"] == {"HttpTokens": "required"}, name
    head_start = " ".join(aws["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    for cmds in (aws["head_start_ray_commands"], aws["worker_start_ray_commands"]):
        assert "export RAY_AUTH_MODE=token" in " ".join(cmds)
    assert "0.0.0.0" not in (CLUSTER / "aws.yaml").read_text()


def test_ray_validation_rejects_a_broken_node_type(aws):
    broken = copy.deepcopy(aws)
    broken["available_node_types"]["gpu_8x"]["min_worker"] = 1  # typo of min_workers
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        validate_config(prepare_config(broken))


def test_no_credentials_anywhere_in_cluster_dir():
    files = [p for p in CLUSTER.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"aws.yaml", "kuberay-raycluster.yaml",
                                       "kuberay-rayjob.yaml", "runtime_env.yaml", "README.md"}
    found = {str(p.relative_to(CLUSTER)): secrets_in(p.read_text()) for p in files}
    assert {k: v for k, v in found.items() if v} == {}


def test_secret_scan_catches_planted_keys():
    planted = ("aws_access_key_id = AKIAABCDEFGHIJKLMNOP\n"
               "env: {AWS_SECRET_ACCESS_KEY: abc}\nRAY_AUTH_TOKEN=0123456789abcdef\n")
    assert len(secrets_in(planted)) == 4


def _cluster_specs(kube) -> list[dict]:
    (raycluster,) = [d for d in kube["kuberay-raycluster.yaml"] if d["kind"] == "RayCluster"]
    (rayjob,) = kube["kuberay-rayjob.yaml"]
    return [raycluster["spec"], rayjob["spec"]["rayClusterSpec"]]


def test_kuberay_manifests_kinds_and_service_account(kube):
    kinds = [d["kind"] for d in kube["kuberay-raycluster.yaml"]]
    assert kinds == ["ServiceAccount", "NetworkPolicy", "RayCluster"]
    assert [d["kind"] for d in kube["kuberay-rayjob.yaml"]] == ["RayJob"]
    sa = kube["kuberay-raycluster.yaml"][0]
    assert sa["metadata"]["name"] == "mama-ray"
    assert sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")
    for d in kube["kuberay-raycluster.yaml"] + kube["kuberay-rayjob.yaml"]:
        assert d["apiVersion"] in ("v1", "networking.k8s.io/v1", "ray.io/v1")


def test_kuberay_node_groups_and_resources(kube):
    for spec in _cluster_specs(kube):
        assert spec["authOptions"] == {"mode": "token"}
        head = spec["headGroupSpec"]
        assert head["serviceType"] == "ClusterIP"
        assert head["rayStartParams"]["num-cpus"] == "0"
        groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
        assert set(groups) == {"gpu-8x", "cpu-ingest"}
        assert (groups["gpu-8x"]["minReplicas"], groups["gpu-8x"]["maxReplicas"]) == (0, 2)
        assert (groups["cpu-ingest"]["minReplicas"], groups["cpu-ingest"]["maxReplicas"]) == (0, 8)
        gpu = groups["gpu-8x"]["template"]["spec"]["containers"][0]["resources"]
        assert gpu["limits"]["nvidia.com/gpu"] == "8" and gpu["requests"] == gpu["limits"]
        cpu = groups["cpu-ingest"]["template"]["spec"]["containers"][0]["resources"]
        assert "nvidia.com/gpu" not in cpu["limits"]
        assert "ingest_cpu" in groups["cpu-ingest"]["rayStartParams"]["resources"]
        pods = [head["template"]["spec"]] + [g["template"]["spec"] for g in groups.values()]
        assert {p["serviceAccountName"] for p in pods} == {"mama-ray"}
    raycluster, job_cluster = _cluster_specs(kube)
    assert raycluster["workerGroupSpecs"][1] == job_cluster["workerGroupSpecs"][1]


def test_rayjob_entrypoint_is_a_valid_pretrain_command(kube):
    (rayjob,) = kube["kuberay-rayjob.yaml"]
    argv = shlex.split(rayjob["spec"]["entrypoint"])
    assert argv[:2] == ["python", "/opt/mama-ray/jobs/pretrain.py"]
    config = argv[argv.index("--config") + 1]
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    cfg = load(config, sets)  # raises ConfigError on any field the job would reject
    assert config == "base"
    # The paper's 288 pairs per optimizer step on one 8-GPU node.
    assert cfg.scaling.num_workers * cfg.train.micro_batch_size * cfg.train.grad_accum == 288
    assert cfg.scaling.use_gpu and cfg.storage.run_dir.startswith("s3://")


def test_runtime_env_is_valid_and_ships_the_repo_without_secrets():
    data = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    env = RuntimeEnv(**data)  # Ray's own field/type validation
    assert env["working_dir"] == "."
    assert {".git/", ".venv/"} <= set(data["excludes"])
    assert all(isinstance(v, str) for v in data["env_vars"].values())
    assert not any(k.startswith(("AWS_", "RAY_AUTH")) for k in data["env_vars"])


def _readme_commands() -> list[list[str]]:
    """The `$SUBMIT python …` commands of cluster/README.md, continuation lines joined."""
    text = (CLUSTER / "README.md").read_text().replace("\\\n", " ")
    return [shlex.split(line.split("$SUBMIT", 1)[1].replace("$B", "s3://b/m"))
            for line in text.splitlines() if line.startswith("$SUBMIT python ")]


def test_readme_commands_match_the_jobs():
    commands = _readme_commands()
    scripts = [argv[1] for argv in commands]
    assert scripts == ["jobs/prepare_data.py", "jobs/pretrain.py", "jobs/evaluate.py",
                       "jobs/export.py", "tune/sweep.py"]
    repo = CLUSTER.parent
    for argv in commands:
        source = (repo / argv[1]).read_text()
        flags = {a for a in argv[2:] if a.startswith("--")} - {"--config", "--set"}
        assert all(f'"{f}"' in source for f in flags), (argv[1], flags)  # each is an add_argument
        if "--config" in argv:  # every override names a real field with a valid value
            sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
            load(argv[argv.index("--config") + 1], sets)
