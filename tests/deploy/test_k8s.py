"""The Kubernetes manifests (deploy/k8s): every object is valid for the Kubernetes API (offline, against
its OpenAPI schemas), the base and its gpu overlay build, the commands are ones `epd-serve` accepts, and
the very commands the pods run, with the environment, volumes and probes the manifests give them, bring up
a stack that answers, gateway and stages told only each other's Service names (no cluster here: see
k8s_manifests.py for what stands in for it)."""

from __future__ import annotations

import base64
import copy
import re
import signal
import subprocess
import time
from pathlib import Path

import kubernetes_validate
import openai
import pytest

from cli.main import build_parser
from cli.main import main as epd_serve
from common.stack_keys import KEY_FILE
from gateway.instance_metrics import QUEUE_DEPTH
from tests.deploy.k8s_manifests import (
    BASE,
    JOBS,
    K8S,
    KEYS_SECRET,
    KUBERNETES_VERSIONS,
    OVERLAYS,
    STAGES,
    build,
    by_kind,
    container_env,
    container_port,
    containers_of,
    expand,
    http_status,
    instance_counts,
    kustomization,
    load_all,
    local_pods,
    manifest_files,
    references,
    run_env,
    secret_from_files,
    wait_status,
)
from tests.e2e.conftest import image_message
from tests.reference import make_image

ROOT = K8S.parents[1]
QUANTITY = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([KMGTPE]i|[mkMGTPE]|[eE][+-]?\d+)?")
GATEWAY, CONTROL, HTTP = "epd-gateway", "epd-gateway-control", 8000


def make_keys(folder: Path) -> Path:
    """`epd-serve keys DIR`, the real command."""
    assert epd_serve(["keys", str(folder)]) == 0
    return folder


def base_objects() -> list[dict]:
    return build(BASE)


def deployments(objects: list[dict]) -> dict[str, dict]:
    return by_kind(objects, "Deployment")


def container(deployment: dict) -> dict:
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    return c


def arg(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def stage_deployments(objects: list[dict]) -> dict[str, dict]:
    return {name: d for name, d in deployments(objects).items() if container(d)["args"][0] == "serve"}


# --- the files and the schema -----------------------------------------------------------------------


def test_the_base_names_every_file_and_the_image_is_the_compose_one():
    listed = set(kustomization(BASE)["resources"])
    assert listed == {p.name for p in BASE.glob("*.yaml")} - {"kustomization.yaml"}, "a file left out"
    for overlay in OVERLAYS.values():
        doc = kustomization(overlay)
        used = {p["path"] for p in doc["patches"]}
        assert used == {p.name for p in overlay.glob("*.yaml")} - {"kustomization.yaml"}
    dockerfile = (ROOT / "compose" / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["epd-serve"]' in dockerfile
    for path in manifest_files():
        for doc in load_all(path):
            if "template" in doc.get("spec", {}):
                for c in doc["spec"]["template"]["spec"]["containers"]:
                    assert c["image"] == "epd-serve:latest" and c["command"] == ["epd-serve"], path


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(K8S)))
def test_every_manifest_is_valid_kubernetes(path, version):
    docs = load_all(path)
    assert docs, path
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)  # raises with the schema's complaint


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("folder", [BASE, *OVERLAYS.values()], ids=lambda p: p.name)
def test_every_built_object_is_valid_kubernetes(folder, version, tmp_path):
    objects = build(folder) + [secret_from_files(KEYS_SECRET, make_keys(tmp_path / "keys"))]
    names = [(o["kind"], o["metadata"]["name"]) for o in objects]
    assert len(names) == len(set(names)), "two objects of one kind and name"
    for obj in objects:
        kubernetes_validate.validate(obj, version, strict=True)
    for c in containers_of(objects):  # the schema takes any string as a quantity; the API server does not
        for amounts in c["resources"].values():
            for resource, amount in amounts.items():
                assert QUANTITY.fullmatch(str(amount)), f"{c['name']}: {resource}: {amount!r} is no quantity"


# --- what the objects say ---------------------------------------------------------------------------


