"""Reading the Kubernetes manifests as kustomize and the kubelet would, and turning pods into local processes.

No cluster runs here, so the tests do the cluster's part themselves, for exactly the features the
manifests use (anything else is refused, so a new feature cannot slip in untested):

- kustomize: `resources` (files and folders), `images` (newName/newTag) and `patches` (JSON patches,
  with a target by kind and name);
- `kubectl create secret generic NAME --from-file=DIR`: one key per file of DIR, base64;
- the kubelet: a container's environment from `envFrom` and `env` (values, ConfigMap and Secret keys,
  the downward API), `$(VAR)` in args replaced from it, volumes mounted at their paths;
- the cluster network: every Service name resolves to 127.0.0.1, and each container port becomes a free
  local port (other tests run at the same time), so the command's `NAME:PORT` are rewritten to
  `127.0.0.1:LOCAL`; a pod's IP (status.podIP) is 127.0.0.1 and its host name its pod name.
"""

from __future__ import annotations

import base64
import json
import os
import re
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tests.e2e.stack import free_port

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
BASE = K8S / "base"
OVERLAYS = {"gpu": K8S / "overlays" / "gpu"}
JOBS = K8S / "jobs"
KUBERNETES_VERSIONS = [
    "1.30",
    "1.33",
]  # what the manifests must be valid for (kubernetes-validate knows them)
KUSTOMIZATION_KEYS = {"apiVersion", "kind", "resources", "images", "patches"}
STAGES = {"encode": "E", "prefill": "P", "decode": "D"}  # role name -> --roles letter
KEYS_SECRET = "epd-stack-keys"  # made by `kubectl create secret generic epd-stack-keys --from-file=./keys`
_REF = re.compile(r"\$\((\w+)\)")


def load_all(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def manifest_files() -> list[Path]:
    """Every YAML file under deploy/k8s that is a Kubernetes object (kustomizations and patches are not)."""
    out = []
    for path in sorted(K8S.rglob("*.yaml")):
        if path.name == "kustomization.yaml" or path.parent in OVERLAYS.values():
            continue
        out.append(path)
    return out


def kustomization(folder: Path) -> dict:
    doc = yaml.safe_load((folder / "kustomization.yaml").read_text())
    assert set(doc) <= KUSTOMIZATION_KEYS, f"{folder}: kustomize features the tests do not model: {set(doc)}"
    assert doc["apiVersion"] == "kustomize.config.k8s.io/v1beta1" and doc["kind"] == "Kustomization"
    return doc


def build(folder: Path) -> list[dict]:
    """`kustomize build FOLDER` for the features our kustomizations use."""
    doc = kustomization(folder)
    objects: list[dict] = []
    for entry in doc.get("resources", []):
        path = (folder / entry).resolve()
        objects += build(path) if path.is_dir() else load_all(path)
    for image in doc.get("images", []):
        for container in containers_of(objects):
            name, _, tag = container["image"].partition(":")
            if name == image["name"]:
                container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag or 'latest')}"
    for patch in doc.get("patches", []):
        target = patch["target"]
        ops = yaml.safe_load((folder / patch["path"]).read_text())
        assert isinstance(ops, list), f"{patch['path']}: JSON patches only"
        matched = [o for o in objects if matches(o, target)]
        assert len(matched) == 1, f"{patch['path']} targets {len(matched)} objects"
        for op in ops:
            apply_op(matched[0], op)
    return objects


def matches(obj: dict, target: dict) -> bool:
    assert set(target) <= {"group", "version", "kind", "name"}, target
    group, _, version = obj["apiVersion"].rpartition("/")
    return (
        obj["kind"] == target["kind"]
        and obj["metadata"]["name"] == target.get("name", obj["metadata"]["name"])
        and group == target.get("group", group)
        and version == target.get("version", version)
    )


