"""cluster.yaml and k8s/: validated the way `ray up` validates, without AWS and without a cluster.

`ray up` (ray.autoscaler._private.commands._bootstrap_config) runs ``prepare_config`` (merge with
Ray's aws/defaults.yaml, merge setup commands, per-type min/max workers), then asks AWS for the
instance types' resources, then ``validate_config`` (Ray's ray-schema.json plus its cross-field
checks). Here the same two Ray functions run with the AWS step left out, which is why every node
type declares its ``resources``. Each check has a negative control: a broken copy must fail it.
"""

from __future__ import annotations

import copy
import re
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
CLUSTER_YAML = REPO / "cluster.yaml"
K8S = REPO / "k8s"
PROJECT_PATHS = ("~/orchestrator", "$HOME/orchestrator")

# vCPUs and GPUs of the instance types the file uses, for the resources cross-check. An
# InstanceType missing here is not checked (Ray detects it from AWS at `ray up`).
INSTANCE_TYPES = {"m5.2xlarge": (8, 0), "m5.4xlarge": (16, 0), "g5.xlarge": (4, 1)}


def _cluster() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def _ray_up_validate(config: dict) -> dict:
    """The schema and consistency checks `ray up` applies, minus the calls to AWS."""
    from ray.autoscaler._private.util import check_legacy_fields, prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    check_legacy_fields(prepared)  # bootstrap_aws's first step: node types + head type given
    return prepared


def _pyproject_ray_pin() -> str:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = [m.group(1) for d in deps if (m := re.fullmatch(r"ray(?:\[[^\]]*\])?==([\w.]+)", d.strip()))]
    assert len(pins) == 1, f"expected one exact ray pin in pyproject.toml, got {deps}"
    return pins[0]


# --- (a)/(b) Ray's validator -----------------------------------------------------------------


def test_cluster_yaml_passes_rays_validator():
    prepared = _ray_up_validate(_cluster())
    types = prepared["available_node_types"]
    assert prepared["provider"]["type"] == "aws" and prepared["provider"]["region"]
    assert prepared["provider"]["cache_stopped_nodes"] is False
    assert prepared["idle_timeout_minutes"] == 5 and prepared["auth"]["ssh_user"] == "ubuntu"
    assert set(types) == {"head", "cpu_worker", "gpu_worker"} and prepared["head_node_type"] == "head"
    assert types["head"]["max_workers"] == 0 and types["head"]["resources"] == {"CPU": 0}
    assert types["cpu_worker"]["min_workers"] == 0 and types["cpu_worker"]["max_workers"] == 16
    assert types["gpu_worker"]["min_workers"] == 0 and types["gpu_worker"]["max_workers"] == 4
    assert types["gpu_worker"]["resources"].get("GPU", 0) >= 1
    assert prepared["max_workers"] >= sum(t["max_workers"] for t in types.values())


@pytest.mark.parametrize("mutate", [
    pytest.param(lambda c: c["available_node_types"]["cpu_worker"].update(min_worker=1), id="misspelled-min_worker"),
    pytest.param(lambda c: c.update(max_workers="many"), id="max_workers-not-int"),
    pytest.param(lambda c: c.update(idle_timeout_minute=5), id="misspelled-top-level-key"),
    pytest.param(lambda c: c["available_node_types"]["gpu_worker"].pop("resources"), id="resources-missing"),
    pytest.param(lambda c: c["available_node_types"]["gpu_worker"]["resources"].update(GPU=0.5), id="fractional-GPU"),
    pytest.param(lambda c: c.update(head_node_type="ray.head.default"), id="unknown-head-type"),
    pytest.param(lambda c: c["available_node_types"]["cpu_worker"].update(min_workers=30), id="min-above-max_workers"),
])
def test_rays_validator_rejects_broken_copies(mutate):
    import jsonschema

    broken = _cluster()
    mutate(broken)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        _ray_up_validate(broken)


def test_node_resources_match_instance_types():
    for name, node in _cluster()["available_node_types"].items():
        instance = node["node_config"]["InstanceType"]
        if name == "head" or instance not in INSTANCE_TYPES:
            continue
        cpus, gpus = INSTANCE_TYPES[instance]
        assert node["resources"].get("CPU") == cpus, f"{name}: {instance} has {cpus} vCPUs"
        assert node["resources"].get("GPU", 0) == gpus, f"{name}: {instance} has {gpus} GPUs"


