"""config/k8s: the Kubernetes manifests, rendered and validated offline.

* `kubectl kustomize` (the kubectl on PATH, or $KUBECTL: Debian 12's
  kubernetes-client 1.20 with kustomize v2.0.3, or a newer one) renders the
  default deployment (config/k8s) and the models-pvc overlay; the rendered
  objects carry what nzserve needs (probes, drain arithmetic, resources,
  service links off, scrape annotations, HPA policy, model volume);
* every rendered object validates against the Kubernetes API schemas
  (tests/k8s/validate.mjs: kubernetes-models + js-yaml, run by node);
* the deliberately broken manifests of tests/k8s/broken make the validator
  fail, each object for its own reason.

The npm packages (pinned in tests/k8s/package-lock.json) are installed into
tests/k8s/node_modules with `npm ci` when missing or older than the lock
file. A missing kubectl, node or npm is a failure, not a skip: `.ci/deps.sh`
installs them.
"""
import json
import os
import re
import shutil
import subprocess
import tempfile

import pytest

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
K8S = os.path.join(REPO, "config", "k8s")
TESTS_K8S = os.path.join(REPO, "tests", "k8s")
VALIDATE = os.path.join(TESTS_K8S, "validate.mjs")


def _tool(name, env=None):
    path = os.environ.get(env) if env else None
    path = path or shutil.which(name)
    if not path:
        pytest.fail(f"{name} not found on PATH: install it with `bash .ci/deps.sh` (make deps)")
    return path


@pytest.fixture(scope="module")
def kubectl():
    return _tool("kubectl", "KUBECTL")


