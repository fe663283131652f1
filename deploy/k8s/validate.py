"""Schema validation of the Kubernetes manifests in deploy/k8s and deploy/kured.

Run by validate.sh (which installs kubernetes-validate, and so jsonschema and PyYAML, into a
venv). Per file: "ok" or "FAIL" with the errors; exit 1 on any failure.

  python validate.py [--k8s-version V]... FILE...      validate FILEs
  python validate.py --self-test DEPLOY_DIR            broken copies must fail

What each kind of file is checked against:
  - Kubernetes API objects (Namespace, DaemonSet, ...): kubernetes-validate's bundled
    schemas of each --k8s-version, strict (unknown fields are errors, as with kubectl's
    default --validate=strict);
  - upgrade.cattle.io/v1 Plan: schemas/upgrade.cattle.io_plan_v1.json (jsonschema, draft
    2020-12), plus: namespace system-upgrade (the controller only watches its own);
  - a JSON 6902 patch list (deploy/kured/reboot-command-patch.yaml): applied to a stand-in
    of kured's DaemonSet (the shape of kured's kured-ds.yaml), the result validated as a
    DaemonSet;
  - kured Helm values (deploy/kured/helm-values.yaml): extraArgs and nodeSelector rendered
    into the same stand-in as the chart does (--KEY=VALUE flags), validated likewise;
  - a kustomize Kustomization: its patch files exist (they are validated as above); its
    resources are the user's kured.yaml, not in the repository.
"""

import copy
import json
import os
import sys
import tempfile

import jsonschema
import kubernetes_validate
import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
PLAN_SCHEMA = os.path.join(HERE, "schemas", "upgrade.cattle.io_plan_v1.json")
SUC_NAMESPACE = "system-upgrade"

# The shape of kured's kured-ds.yaml (flags in `command`), for patches and Helm values.
KURED_STAND_IN = {
    "apiVersion": "apps/v1",
    "kind": "DaemonSet",
    "metadata": {"name": "kured", "namespace": "kube-system"},
    "spec": {
        "selector": {"matchLabels": {"name": "kured"}},
        "updateStrategy": {"type": "RollingUpdate"},
        "template": {
            "metadata": {"labels": {"name": "kured"}},
            "spec": {
                "serviceAccountName": "kured",
                "hostPID": True,
                "restartPolicy": "Always",
                "tolerations": [
                    {"key": "node-role.kubernetes.io/control-plane", "effect": "NoSchedule"}
                ],
                "containers": [
                    {
                        "name": "kured",
                        "image": "ghcr.io/kubereboot/kured:1.17.1",
                        "imagePullPolicy": "IfNotPresent",
                        "securityContext": {"privileged": True},
                        "ports": [{"containerPort": 8080, "name": "metrics"}],
                        "env": [
                            {
                                "name": "KURED_NODE_ID",
                                "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}},
                            }
                        ],
                        "command": ["/usr/bin/kured"],
                    }
                ],
            },
        },
    },
}


class Invalid(Exception):
    pass


def where(err):
    path = "/".join(str(p) for p in err.absolute_path)
    return "/" + path if path else "(document)"


def plan_validator():
    with open(PLAN_SCHEMA) as f:
        schema = json.load(f)
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def message(err):
    if err.validator in ("anyOf", "oneOf") and err.context:
        return "none of: " + " | ".join(sorted({c.message for c in err.context}))
    return err.message


def check_plan(doc, validator):
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
    msgs = ["%s: %s" % (where(e), message(e)) for e in errors]
    ns = (doc.get("metadata") or {}).get("namespace")
    if ns != SUC_NAMESPACE:
        msgs.append("/metadata/namespace: %r, not %r (the controller only watches its own "
                    "namespace)" % (ns, SUC_NAMESPACE))
    if msgs:
        raise Invalid("; ".join(msgs))
    return "Plan %s (schema %s)" % (doc["metadata"]["name"], os.path.basename(PLAN_SCHEMA))


def check_k8s(doc, versions):
    for v in versions:
        try:
            kubernetes_validate.validate(doc, v, strict=True)
        except kubernetes_validate.ValidationError as e:
            raise Invalid("%s (Kubernetes %s, strict): %s" % (where(e), v, e.message))
        except kubernetes_validate.SchemaNotFoundError as e:
            raise Invalid(e.message)
    return "%s %s (Kubernetes %s, strict)" % (
        doc["kind"], doc.get("metadata", {}).get("name", "?"), ", ".join(versions))