def test_every_node_type_names_an_image_and_an_instance_role():
    image = re.compile(r"ami-[0-9a-f]{8,17}|resolve:ssm:/aws/service/\S+")
    for name, node in _cluster()["available_node_types"].items():
        cfg = node["node_config"]
        assert image.fullmatch(cfg.get("ImageId", "")), f"{name}: ImageId {cfg.get('ImageId')!r}"
        assert set(cfg.get("IamInstanceProfile", {})) & {"Name", "Arn"}, f"{name}: no IamInstanceProfile"


# --- (c) no credentials ----------------------------------------------------------------------

_CREDENTIAL_PATTERNS = [
    re.compile(r"aws_secret_access_key|aws_session_token", re.IGNORECASE),
    re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),  # access key ids
    # a 40-character secret: base64-ish run with upper, lower and a digit
    re.compile(r"(?<![A-Za-z0-9/+=])(?=[A-Za-z0-9/+=]{0,39}[0-9])(?=[A-Za-z0-9/+=]{0,39}[A-Z])"
               r"(?=[A-Za-z0-9/+=]{0,39}[a-z])[A-Za-z0-9/+=]{40}(?![A-Za-z0-9/+=])"),
]
_SECRET_KEY = re.compile(r"secret|password|passwd|token|access_?key|credential", re.IGNORECASE)


def _credential_findings(text: str) -> list[str]:
    found = [m.group(0) for p in _CREDENTIAL_PATTERNS for m in p.finditer(text)]

    def walk(node, path):
        if isinstance(node, dict):
            for k, v in node.items():
                if _SECRET_KEY.search(str(k)) and v not in (None, "", {}, []):
                    found.append(f"{path}{k}")
                if k == "name" and _SECRET_KEY.search(str(v)) and "value" in node:  # k8s env entry
                    found.append(f"{path}env {v}")
                walk(v, f"{path}{k}.")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{path}{i}.")

    for doc in yaml.safe_load_all(text):
        walk(doc, "")
    return found


def _config_files() -> list[Path]:
    return [CLUSTER_YAML, *sorted(K8S.glob("*.yaml")), K8S / "Dockerfile"]


@pytest.mark.parametrize("path", _config_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_no_credentials_in_config_files(path):
    text = path.read_text()
    if path.suffix != ".yaml":  # the Dockerfile: patterns only
        assert not [m.group(0) for p in _CREDENTIAL_PATTERNS for m in p.finditer(text)]
        return
    assert _credential_findings(text) == []


@pytest.mark.parametrize("leak", [
    "provider:\n  type: aws\n  aws_credentials:\n    aws_access_key_id: x\n",
    "setup_commands:\n  - export AWS_SECRET_ACCESS_KEY=abc\n",
    "env:\n  - name: AWS_ACCESS_KEY_ID\n    value: " + "AKIA" + "Z" * 16 + "\n",
    "x: " + "wJalrXUtnFEMI/K7MDENG/" + "bPxRfiCY" + "EXAMPLEKEY" + "\n",  # AWS's documented sample
])
def test_credential_scan_catches_leaks(leak):
    assert _credential_findings(leak)


# --- (d) k8s manifests -----------------------------------------------------------------------


def _images(node) -> list[str]:
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == "image"] + [i for v in node.values() for i in _images(v)]
    if isinstance(node, list):
        return [i for v in node for i in _images(v)]
    return []


def _k8s_problems(docs: dict[str, list[dict]], ray_version: str) -> list[str]:
    problems = []
    expected = {"raycluster.yaml": "RayCluster", "rayjob.yaml": "RayJob"}
    for name, kind in expected.items():
        if name not in docs:
            problems.append(f"{name} missing")
            continue
        got = [(d.get("apiVersion"), d.get("kind")) for d in docs[name]]
        if got != [("ray.io/v1", kind)]:
            problems.append(f"{name}: {got}")
    cluster = docs.get("raycluster.yaml", [{}])[0].get("spec", {})
    if cluster.get("rayVersion") != ray_version:
        problems.append(f"rayVersion {cluster.get('rayVersion')!r}")
    if cluster.get("enableInTreeAutoscaling") is not True:
        problems.append("autoscaling off")
    if cluster.get("headGroupSpec", {}).get("rayStartParams", {}).get("num-cpus") != "0":
        problems.append("head num-cpus is not '0'")
    for group in cluster.get("workerGroupSpecs", []) or [{}]:
        lo, hi = group.get("minReplicas"), group.get("maxReplicas")
        if not (isinstance(lo, int) and isinstance(hi, int) and 0 <= lo < hi):
            problems.append(f"worker group {group.get('groupName')}: minReplicas {lo}, maxReplicas {hi}")
    images = [i for d in docs.values() for doc in d for i in _images(doc)]
    if not images:
        problems.append("no image")
    problems += [f"image {i}" for i in images if i != f"rayproject/ray:{ray_version}-py311"]
    return problems