def test_every_command_and_exec_probe_is_an_epd_serve_command_that_parses():
    parser = build_parser()
    objects = base_objects()
    job_objects = [o for p in JOBS.glob("*.yaml") for o in load_all(p)]
    pods = [*deployments(objects).items(), *by_kind(job_objects, "Job").items()]
    assert {name for name, _ in pods} == {GATEWAY, "epd-tiny-model", *(f"epd-{r}" for r in STAGES)}
    for name, obj in pods:
        c = container(obj)
        env = container_env(c, objects, f"{name}-0")
        commands = [[*c["command"], *c["args"]]]
        commands += [c[p]["exec"]["command"] for p in ("startupProbe", "readinessProbe", "livenessProbe")
                     if "exec" in c.get(p, {})]  # fmt: skip
        for cmd in commands:
            missing = {v for a in cmd for v in references(a)} - set(env)
            assert not missing, f"{name}: the kubelet would leave $({missing.pop()}) unexpanded"
            if cmd[0] == "epd-serve":
                # the real parser, with the values the pod gets (a pod IP for status.podIP)
                args = parser.parse_args([expand(a, {**env, "POD_IP": "10.1.2.3"}) for a in cmd[1:]])
                if args.command in ("serve", "gateway"):
                    assert args.keys == "/keys" and not args.insecure, f"{name} must run with the keys"
            else:
                assert cmd[:2] == ["python", "-c"], cmd
                compile(cmd[2], f"{name} liveness", "exec")
    job = container(by_kind(job_objects, "Job")["epd-tiny-model"])
    config = by_kind(objects, "ConfigMap")["epd-config"]["data"]
    assert job["args"][-1] == f"/models/{config['EPD_MODEL']}", "the Job writes the model the stack serves"