def json_pointer(path):
    if not path.startswith("/"):
        raise Invalid("patch path %r does not start with /" % path)
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def apply_patch(target, ops):
    """A JSON 6902 patch (add, replace, remove, test), as kustomize applies it."""
    doc = copy.deepcopy(target)
    for i, op in enumerate(ops):
        if not isinstance(op, dict) or "op" not in op or "path" not in op:
            raise Invalid("patch operation %d: needs op and path" % i)
        parts = json_pointer(op["path"])
        parent = doc
        for p in parts[:-1]:
            try:
                parent = parent[int(p)] if isinstance(parent, list) else parent[p]
            except (KeyError, IndexError, ValueError):
                raise Invalid("patch operation %d: %s: no such path in kured's DaemonSet"
                              % (i, op["path"]))
        last = parts[-1]
        kind = op["op"]
        if kind in ("add", "replace"):
            if "value" not in op:
                raise Invalid("patch operation %d: %s needs a value" % (i, kind))
            if isinstance(parent, list):
                if last == "-" and kind == "add":
                    parent.append(op["value"])
                else:
                    try:
                        idx = int(last)
                    except ValueError:
                        raise Invalid("patch operation %d: %s: not an index" % (i, op["path"]))
                    if kind == "add":
                        parent.insert(idx, op["value"])
                    else:
                        parent[idx] = op["value"]
            elif isinstance(parent, dict):
                if kind == "replace" and last not in parent:
                    raise Invalid("patch operation %d: replace of missing %s" % (i, op["path"]))
                parent[last] = op["value"]
            else:
                raise Invalid("patch operation %d: %s: parent is not a container" % (i, op["path"]))
        elif kind == "remove":
            try:
                del parent[int(last) if isinstance(parent, list) else last]
            except (KeyError, IndexError, ValueError):
                raise Invalid("patch operation %d: remove of missing %s" % (i, op["path"]))
        elif kind == "test":
            pass
        else:
            raise Invalid("patch operation %d: op %r not supported here" % (i, kind))
    return doc


def kured_command(ds):
    return ds["spec"]["template"]["spec"]["containers"][0]["command"]


def check_patch(ops, versions):
    ds = apply_patch(KURED_STAND_IN, ops)
    check_k8s(ds, versions)
    flags = [c for c in kured_command(ds) if isinstance(c, str) and c.startswith("--reboot-command=")]
    if not flags:
        raise Invalid("the patched kured command has no --reboot-command= flag")
    return "JSON 6902 patch -> kured DaemonSet stand-in, valid (Kubernetes %s, strict); %s" % (
        ", ".join(versions), flags[-1])


def check_helm_values(values, versions):
    ds = copy.deepcopy(KURED_STAND_IN)
    extra = values.get("extraArgs") or {}
    if not isinstance(extra, dict):
        raise Invalid("/extraArgs: not a map of flag -> value")
    for k, v in extra.items():
        if isinstance(v, (dict, list)):
            raise Invalid("/extraArgs/%s: not a scalar" % k)
        kured_command(ds).append("--%s=%s" % (k, v))
    if "nodeSelector" in values:
        ds["spec"]["template"]["spec"]["nodeSelector"] = values["nodeSelector"]
    check_k8s(ds, versions)
    return "Helm values rendered into the kured DaemonSet stand-in, valid (Kubernetes %s, strict)" % (
        ", ".join(versions))


def check_kustomization(doc, path):
    missing = []
    for p in doc.get("patches") or []:
        if not isinstance(p, dict) or not isinstance(p.get("path", ""), str):
            raise Invalid("/patches: each entry needs a path")
        if "path" in p and not os.path.exists(os.path.join(os.path.dirname(path), p["path"])):
            missing.append(p["path"])
    if missing:
        raise Invalid("patch files missing: %s" % ", ".join(missing))
    res = doc.get("resources") or []
    if not all(isinstance(r, str) for r in res):
        raise Invalid("/resources: not a list of strings")
    return "Kustomization: patch files exist (resources %s are the user's)" % ", ".join(res)


def check_file(path, versions, validator):
    """Returns a list of lines describing what was validated; raises Invalid."""
    with open(path) as f:
        try:
            docs = [d for d in yaml.safe_load_all(f) if d is not None]
        except yaml.YAMLError as e:
            raise Invalid("YAML: %s" % e)
    if not docs:
        raise Invalid("no YAML document")
    out = []
    for n, doc in enumerate(docs):
        label = "document %d: " % (n + 1) if len(docs) > 1 else ""
        try:
            if isinstance(doc, list):
                out.append(label + check_patch(doc, versions))
            elif not isinstance(doc, dict):
                raise Invalid("not a mapping")
            elif doc.get("kind") == "Kustomization":
                out.append(label + check_kustomization(doc, path))
            elif doc.get("apiVersion") == "upgrade.cattle.io/v1" or doc.get("kind") == "Plan":
                out.append(label + check_plan(doc, validator))
            elif "apiVersion" in doc and "kind" in doc:
                out.append(label + check_k8s(doc, versions))
            elif "extraArgs" in doc or "nodeSelector" in doc:
                out.append(label + check_helm_values(doc, versions))
            else:
                raise Invalid("neither a Kubernetes object, a patch list nor kured Helm values")
        except Invalid as e:
            raise Invalid(label + str(e))
    return out