def _k8s_docs() -> dict[str, list[dict]]:
    return {p.name: list(yaml.safe_load_all(p.read_text())) for p in sorted(K8S.glob("*.yaml"))}


def test_k8s_manifests_parse_with_expected_kinds_and_ray_version():
    import ray

    assert _k8s_problems(_k8s_docs(), ray.__version__) == []
    job = _k8s_docs()["rayjob.yaml"][0]["spec"]
    assert "jobs/train.py --config" in job["entrypoint"] and "configs/street_torch.yaml" in job["entrypoint"]
    assert job["clusterSelector"]["ray.io/cluster"] == _k8s_docs()["raycluster.yaml"][0]["metadata"]["name"]


@pytest.mark.parametrize("mutate", [
    pytest.param(lambda d: d["raycluster.yaml"][0].update(apiVersion="ray.io/v1alpha1"), id="old-apiVersion"),
    pytest.param(lambda d: d["rayjob.yaml"][0].update(kind="RayService"), id="wrong-kind"),
    pytest.param(lambda d: d["raycluster.yaml"][0]["spec"].update(enableInTreeAutoscaling=False), id="no-autoscaling"),
    pytest.param(lambda d: d["raycluster.yaml"][0]["spec"]["workerGroupSpecs"][0].update(maxReplicas=0),
                 id="max-replicas-0"),
    pytest.param(lambda d: d["raycluster.yaml"][0]["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
                 .update(image="rayproject/ray:2.9.0-py311"), id="stale-image"),
])
def test_k8s_checks_reject_broken_copies(mutate):
    import ray

    docs = _k8s_docs()
    mutate(docs)
    assert _k8s_problems(docs, ray.__version__)


def test_dockerfile_builds_on_the_same_ray_and_installs_the_project():
    import ray

    lines = [ln.strip() for ln in (K8S / "Dockerfile").read_text().splitlines()]
    assert [ln for ln in lines if ln.startswith("FROM ")] == [f"FROM rayproject/ray:{ray.__version__}-py311"]
    assert any(ln.startswith("RUN pip install") and ".[torch]" in ln for ln in lines)


# --- (e) setup installs this project with the pinned Ray ------------------------------------


def test_setup_installs_this_project_with_the_pinned_ray():
    import ray

    pin = _pyproject_ray_pin()
    assert pin == ray.__version__, "the local `ray` CLI must match the cluster's Ray"
    prepared = _ray_up_validate(_cluster())
    remote = [r for r, local in prepared["file_mounts"].items() if local == "."]
    assert remote and remote[0] in PROJECT_PATHS, prepared["file_mounts"]
    for key in ("head_setup_commands", "worker_setup_commands"):  # after Ray merged setup_commands
        installs = [c for c in prepared[key] if "pip install" in c]
        assert any(re.search(r"-e [\"']?(?:~|\$HOME)/orchestrator\[torch\]", c) for c in installs), installs
        ray_pins = {m.group(1) for c in installs for m in re.finditer(r"ray(?:\[[^\]]*\])?==([\w.]+)", c)}
        assert ray_pins == {pin}, (key, ray_pins)
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    wanted = re.search(r">=\s*(\d+\.\d+)", requires).group(1)
    assert any(f"--python {wanted}" in c for c in prepared["setup_commands"]), "venv Python != requires-python"


def test_checkout_copy_leaves_out_the_virtualenv():
    config = _cluster()
    assert ".gitignore" in config.get("rsync_filter", [])
    assert ".venv" in config.get("rsync_exclude", [])
    assert ".venv/" in (REPO / ".gitignore").read_text().splitlines()