@pytest.fixture(scope="module")
def node():
    """node, with the pinned npm packages installed under tests/k8s/node_modules."""
    node = _tool("node")
    lock = os.path.join(TESTS_K8S, "package-lock.json")
    stamp = os.path.join(TESTS_K8S, "node_modules", ".package-lock.json")
    if not os.path.exists(stamp) or os.path.getmtime(stamp) < os.path.getmtime(lock):
        npm = _tool("npm")
        env = dict(os.environ)
        if not env.get("HOME"):  # npm keeps its download cache under $HOME
            env["npm_config_cache"] = os.path.join(tempfile.gettempdir(), "nzserve-npm-cache")
        r = subprocess.run([npm, "ci", "--prefix", TESTS_K8S, "--no-audit", "--no-fund"],
                           capture_output=True, text=True, timeout=300, env=env)
        if r.returncode:
            pytest.fail(f"npm ci --prefix tests/k8s failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return node


def render(kubectl, path):
    r = subprocess.run([kubectl, "kustomize", path], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"kubectl kustomize {path} failed:\n{r.stderr}"
    return r.stdout


def validate(node, text):
    return subprocess.run([node, VALIDATE], input=text, capture_output=True, text=True, timeout=60)


def parse(node, text):
    """The rendered YAML as a list of objects (PyYAML is not a dependency: the validator's js-yaml
    parses, and hands the objects back as JSON)."""
    script = ("import { loadAll } from 'js-yaml'; import { readFileSync } from 'node:fs';"
              "process.stdout.write(JSON.stringify(loadAll(readFileSync(0, 'utf8')).filter((d) => d != null)));")
    r = subprocess.run([node, "--input-type=module", "-e", script], input=text,
                       capture_output=True, text=True, timeout=60, cwd=TESTS_K8S)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def by_kind(objs):
    out = {}
    for o in objs:
        out.setdefault(o["kind"], []).append(o)
    return out


def quantity(q):
    """A Kubernetes quantity (cpu or memory) as a float: "2", "500m", "192Mi", "1Gi", "1G"."""
    m = re.fullmatch(r"([0-9.]+)(m|Ki|Mi|Gi|Ti|k|M|G|T)?", str(q))
    assert m, f"unexpected quantity {q!r}"
    mult = {None: 1, "m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40,
            "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}[m.group(2)]
    return float(m.group(1)) * mult


def settings_keys():
    """The setting names nzserve knows (server/srv_config.c SETTINGS), as NZSERVE_* variables."""
    src = open(os.path.join(REPO, "server", "srv_config.c")).read()
    table = src[src.index("SETTINGS[] = {"):]
    table = table[:table.index("};")]
    keys = re.findall(r'\{"(\w+)", K_', table) + re.findall(r"S_(?:INT|SIZE)\((\w+),", table)
    assert "shutdown_grace_ms" in keys and "models" in keys, keys
    return {"NZSERVE_" + k.upper() for k in keys} | {"NZSERVE_CONFIG"}


@pytest.fixture(scope="module")
def default_objs(kubectl):
    return render(kubectl, K8S)


@pytest.fixture(scope="module")
def overlay_objs(kubectl):
    return render(kubectl, os.path.join(K8S, "overlays", "models-pvc"))


def container_of(dep):
    cs = dep["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in cs] == ["nzserve"]
    return cs[0]


def env_of(c):
    return {e["name"]: e.get("value") for e in c.get("env", [])}


def test_default_deployment_renders_with_what_nzserve_needs(node, default_objs):
    objs = parse(node, default_objs)
    kinds = by_kind(objs)
    assert sorted(kinds) == ["Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Service"]
    assert all(len(v) == 1 and v[0]["metadata"]["name"] == "nzserve" for v in kinds.values())
    dep, svc = kinds["Deployment"][0], kinds["Service"][0]
    hpa, pdb = kinds["HorizontalPodAutoscaler"][0], kinds["PodDisruptionBudget"][0]
    assert dep["apiVersion"] == "apps/v1" and hpa["apiVersion"] == "autoscaling/v2"
    assert pdb["apiVersion"] == "policy/v1"
    pod = dep["spec"]["template"]
    spec, c = pod["spec"], container_of(dep)
    env = env_of(c)

    # selectors: the Deployment, the Service and the PodDisruptionBudget all pick the pods
    labels = pod["metadata"]["labels"]
    for sel in (dep["spec"]["selector"]["matchLabels"], svc["spec"]["selector"],
                pdb["spec"]["selector"]["matchLabels"]):
        assert sel and sel.items() <= labels.items(), (sel, labels)
    assert "replicas" not in dep["spec"], "the HPA owns replicas"

    # the image, its port, the Service in front of it
    assert c["image"] in ("nzserve:latest", "localhost/nzserve:latest"), c["image"]
    assert c["imagePullPolicy"] == "IfNotPresent"
    (port,) = c["ports"]
    assert port == {"name": "http", "containerPort": 8080, "protocol": "TCP"}
    assert env["NZSERVE_PORT"] == "8080" and env["NZSERVE_HOST"] == "0.0.0.0"
    (sport,) = svc["spec"]["ports"]
    assert sport["targetPort"] in ("http", 8080)

    # every NZSERVE_* variable is a setting (an unknown one stops nzserve with exit 2)
    unknown = {k for k in env if k.startswith("NZSERVE_")} - settings_keys()
    assert not unknown, f"not nzserve settings: {sorted(unknown)}"

    # probes: startup and readiness on /ready (503 while models load or while draining),
    # liveness on /health
    def probe(name, path):
        p = c[name]
        assert p["httpGet"]["path"] == path and p["httpGet"]["port"] in ("http", 8080), (name, p)
        return p
    sp = probe("startupProbe", "/ready")
    probe("readinessProbe", "/ready")
    probe("livenessProbe", "/health")
    assert sp["periodSeconds"] * sp["failureThreshold"] >= 120, "slow model loads need a long startup budget"

    # shutdown: preStop sleep, then SIGTERM and a drain of shutdown_grace_ms, then up to 2 s to
    # flush the last responses: all inside terminationGracePeriodSeconds
    grace_s = int(env.get("NZSERVE_SHUTDOWN_GRACE_MS", "10000")) / 1000
    cmd = c["lifecycle"]["preStop"]["exec"]["command"]
    assert cmd[0] == "sleep" and len(cmd) == 2
    pre_stop_s = int(cmd[1])
    tgps = spec["terminationGracePeriodSeconds"]
    assert tgps > pre_stop_s + grace_s + 2, (tgps, pre_stop_s, grace_s)

    # Service links off: no NZSERVE_PORT=tcp://... injected for the Service named nzserve
    assert spec["enableServiceLinks"] is False

    # Prometheus scrape annotations name the container's port and /metrics
    ann = pod["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true"
    assert ann["prometheus.io/port"] == str(port["containerPort"])
    assert ann["prometheus.io/path"] == "/metrics"

    # resources: requests and limits for cpu and memory, requests <= limits; the compute threads
    # match the CPU limit (worker_threads 0 would mean every core of the node)
    res = c["resources"]
    for kind in ("cpu", "memory"):
        assert quantity(res["requests"][kind]) <= quantity(res["limits"][kind]), (kind, res)
    assert quantity(res["requests"]["memory"]) >= 150 * 2**20, "below the measured load-test peak (148 MiB)"
    assert int(env["NZSERVE_WORKER_THREADS"]) == quantity(res["limits"]["cpu"])

    # non-root, as the image
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == 10001
    assert c["securityContext"]["allowPrivilegeEscalation"] is False

    # HPA: the Deployment, 2..10 replicas on CPU utilisation, a slow scale-down
    hs = hpa["spec"]
    assert hs["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "nzserve"}
    assert (hs["minReplicas"], hs["maxReplicas"]) == (2, 10)
    (metric,) = hs["metrics"]
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"] == {"type": "Utilization", "averageUtilization": 70}
    assert hs["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 60


def test_models_pvc_overlay_mounts_the_model_volume(node, overlay_objs):
    kinds = by_kind(parse(node, overlay_objs))
    assert sorted(kinds) == ["Deployment", "HorizontalPodAutoscaler", "PersistentVolumeClaim",
                             "PodDisruptionBudget", "Service"]
    (pvc,) = kinds["PersistentVolumeClaim"]
    (dep,) = kinds["Deployment"]
    spec, c = dep["spec"]["template"]["spec"], container_of(dep)
    vols = {v["name"]: v for v in spec["volumes"]}
    assert vols["models"]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    (mount,) = [m for m in c["volumeMounts"] if m["name"] == "models"]
    assert mount["mountPath"] == "/models" and mount["readOnly"] is True
    env = env_of(c)
    models = env["NZSERVE_MODELS"].split(",")
    assert models and all(m.split(":", 2)[2].startswith("/models/") for m in models), models
    # the rest of the base survives the patch
    assert env["NZSERVE_SHUTDOWN_GRACE_MS"] and c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert spec["enableServiceLinks"] is False


def test_rendered_objects_validate_against_the_api_schemas(node, default_objs, overlay_objs):
    for text, n in ((default_objs, 4), (overlay_objs, 5)):
        r = validate(node, text)
        assert r.returncode == 0, f"validator failed:\n{r.stdout}\n{r.stderr}"
        assert f"validate: OK: {n} objects valid" in r.stdout, r.stdout


def test_validator_refuses_broken_manifests(kubectl, node):
    r = validate(node, render(kubectl, os.path.join(TESTS_K8S, "broken")))
    out = r.stdout
    assert r.returncode == 1, f"the broken manifests passed:\n{out}\n{r.stderr}"
    assert "validate: FAILED: 4 of 7 objects invalid" in out, out

    def failure(what, error):
        m = re.search(r"^FAIL .*: " + re.escape(what) + r"\n((?:       .*\n)+)", out, re.M)
        assert m, f"no failure for {what}:\n{out}"
        assert error in m.group(1), f"{what}: expected {error!r} in\n{m.group(1)}"

    failure("apps/v1 Deployment nzserve", "/spec/template/spec/containers/0/ports/0/containerPort must be integer")
    failure("apps/v1 Deployment no-selector", "/spec must have required property selector")
    failure("autoscaling/v2 HorizontalPodAutoscaler no-max-replicas", "/spec must have required property maxReplicas")
    failure("apps/v1 Deploymnet misspelt-kind", "unknown apiVersion/kind apps/v1 Deploymnet")
    # the valid objects of the same input still pass
    for ok in ("v1 Service nzserve", "policy/v1 PodDisruptionBudget nzserve",
               "autoscaling/v2 HorizontalPodAutoscaler nzserve"):
        assert re.search(r"^ok   .*: " + re.escape(ok) + "$", out, re.M), out


@pytest.mark.parametrize("text, rc, message", [
    ("", 1, "no Kubernetes object in the input"),
    ("apiVersion: v1\nkind: Service\nmetadata: {name: a\n", 2, "validate: <stdin>:"),
    ("apiVersion: policy/v1beta1\nkind: PodDisruptionBudget\nmetadata: {name: a}\nspec: {}\n", 1,
     "policy/v1beta1 is an alpha/beta API version"),
    ("apiVersion: v1\nkind: ConfigMap\ndata: {a: b}\n", 1, "/metadata/name is required"),
    ("- just\n- a list\n", 1, "not a YAML mapping"),
])
def test_validator_refuses_bad_input(node, text, rc, message):
    r = validate(node, text)
    assert r.returncode == rc, (r.returncode, r.stdout, r.stderr)
    assert message in r.stdout + r.stderr, (r.stdout, r.stderr)