def validate_files(paths, versions):
    validator = plan_validator()
    failed = 0
    for p in paths:
        try:
            lines = check_file(p, versions, validator)
            print("ok   %s" % p)
            for line in lines:
                print("       %s" % line)
        except Invalid as e:
            failed += 1
            print("FAIL %s: %s" % (p, e))
    return failed


# Broken copies that must be rejected, each for the reason given: (name, file relative to
# DEPLOY_DIR, a substring of the expected error, mutation).
def _plan(docs):
    return docs[0]


def _ds(docs):
    return [d for d in docs if d.get("kind") == "DaemonSet"][0]


MUTATIONS = [
    ("Plan without upgrade.image", "k8s/system-upgrade-plan.yaml", "'image' is a required property",
     lambda d: _plan(d)["spec"]["upgrade"].pop("image")),
    ("Plan with concurrency \"1\" (a string)", "k8s/system-upgrade-plan.yaml", "/spec/concurrency",
     lambda d: _plan(d)["spec"].__setitem__("concurrency", "1")),
    ("Plan with a misspelt drain field (ignoreDaemonset)", "k8s/system-upgrade-plan.yaml", "ignoreDaemonset",
     lambda d: d[1]["spec"]["drain"].__setitem__("ignoreDaemonset", True)),
    ("Plan without version or channel", "k8s/system-upgrade-plan.yaml", "'channel' is a required property",
     lambda d: _plan(d)["spec"].pop("version")),
    ("Plan whose selector says In without values", "k8s/system-upgrade-plan.yaml", "'values' is a required property",
     lambda d: _plan(d)["spec"]["nodeSelector"].__setitem__(
         "matchExpressions", [{"key": "mk-upgrade/platform", "operator": "In"}])),
    ("Plan in the default namespace", "k8s/system-upgrade-plan.yaml", "/metadata/namespace",
     lambda d: _plan(d)["metadata"].__setitem__("namespace", "default")),
    ("Plan with upgrade.args not a list", "k8s/system-upgrade-plan.yaml", "/spec/upgrade/args",
     lambda d: _plan(d)["spec"]["upgrade"].__setitem__("args", "--release 1")),
    ("DaemonSet with a misspelt field (hostPid)", "k8s/mk-agentd-daemonset.yaml", "hostPid",
     lambda d: _ds(d)["spec"]["template"]["spec"].__setitem__("hostPid", True)),
    ("DaemonSet with a list as its memory limit", "k8s/mk-agentd-daemonset.yaml", "limits/memory",
     lambda d: _ds(d)["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
     .__setitem__("memory", ["16Mi"])),
    ("DaemonSet without a selector", "k8s/mk-agentd-daemonset.yaml", "'selector' is a required property",
     lambda d: _ds(d)["spec"].pop("selector")),
    ("kured patch adding a number to the command", "kured/reboot-command-patch.yaml", "command/1",
     lambda d: d[0][0].__setitem__("value", 100)),
    ("kured patch at a path kured's DaemonSet lacks", "kured/reboot-command-patch.yaml", "no such path",
     lambda d: d[0][0].__setitem__("path", "/spec/template/spec/containers/1/command/-")),
    ("Helm values with a non-string node selector", "kured/helm-values.yaml", "nodeSelector/mk-upgrade/enabled",
     lambda d: d[0]["nodeSelector"].__setitem__("mk-upgrade/enabled", True)),
]


def self_test(deploy_dir, versions):
    validator = plan_validator()
    passed = failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        for name, rel, expected, mutate in MUTATIONS:
            with open(os.path.join(deploy_dir, rel)) as f:
                docs = [d for d in yaml.safe_load_all(f) if d is not None]
            mutate(docs)
            broken = os.path.join(tmp, rel.replace("/", "_"))
            with open(broken, "w") as f:
                yaml.safe_dump_all(docs, f, sort_keys=False)
            try:
                check_file(broken, versions, validator)
                failed += 1
                print("FAIL broken copy accepted: %s (%s)" % (name, rel))
            except Invalid as e:
                msg = str(e)
                short = msg[:200] + ("..." if len(msg) > 200 else "")
                if expected in msg:
                    passed += 1
                    print("ok   broken copy rejected: %s: %s" % (name, short))
                else:
                    failed += 1
                    print("FAIL broken copy rejected for another reason than %r: %s: %s"
                          % (expected, name, short))
    return passed, failed


def main(argv):
    versions = []
    args = []
    test_dir = None
    i = 0
    while i < len(argv):
        if argv[i] == "--k8s-version":
            versions.append(argv[i + 1])
            i += 2
        elif argv[i] == "--self-test":
            test_dir = argv[i + 1]
            i += 2
        else:
            args.append(argv[i])
            i += 1
    versions = versions or [kubernetes_validate.latest_version()]
    if test_dir:
        passed, failed = self_test(test_dir, versions)
        print("self-test: %d broken copies rejected as expected, %d not" % (passed, failed))
        return 1 if failed else 0
    if not args:
        print(__doc__)
        return 2
    failed = validate_files(args, versions)
    print("validate: %d file(s) ok, %d failed" % (len(args) - failed, failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