def apply_op(doc: dict, op: dict) -> None:
    """One RFC 6902 operation (add, replace, remove), in place."""
    tokens = [t.replace("~1", "/").replace("~0", "~") for t in op["path"].split("/")[1:]]
    parent = doc
    for token in tokens[:-1]:
        parent = parent[int(token)] if isinstance(parent, list) else parent[token]
    last = tokens[-1]
    kind = op["op"]
    assert kind in ("add", "replace", "remove"), op
    if isinstance(parent, list):
        index = len(parent) if last == "-" else int(last)
        if kind == "add":
            parent.insert(index, op["value"])
        elif kind == "replace":
            parent[index] = op["value"]
        else:
            del parent[index]
        return
    if kind != "add":
        assert last in parent, f"{op['path']}: nothing to {kind}"
    if kind == "remove":
        del parent[last]
    else:
        parent[last] = op["value"]


def containers_of(objects: list[dict]) -> list[dict]:
    return [
        c
        for o in objects
        if "template" in o.get("spec", {})
        for c in o["spec"]["template"]["spec"]["containers"]
    ]


def by_kind(objects: list[dict], kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def secret_from_files(name: str, folder: Path) -> dict:
    """The Secret `kubectl create secret generic NAME --from-file=FOLDER` makes: a key per file."""
    data = {
        f.name: base64.b64encode(f.read_bytes()).decode() for f in sorted(folder.iterdir()) if f.is_file()
    }
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "type": "Opaque", "data": data}


def expand(text: str, env: dict[str, str]) -> str:
    """The kubelet's `$(VAR)`: replaced when VAR is in the container's environment, else left as is."""
    return _REF.sub(lambda m: env.get(m.group(1), m.group(0)), text)


def references(text: str) -> set[str]:
    return set(_REF.findall(text))


def container_env(container: dict, objects: list[dict], pod: str) -> dict[str, str]:
    """The container's own environment, as the kubelet builds it (envFrom first, then env in order)."""
    configmaps, secrets = by_kind(objects, "ConfigMap"), by_kind(objects, "Secret")
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(configmaps[source["configMapRef"]["name"]]["data"])
        else:
            ref = secrets[source["secretRef"]["name"]]
            env.update({k: base64.b64decode(v).decode() for k, v in ref["data"].items()})
    fields = {"status.podIP": "127.0.0.1", "metadata.name": pod, "metadata.namespace": "default"}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = expand(var["value"], env)
            continue
        source = var["valueFrom"]
        if "fieldRef" in source:
            env[var["name"]] = fields[source["fieldRef"]["fieldPath"]]
        elif "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            env[var["name"]] = configmaps[ref["name"]]["data"][ref["key"]]
        else:
            ref = source["secretKeyRef"]
            if ref["name"] not in secrets and ref.get("optional"):
                continue  # an optional Secret that is not there: the variable is not set
            env[var["name"]] = base64.b64decode(secrets[ref["name"]]["data"][ref["key"]]).decode()
    return env


@dataclass
class Network:
    """Service names -> 127.0.0.1 and every container port of the stack -> a free local port."""

    services: dict[str, dict]
    pods: dict[str, dict]  # Deployment name -> its pod template
    ports: dict[tuple[str, int], int] = field(default_factory=dict)  # (deployment, containerPort) -> local

    def __post_init__(self) -> None:
        for name, template in self.pods.items():
            for container in template["spec"]["containers"]:
                for port in container.get("ports", []):
                    self.ports[(name, port["containerPort"])] = free_port()

    def backend(self, service: dict) -> str:
        """The Deployment whose pods the Service selects (exactly one here)."""
        selector = service["spec"]["selector"]
        (name,) = [n for n, t in self.pods.items() if selector.items() <= t["metadata"]["labels"].items()]
        return name

    def target(self, service: str, port: int) -> int:
        """The local port behind SERVICE:PORT."""
        svc = self.services[service]
        deployment = self.backend(svc)
        (spec,) = [p for p in svc["spec"]["ports"] if p["port"] == port]
        return self.ports[(deployment, container_port(self.pods[deployment], spec.get("targetPort", port)))]

    def rewrite(self, arg: str) -> str:
        for name, svc in self.services.items():
            for spec in svc["spec"]["ports"]:
                address = re.compile(rf"(?<![\w.-]){re.escape(name)}:{spec['port']}(?!\d)")
                arg = address.sub(f"127.0.0.1:{self.target(name, spec['port'])}", arg)
        return arg