def test_stages_find_the_gateway_by_its_service_name_and_advertise_their_pod_ip():
    objects = base_objects()
    services = by_kind(objects, "Service")
    gateway = container(deployments(objects)[GATEWAY])
    gateway_labels = deployments(objects)[GATEWAY]["spec"]["template"]["metadata"]["labels"]
    template = deployments(objects)[GATEWAY]["spec"]["template"]
    ports = {p["name"]: p["containerPort"] for p in gateway["ports"]}
    assert ports == {
        "http": int(arg(gateway["args"], "--port")),
        "control": int(arg(gateway["args"], "--control-port")),
    }
    assert arg(gateway["args"], "--host") == "0.0.0.0"
    control = services[CONTROL]["spec"]
    assert control["clusterIP"] == "None", "headless: DNS gives the gateway pod's own address"
    assert control["publishNotReadyAddresses"], "stages must find the gateway before it is ready"
    for svc in services.values():
        assert svc["spec"]["selector"].items() <= gateway_labels.items()
        for p in svc["spec"]["ports"]:
            assert p["port"] == container_port(template, p["targetPort"]), "a Service port is its pod's"
    assert {p["port"] for p in services[GATEWAY]["spec"]["ports"]} == {HTTP}
    letters = []
    for role, letter in STAGES.items():
        d = deployments(objects)[f"epd-{role}"]
        c = container(d)
        args = c["args"]
        letters.append(arg(args, "--roles"))
        assert arg(args, "--roles") == letter
        assert arg(args, "--gateway") == f"tcp://{CONTROL}:{ports['control']}"
        assert arg(args, "--bind-host") == "0.0.0.0"
        assert arg(args, "--advertise-host") == "$(POD_IP)"
        (pod_ip,) = [e for e in c["env"] if e["name"] == "POD_IP"]
        assert pod_ip["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
        instance = arg(args, "--instance-id")
        assert instance == f"{role}-{{hostname}}", "each pod (host name = pod name) has an id of its own"
        for probe in ("startupProbe", "readinessProbe"):
            cmd = c[probe]["exec"]["command"]
            assert cmd[:3] == ["epd-serve", "health", "--gateway"], f"{role} {probe}"
            assert arg(cmd, "--gateway") == f"http://{CONTROL}:{HTTP}" and arg(cmd, "--instance") == instance
        liveness = c["livenessProbe"]["exec"]["command"]
        assert liveness[3:] == [f"http://{CONTROL}:{HTTP}", instance]
        assert "replicas" not in d["spec"], "the autoscaler owns the count"
        assert "ports" not in c and all(role not in name for name in services), "peers use the pod IP"
    assert sorted(letters) == sorted(STAGES.values())
    livenesses = {
        str(container(d)["livenessProbe"]["exec"]["command"][:3]) for d in stage_deployments(objects).values()
    }
    assert len(livenesses) == 1, "one liveness check for every stage"


def test_the_gateway_is_one_replaced_pod_scraped_by_prometheus_and_probed_on_its_routes():
    objects = base_objects()
    d = deployments(objects)[GATEWAY]
    assert d["spec"]["replicas"] == 1 and d["spec"]["strategy"]["type"] == "Recreate"
    template = d["spec"]["template"]
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/path"] == "/metrics"
    assert int(annotations["prometheus.io/port"]) == container_port(template, "http")
    c = container(d)
    routes = (ROOT / "gateway" / "app.py").read_text()
    for probe, path in (
        ("startupProbe", "/metrics"),
        ("readinessProbe", "/health"),
        ("livenessProbe", "/metrics"),
    ):
        get = c[probe]["httpGet"]
        assert get["path"] == path and f'add_get("{path}"' in routes, probe
        assert container_port(template, get["port"]) == int(arg(c["args"], "--port"))


def test_referenced_secrets_are_the_keys_epd_serve_keys_makes_or_optional(tmp_path):
    objects = base_objects()
    made = secret_from_files(KEYS_SECRET, make_keys(tmp_path / "keys"))
    assert KEY_FILE in made["data"], "the file --keys reads"
    for name, d in deployments(objects).items():
        spec = d["spec"]["template"]["spec"]
        c = container(d)
        volumes = {v["name"]: v for v in spec["volumes"]}
        for volume in volumes.values():
            if "secret" in volume:
                assert volume["secret"]["secretName"] == KEYS_SECRET, name
                assert {i["key"] for i in volume["secret"].get("items", [])} <= set(made["data"])
        (keys_mount,) = [m for m in c["volumeMounts"] if "secret" in volumes[m["name"]]]
        assert keys_mount["readOnly"] and arg(c["args"], "--keys") == keys_mount["mountPath"], name
        for var in c.get("env", []):
            ref = var.get("valueFrom", {}).get("secretKeyRef")
            assert ref is None or ref["name"] == KEYS_SECRET or ref.get("optional"), f"{name}: {var}"
        models = [m for m in c["volumeMounts"] if "persistentVolumeClaim" in volumes[m["name"]]]
        assert [(m["mountPath"], m["readOnly"]) for m in models] == [("/models", True)]
        assert arg(c["args"], "--model").startswith("/models/")
    assert set(by_kind(objects, "PersistentVolumeClaim")) == {"epd-models"}


def test_each_stage_scales_on_its_queue_with_cpu_as_the_fallback():
    objects = base_objects()
    hpas = by_kind(objects, "HorizontalPodAutoscaler")
    assert set(hpas) == set(stage_deployments(objects))
    for name, hpa in hpas.items():
        spec = hpa["spec"]
        assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
        assert spec["minReplicas"] >= 1, "a stage without instances stops the stack"
        external, resource = spec["metrics"]
        letter = arg(container(deployments(objects)[name])["args"], "--roles")
        assert external["external"]["metric"] == {
            "name": QUEUE_DEPTH,
            "selector": {"matchLabels": {"stage": letter}},
        }
        assert external["external"]["target"]["type"] == "AverageValue", "queued requests per pod"
        assert resource["resource"]["name"] == "cpu"
        assert "cpu" in container(deployments(objects)[name])["resources"]["requests"], "utilization needs it"


def test_the_gpu_overlay_gives_each_stage_a_gpu_and_changes_nothing_else():
    base, gpu = base_objects(), build(OVERLAYS["gpu"])
    assert [(o["kind"], o["metadata"]["name"]) for o in base] == [
        (o["kind"], o["metadata"]["name"]) for o in gpu
    ]
    assert by_kind(gpu, "ConfigMap")["epd-config"]["data"]["EPD_DEVICE"] == "cuda"
    for name, d in deployments(gpu).items():
        c, spec = container(d), d["spec"]["template"]["spec"]
        assert c["image"] == "epd-serve:cuda", name
        if name == GATEWAY:
            assert "nvidia.com/gpu" not in c["resources"].get("limits", {}) and "nodeSelector" not in spec
            continue
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 1, name
        assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
        undone = copy.deepcopy(d)
        undone_spec = undone["spec"]["template"]["spec"]
        del undone_spec["nodeSelector"], undone_spec["tolerations"]
        del container(undone)["resources"]["limits"]["nvidia.com/gpu"]
        container(undone)["image"] = "epd-serve:latest"
        assert undone == deployments(base)[name], f"{name}: the overlay changes more than the GPU"


# --- the local run ----------------------------------------------------------------------------------


def run_probe(cmd: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=30)


def test_the_pods_commands_bring_up_a_stack_that_answers(tiny_qwen2_vl, tmp_path):
    objects = base_objects() + [
        secret_from_files(KEYS_SECRET, make_keys(tmp_path / "keys")),  # kubectl create secret ... --from-file
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "epd-api-key"},
            "data": {"api-key": base64.b64encode(b"sesame").decode()},
        },  # fmt: skip
    ]
    # cpu here (auto would pick a GPU on a GPU host), the tiny model, a small KV pool: a user's overlay
    settings = {"EPD_MODEL": tiny_qwen2_vl.name, "EPD_DEVICE": "cpu", "EPD_KV_CACHE_MEMORY": "64"}
    pods = local_pods(objects, tiny_qwen2_vl, tmp_path / "pods", settings)
    gateway, stages = pods[0], pods[1:]
    assert gateway.deployment == GATEWAY and len(stages) == 3
    procs: list[subprocess.Popen] = []

    def start(pod) -> subprocess.Popen:
        with open(tmp_path / f"{pod.name}.log", "w") as log:
            procs.append(
                subprocess.Popen(pod.command, env=run_env(pod), stdout=log, stderr=subprocess.STDOUT)
            )
        return procs[-1]

    try:
        gateway_proc = start(gateway)
        assert wait_status(gateway.probe("readinessProbe"), 503, 30), "the gateway answers before stages join"
        assert http_status(gateway.probe("livenessProbe")) == 200, "live without stages: not restarted"
        assert http_status(gateway.probe("startupProbe")) == 200
        early = run_probe(stages[0].probe("startupProbe"), run_env(stages[0]))
        assert early.returncode == 1 and "is not registered" in early.stderr, early.stderr
        for pod in stages:
            start(pod)
        health = gateway.probe("readinessProbe")
        assert wait_status(health, 200, 90), (tmp_path / f"{gateway.name}.log").read_text()[-3000:]
        deadline = time.monotonic() + 30
        while instance_counts(health) != {"E": 1, "P": 1, "D": 1} and time.monotonic() < deadline:
            time.sleep(0.2)
        assert instance_counts(health) == {"E": 1, "P": 1, "D": 1}
        checks = [
            (pod, kind) for pod in stages for kind in ("startupProbe", "readinessProbe", "livenessProbe")
        ]
        running = [
            (pod, kind, subprocess.Popen(pod.probe(kind), env=run_env(pod), stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, text=True))
            for pod, kind in checks
        ]  # fmt: skip
        for pod, kind, proc in running:
            out, _ = proc.communicate(timeout=30)
            assert proc.returncode == 0, f"{pod.name} {kind}: {out}"
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{gateway.network.target(GATEWAY, HTTP)}/v1",  # the Service
            api_key="sesame", max_retries=0, timeout=60,
        )  # fmt: skip
        reply = client.chat.completions.create(
            model=tiny_qwen2_vl.name, messages=image_message(make_image(84, 84)), max_tokens=8
        )
        assert reply.choices[0].finish_reason in ("length", "stop") and reply.usage.completion_tokens >= 1
        assert reply.choices[0].message.content is not None
        with pytest.raises(openai.AuthenticationError):  # the key came from the epd-api-key Secret
            openai.OpenAI(base_url=client.base_url, api_key="wrong", max_retries=0).models.list()
        gateway_proc.send_signal(signal.SIGTERM)  # the gateway goes away (a restart, a new node)
        gateway_proc.wait(timeout=20)
        away = run_probe(stages[-1].probe("livenessProbe"), run_env(stages[-1]))
        assert away.returncode == 0, f"a stage is not restarted for the gateway's absence: {away.stderr}"
        assert run_probe(stages[-1].probe("readinessProbe"), run_env(stages[-1])).returncode == 1
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
