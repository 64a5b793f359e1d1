"""The cluster files parse and pass the checks their tools would run (offline, no cloud, no Ray start)."""
from __future__ import annotations

import pathlib
import re

import pytest
import yaml

REPO = pathlib.Path(__file__).resolve().parents[1]
KUBERAY = REPO / "cluster" / "kuberay"


def load(path: pathlib.Path):
    with open(path) as f:
        return yaml.safe_load(f)


@pytest.fixture(scope="module")
def launcher_config() -> dict:
    return load(REPO / "ray-cluster.yaml")


def test_ray_cluster_yaml_passes_rays_own_schema(launcher_config):
    pytest.importorskip("jsonschema")
    # Private API, but exactly what `ray up` runs before any cloud call (RAY_NOTES.md); importing it
    # starts nothing.
    from ray.autoscaler._private.util import prepare_config, validate_config
    prepared = prepare_config(launcher_config)
    validate_config(prepared)
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_ray_cluster_yaml_trains_on_gpu_workers_only(launcher_config):
    types = launcher_config["available_node_types"]
    head = types[launcher_config["head_node_type"]]
    assert head["resources"].get("CPU") == 0  # nothing schedulable on the head
    gpu = [t for name, t in types.items() if t["resources"].get("GPU", 0) >= 1]
    assert gpu and all(t["min_workers"] == 0 and t["max_workers"] >= 1 for t in gpu)
    assert launcher_config["provider"]["cache_stopped_nodes"] is True
    assert launcher_config["auth"]["ssh_user"] == "ubuntu"
    assert launcher_config["idle_timeout_minutes"] > 0 and launcher_config["max_workers"] >= 1


def test_ray_cluster_yaml_installs_this_repo_from_its_file_mount(launcher_config):
    (remote, local), = launcher_config["file_mounts"].items()
    assert local == "."
    setup = " && ".join(launcher_config["setup_commands"])
    assert "torch" in setup and f"cd {remote}" in setup and "pip install -q -e ." in setup
    assert ".venv" in launcher_config["rsync_exclude"]


def _start_commands(config: dict) -> list[str]:
    cmds = list(config.get("head_start_ray_commands", [])) + list(config.get("worker_start_ray_commands", []))
    return [c for c in cmds if "ray start" in c]


def test_dashboard_never_listens_on_all_interfaces(launcher_config):
    starts = _start_commands(launcher_config)
    head = [c for c in starts if "--head" in c]
    assert head, "no `ray start --head` command"
    for cmd in starts:
        assert "0.0.0.0" not in cmd, cmd
    for cmd in head:
        assert re.search(r"--dashboard-host[= ]127\.0\.0\.1\b", cmd), cmd
    # Nothing else in the file opens it either (comments aside).
    assert "0.0.0.0" not in yaml.safe_dump(launcher_config)


def _manifests() -> dict[str, list[dict]]:
    out = {}
    for path in sorted(KUBERAY.glob("*.yaml")):
        with open(path) as f:
            out[path.name] = [d for d in yaml.safe_load_all(f) if d is not None]
    return out


def test_kuberay_manifests_are_complete_objects():
    manifests = _manifests()
    kinds = {doc["kind"]: doc for docs in manifests.values() for doc in docs}
    assert {"RayCluster", "RayJob"} <= set(kinds)
    for name, docs in manifests.items():
        for doc in docs:
            assert doc["apiVersion"] == "ray.io/v1", name
            assert doc["metadata"]["name"], name
            assert isinstance(doc["spec"], dict) and doc["spec"], name


def _cluster_specs() -> list[dict]:
    specs = []
    for docs in _manifests().values():
        for doc in docs:
            if doc["kind"] == "RayCluster":
                specs.append(doc["spec"])
            elif doc["kind"] == "RayJob" and "rayClusterSpec" in doc["spec"]:
                specs.append(doc["spec"]["rayClusterSpec"])
    return specs


def test_kuberay_dashboards_are_cluster_internal():
    for spec in _cluster_specs():
        head = spec["headGroupSpec"]
        assert head["serviceType"] == "ClusterIP"
        assert not head.get("enableIngress", False)
        assert str(head["rayStartParams"].get("num-cpus")) == "0"  # no training on the head
        assert head["template"]["spec"]["containers"][0]["image"]
        for group in spec["workerGroupSpecs"]:
            limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
            assert str(limits["nvidia.com/gpu"]) == "1"
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


def test_rayjob_runs_raytrainer_fit_with_a_shipped_config():
    (job,) = [d for docs in _manifests().values() for d in docs if d["kind"] == "RayJob"]
    entrypoint = job["spec"]["entrypoint"]
    assert entrypoint.startswith("raytrainer fit --config ")
    for config in re.findall(r"--config (\S+)", entrypoint):
        assert (REPO / config).is_file(), config
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert runtime_env["working_dir"] and "AWS_SECRET_ACCESS_KEY" not in runtime_env.get("env_vars", {})
    assert job["spec"]["shutdownAfterJobFinishes"] is True


def test_runtime_env_parses_and_holds_no_secrets():
    env = load(REPO / "cluster" / "runtime_env.yaml")
    assert env["working_dir"] == "."
    assert ".venv/" in env["excludes"]
    assert env["env_vars"]["AWS_DEFAULT_REGION"]
    assert all(isinstance(v, str) for v in env["env_vars"].values())  # Ray requires string values
    for key in env["env_vars"]:
        assert not re.search(r"SECRET|ACCESS_KEY|TOKEN|PASSWORD", key), key
    text = (REPO / "cluster" / "runtime_env.yaml").read_text()
    assert not re.search(r"AKIA[0-9A-Z]{12,}", text)


def test_readmes_show_the_submit_commands():
    cluster = (REPO / "cluster" / "README.md").read_text()
    for cmd in ("ray up ray-cluster.yaml", "ray dashboard ray-cluster.yaml", "ray job submit --working-dir . --",
                "ray job logs", "ray down ray-cluster.yaml", "--runtime-env-json", "cluster/runtime_env.yaml"):
        assert cmd in cluster, cmd
    examples = (REPO / "examples" / "README.md").read_text()
    for config in (REPO / "examples" / "configs").glob("*.yaml"):
        assert f"examples/configs/{config.name}" in examples, config.name