def container_port(template: dict, port: int | str) -> int:
    """A port by number or by name, as probes and Services name them."""
    if isinstance(port, int):
        return port
    for container in template["spec"]["containers"]:
        for spec in container.get("ports", []):
            if spec.get("name") == port:
                return spec["containerPort"]
    raise AssertionError(f"no container port named {port}")


@dataclass
class LocalPod:
    deployment: str
    name: str  # its host name too
    command: list[str]
    env: dict[str, str]
    container: dict
    mounts: dict[str, str]
    network: Network

    def local(self, args: list[str]) -> list[str]:
        """A command of the container (its main one, an exec probe) as a command here."""
        own = self.container.get("ports", [])
        out = []
        for i, a in enumerate(args):
            a = expand(a, self.env).replace("{hostname}", self.name)
            for path, local in self.mounts.items():
                if a == path or a.startswith(path + "/"):
                    a = local + a[len(path) :]
            a = self.network.rewrite(a)
            if i and args[i - 1].endswith("port") and any(str(p["containerPort"]) == a for p in own):
                a = str(self.network.ports[(self.deployment, int(a))])  # the pod's own listening port
            out.append("127.0.0.1" if a == "0.0.0.0" else a)
        head = {"epd-serve": [sys.executable, "-m", "cli.main"], "python": [sys.executable]}[out[0]]
        return [*head, *out[1:]]

    def probe(self, kind: str) -> list[str] | str:
        """An exec probe as a command here, or an httpGet probe as a local URL."""
        spec = self.container[kind]
        if "exec" in spec:
            return self.local(spec["exec"]["command"])
        get = spec["httpGet"]
        template = self.network.pods[self.deployment]
        port = self.network.ports[(self.deployment, container_port(template, get["port"]))]
        return f"http://127.0.0.1:{port}{get['path']}"


def local_pods(
    objects: list[dict], model_dir: Path, scratch: Path, settings: dict[str, str]
) -> list[LocalPod]:
    """One pod per Deployment (the gateway first), runnable here: the model volume is the folder holding
    `model_dir`, Secret volumes are folders of their keys' files, `settings` change the ConfigMap (as an
    overlay would)."""
    for cm in by_kind(objects, "ConfigMap").values():
        cm["data"] = {**cm["data"], **{k: v for k, v in settings.items() if k in cm["data"]}}
    deployments = by_kind(objects, "Deployment")
    network = Network(by_kind(objects, "Service"), {n: d["spec"]["template"] for n, d in deployments.items()})
    secrets, claims = by_kind(objects, "Secret"), by_kind(objects, "PersistentVolumeClaim")
    pods = []
    for name, deployment in deployments.items():
        pod = f"{name}-0"
        spec = deployment["spec"]["template"]["spec"]
        (container,) = spec["containers"]
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        mounts = {}
        for mount in container.get("volumeMounts", []):
            volume = volumes[mount["name"]]
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims
                local = model_dir.parent
            elif "secret" in volume:
                local = scratch / pod / mount["name"]
                local.mkdir(parents=True)
                for key, value in secrets[volume["secret"]["secretName"]]["data"].items():
                    (local / key).write_bytes(base64.b64decode(value))
                    (local / key).chmod(volume["secret"].get("defaultMode", 0o644))
            else:
                assert "emptyDir" in volume, volume
                if mount["mountPath"] == "/dev/shm":
                    continue  # the host's own
                local = scratch / pod / mount["name"]
                local.mkdir(parents=True)
            mounts[mount["mountPath"]] = str(local)
        env = container_env(container, objects, pod)
        local_pod = LocalPod(name, pod, [], env, container, mounts, network)
        local_pod.command = local_pod.local([*container["command"], *container.get("args", [])])
        pods.append(local_pod)
    pods.sort(key=lambda p: p.container["args"][0] != "gateway")
    return pods


def run_env(pod: LocalPod) -> dict[str, str]:
    """What a process of the pod sees here: this machine's environment (PATH, the venv) under the pod's."""
    return {**os.environ, **pod.env}


def http_status(url: str, timeout: float = 5) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


def wait_status(url: str, status: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if http_status(url, timeout=2) == status:
            return True
        time.sleep(0.2)
    return False


def instance_counts(health_url: str) -> dict:
    with urllib.request.urlopen(health_url, timeout=5) as r:
        return json.loads(r.read())["stages"]["instances"]
