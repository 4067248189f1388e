#!/usr/bin/env python3
"""Prints, as one JSON List, what OLM creates from the bundle for an AllNamespaces install into
NAMESPACE: the CRDs, the ServiceAccount, a ClusterRole and ClusterRoleBinding from the CSV's
clusterPermissions, a Role and RoleBinding from its permissions, the Deployment from its install
strategy, and the other manifests (Services, PodDisruptionBudget) in NAMESPACE.

    olm-install.py BUNDLE_DIR NAMESPACE [OPERATOR_IMAGE] | kubectl apply -f -

Needs PyYAML (the virtualenv hack/validate-manifests.sh creates has it). Used by
e2e/cases/90-olm-bundle.sh to test the bundle on a cluster without OLM itself.
"""
import glob
import json
import os
import sys

import yaml


def main():
    bundle, ns = sys.argv[1], sys.argv[2]
    image = sys.argv[3] if len(sys.argv) > 3 and sys.argv[3] else None
    csv, items = None, []
    for path in sorted(glob.glob(os.path.join(bundle, "manifests", "*.yaml"))):
        with open(path) as f:
            doc = yaml.safe_load(f)
        if doc["kind"] == "ClusterServiceVersion":
            csv = doc
        elif doc["kind"] == "CustomResourceDefinition":
            items.append(doc)
        else:
            doc["metadata"]["namespace"] = ns
            items.append(doc)
    if csv is None:
        sys.exit("no ClusterServiceVersion in %s/manifests" % bundle)
    spec = csv["spec"]["install"]["spec"]
    labels = {"olm.owner": csv["metadata"]["name"], "olm.owner.namespace": ns}
    accounts = set()
    for i, p in enumerate(spec.get("clusterPermissions", [])):
        sa, name = p["serviceAccountName"], "%s-%s-%d" % (csv["metadata"]["name"], ns, i)
        accounts.add(sa)
        items.append({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
                      "metadata": {"name": name, "labels": labels}, "rules": p["rules"]})
        items.append({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
                      "metadata": {"name": name, "labels": labels},
                      "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": name},
                      "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": ns}]})
    for i, p in enumerate(spec.get("permissions", [])):
        sa, name = p["serviceAccountName"], "%s-%d" % (csv["metadata"]["name"], i)
        accounts.add(sa)
        meta = {"name": name, "namespace": ns, "labels": labels}
        items.append({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                      "metadata": meta, "rules": p["rules"]})
        items.append({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                      "metadata": meta,
                      "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": name},
                      "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": ns}]})
    for sa in sorted(accounts):
        items.append({"apiVersion": "v1", "kind": "ServiceAccount",
                      "metadata": {"name": sa, "namespace": ns, "labels": labels}})
    related = {r["name"]: r["image"] for r in csv["spec"].get("relatedImages", [])}
    for d in spec["deployments"]:
        dspec = d["spec"]
        if image:
            for c in dspec["template"]["spec"]["containers"]:
                if c["image"] == related.get("trellis-operator"):
                    c["image"] = image
        items.append({"apiVersion": "apps/v1", "kind": "Deployment",
                      "metadata": {"name": d["name"], "namespace": ns,
                                   "labels": dict(d.get("label") or {}, **labels)},
                      "spec": dspec})
    json.dump({"apiVersion": "v1", "kind": "List", "items": items}, sys.stdout, indent=1)


if __name__ == "__main__":
    main()
