#!/usr/bin/env python3
"""Validates Kubernetes manifests offline, for tests/deploy_manifests.rs.

    validate.py manifests [--crds DIR]... [--kubernetes-version X.Y] PATH...
    validate.py versions

`manifests` reads every YAML document of every PATH (a file, a directory of *.yaml/*.yml
files, searched recursively in sorted order, or `-` for stdin) and prints one JSON line per
object:

    {"source": ..., "index": 0, "apiVersion": ..., "kind": ..., "namespace": ..., "name": ...,
     "status": "ok" | "error" | "skipped", "validator": ..., "message": ...}

How an object is checked:
- a kind whose CustomResourceDefinition is in a --crds directory, or among the input's own
  CRDs, is a custom resource: its served version's openAPIV3Schema is turned into a JSON Schema
  (int-or-string, nullable, preserve-unknown-fields; unknown fields are errors, as with
  kubectl's default strict field validation) and checked with `jsonschema`; its metadata is
  checked against Kubernetes' ObjectMeta schema;
- a CustomResourceDefinition is checked with kubernetes-validate (strict) and then for what
  the API server demands beyond that schema: a structural schema, one storage version, a
  name of `<plural>.<group>`, printer columns that point at declared fields;
- a kind in ALLOWED_UNVALIDATED is reported as skipped, with the reason;
- everything else is a built-in kind, checked with kubernetes-validate (strict) against the
  given Kubernetes version; a kind it has no schema for is an error.

Exit status: 0 when no object failed, 1 when some did, 2 on a usage or input error.
`versions` prints the versions of the validators as one JSON object.
"""

import argparse
import json
import os
import re
import sys

import jsonschema
import yaml
from referencing import Registry, Resource

import kubernetes_validate
import kubernetes_validate.utils as kv
from kubernetes_validate.version import __version__ as KV_VERSION

DEFAULT_KUBERNETES_VERSION = "1.33"

# Kinds whose schema neither Kubernetes nor this repository provides. Each entry says why it is
# acceptable to leave it unvalidated here; anything else without a schema is an error.
ALLOWED_UNVALIDATED = {
    # The Prometheus Operator's CRD is not ours to ship or vendor; `promtool check rules`
    # checks the rules themselves in the tests that render them.
    ("monitoring.coreos.com", "PrometheusRule"): "Prometheus Operator CRD, not vendored here",
}

CRD_API_VERSION = "apiextensions.k8s.io/v1"

# Keywords a CRD's openAPIV3Schema may not use at all.
FORBIDDEN_KEYWORDS = {
    "$ref", "$schema", "definitions", "dependencies", "id", "patternProperties",
    "additionalItems", "readOnly", "writeOnly", "xml", "discriminator", "deprecated",
}
# Keywords that may not appear inside allOf/anyOf/oneOf/not of a structural schema.
JUNCTOR_FORBIDDEN = {
    "type", "description", "default", "additionalProperties", "nullable",
    "x-kubernetes-preserve-unknown-fields", "x-kubernetes-embedded-resource",
    "x-kubernetes-int-or-string", "x-kubernetes-list-type", "x-kubernetes-list-map-keys",
    "x-kubernetes-map-type",
}
KNOWN_FORMATS = {
    "bsonobjectid", "uri", "email", "hostname", "ipv4", "ipv6", "cidr", "mac", "uuid", "uuid3",
    "uuid4", "uuid5", "isbn", "isbn10", "isbn13", "creditcard", "ssn", "hexcolor", "rgbcolor",
    "byte", "password", "date", "duration", "datetime", "date-time", "int32", "int64", "float",
    "double",
}
NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


# ----- reading -----

def yaml_files(path):
    if path == "-" or os.path.isfile(path):
        return [path]
    if os.path.isdir(path):
        found = []
        for root, dirs, files in os.walk(path):
            dirs.sort()
            found += [os.path.join(root, f) for f in sorted(files)
                      if f.endswith((".yaml", ".yml"))]
        return found
    raise SystemExit(f"no such file or directory: {path}")


def documents(path):
    text = sys.stdin.read() if path == "-" else open(path, encoding="utf-8").read()
    try:
        docs = list(yaml.safe_load_all(text))
    except yaml.YAMLError as e:
        return [(0, YamlError(str(e)))]
    return [(i, d) for i, d in enumerate(docs) if d is not None]


class YamlError:
    def __init__(self, message):
        self.message = message


def group_of(api_version):
    return api_version.split("/", 1)[0] if "/" in api_version else ""


# ----- custom resources -----

def to_json_schema(node, strict=True):
    """An OpenAPI v3 schema node of a CRD as a JSON Schema (draft 2020-12) node."""
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key in ("properties", "patternProperties"):
            out[key] = {name: to_json_schema(child, strict) for name, child in value.items()}
        elif key == "items":
            out[key] = to_json_schema(value, strict)
        elif key == "additionalProperties":
            out[key] = to_json_schema(value, strict) if isinstance(value, dict) else value
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [to_json_schema(child, strict) for child in value]
        elif key == "not":
            out[key] = to_json_schema(value, strict)
        elif key.startswith("x-kubernetes-") or key in (
            "nullable", "description", "format", "example", "externalDocs", "default", "title"
        ):
            continue
        else:
            out[key] = value
    if node.get("x-kubernetes-int-or-string"):
        either = {"anyOf": [{"type": "integer"}, {"type": "string"}]}
        out = {"allOf": [either, out]} if "anyOf" in out else {**out, **either}
    if node.get("nullable"):
        if "type" in out:
            out["type"] = [out["type"], "null"]
        if "enum" in out:
            out["enum"] = list(out["enum"]) + [None]
    preserve = node.get("x-kubernetes-preserve-unknown-fields")
    if (strict and node.get("type") == "object" and "properties" in node
            and "additionalProperties" not in node and not preserve):
        props = dict(out["properties"])
        if node.get("x-kubernetes-embedded-resource"):
            for meta in ("apiVersion", "kind", "metadata"):
                props.setdefault(meta, {})
        out["properties"] = props
        out["additionalProperties"] = False
    return out


class CrdIndex:
    """The CRDs whose kinds are validated as custom resources, by (group, kind)."""

    def __init__(self):
        self.by_kind = {}

    def add(self, crd, source):
        spec = crd.get("spec") or {}
        key = (spec.get("group"), (spec.get("names") or {}).get("kind"))
        if None not in key:
            self.by_kind[key] = (crd, source)

    def add_dir(self, path):
        for f in yaml_files(path):
            for _, doc in documents(f):
                if is_crd(doc):
                    self.add(doc, f)

    def lookup(self, api_version, kind):
        return self.by_kind.get((group_of(api_version), kind))


def is_crd(doc):
    return (isinstance(doc, dict) and doc.get("apiVersion") == CRD_API_VERSION
            and doc.get("kind") == "CustomResourceDefinition")


def kubernetes_schema(name, version):
    """A schema shipped with kubernetes-validate (strict), with its definitions registry."""
    schema_dir = f"v{schema_version(version)}-local-strict"
    schema = kv.schema_contents(f"kubernetes-json-schema/{schema_dir}/{name}", version)
    defs = kv.schema_contents(f"kubernetes-json-schema/{schema_dir}/_definitions.json", version)
    registry = Resource.from_contents(schema) @ Registry()
    registry = Resource.from_contents(defs) @ registry
    return jsonschema.validators.Draft202012Validator(schema, registry=registry)


def schema_version(version):
    """The newest schema set of kubernetes-validate that is not newer than `version`."""
    from packaging.version import Version
    wanted = Version(kv.major_minor(version))
    usable = [v for v in kv.all_versions() if Version(kv.major_minor(v)) <= wanted]
    if not usable:
        raise SystemExit(f"kubernetes-validate {KV_VERSION} has no schemas for {version}")
    return usable[-1]


def first_error(validator, instance):
    errors = sorted(validator.iter_errors(instance), key=lambda e: list(e.absolute_path))
    if not errors:
        return None
    e = errors[0]
    path = ".".join(str(p) for p in e.absolute_path) or "(root)"
    return f"{path}: {e.message}"


def validate_custom_resource(doc, crd, crd_source, k8s_version):
    api_version = doc["apiVersion"]
    version = api_version.split("/", 1)[1] if "/" in api_version else ""
    served = {v["name"]: v for v in crd["spec"].get("versions", []) if v.get("served")}
    if version not in served:
        return "error", (f"{api_version} is not a served version of {crd['metadata']['name']} "
                         f"(served: {', '.join(sorted(served))})")
    v = served[version]
    schema = to_json_schema(((v.get("schema") or {}).get("openAPIV3Schema")) or {})
    problem = first_error(jsonschema.Draft202012Validator(schema), doc)
    if problem:
        return "error", problem
    meta = doc.get("metadata")
    if not isinstance(meta, dict):
        return "error", "metadata: is required"
    problem = first_error(kubernetes_schema("objectmeta-meta-v1.json", k8s_version), meta)
    if problem:
        return "error", f"metadata.{problem}"
    name = meta.get("name")
    if name is None and not meta.get("generateName"):
        return "error", "metadata.name: is required"
    if name is not None and (not NAME_RE.match(str(name)) or len(str(name)) > 253):
        return "error", f"metadata.name: {name!r} is not a DNS subdomain"
    scope = crd["spec"].get("scope")
    if scope == "Cluster" and meta.get("namespace"):
        return "error", "metadata.namespace: set on a cluster-scoped kind"
    note = f"against {os.path.basename(crd_source)} {version}"
    if v.get("deprecated"):
        note += f" (deprecated: {v.get('deprecationWarning', 'deprecated version')})"
    return "ok", note


# ----- CustomResourceDefinitions -----

def structural_problems(node, path, root=False, in_junctor=False, outer_props=None):
    """What makes `node` not a structural schema (the API server's rules), as messages."""
    problems = []
    if not isinstance(node, dict):
        return [f"{path}: must be a schema object"]
    for key in FORBIDDEN_KEYWORDS & node.keys():
        problems.append(f"{path}: {key} is not allowed in a CRD schema")
    if node.get("uniqueItems") is True:
        problems.append(f"{path}: uniqueItems must not be true")
    if "format" in node and node["format"] not in KNOWN_FORMATS:
        problems.append(f"{path}: unknown format {node['format']!r}")
    if in_junctor:
        for key in JUNCTOR_FORBIDDEN & node.keys():
            problems.append(f"{path}: {key} is not allowed inside allOf/anyOf/oneOf/not")
        for name in (node.get("properties") or {}):
            if outer_props is not None and name not in outer_props:
                problems.append(f"{path}.properties.{name}: not declared outside the junctor")
    else:
        int_or_string = node.get("x-kubernetes-int-or-string") is True
        preserve = node.get("x-kubernetes-preserve-unknown-fields") is True
        if int_or_string and "type" in node:
            problems.append(f"{path}: x-kubernetes-int-or-string must not set a type")
        if not node.get("type") and not int_or_string and not preserve:
            problems.append(f"{path}: needs a type (or int-or-string/preserve-unknown-fields)")
    if root and node.get("type") != "object":
        problems.append(f"{path}: the root must be of type object")
    if "properties" in node and "additionalProperties" in node:
        problems.append(f"{path}: properties and additionalProperties are mutually exclusive")
    if node.get("additionalProperties") is False:
        problems.append(f"{path}: additionalProperties must not be false")
    if node.get("type") == "array" and not isinstance(node.get("items"), dict) and not in_junctor:
        problems.append(f"{path}: an array needs a single items schema")
    props = node.get("properties") or {}
    for name, child in props.items():
        if root and name == "metadata":
            allowed = {"type", "description", "properties"}
            extra = set(child.keys()) - allowed
            sub = set((child.get("properties") or {}).keys()) - {"name", "generateName"}
            if extra or sub:
                problems.append(f"{path}.properties.metadata: may only restrict name and "
                                "generateName")
        problems += structural_problems(child, f"{path}.properties.{name}",
                                        in_junctor=in_junctor, outer_props=None)
    if isinstance(node.get("items"), dict):
        problems += structural_problems(node["items"], f"{path}.items", in_junctor=in_junctor)
    if isinstance(node.get("additionalProperties"), dict):
        problems += structural_problems(node["additionalProperties"],
                                        f"{path}.additionalProperties", in_junctor=in_junctor)
    for junctor in ("allOf", "anyOf", "oneOf"):
        for i, child in enumerate(node.get(junctor) or []):
            problems += structural_problems(child, f"{path}.{junctor}[{i}]", in_junctor=True,
                                            outer_props=props if not in_junctor else outer_props)
    if "not" in node:
        problems += structural_problems(node["not"], f"{path}.not", in_junctor=True,
                                        outer_props=props)
    return problems


def json_path_declared(schema, json_path):
    """Whether a printer column's `.a.b.c` path names fields the schema declares."""
    if json_path.startswith(".metadata."):
        return True
    node = schema
    for part in json_path.lstrip(".").split("."):
        if not re.fullmatch(r"[A-Za-z0-9_-]+", part):
            return True  # filters and indexes: not checked
        if node.get("x-kubernetes-preserve-unknown-fields"):
            return True
        node = (node.get("properties") or {}).get(part)
        if node is None:
            return False
    return True


def crd_problems(crd):
    problems = []
    spec = crd.get("spec") or {}
    names = spec.get("names") or {}
    expected = f"{names.get('plural')}.{spec.get('group')}"
    if crd.get("metadata", {}).get("name") != expected:
        problems.append(f"metadata.name: must be {expected}")
    versions = spec.get("versions") or []
    storage = [v["name"] for v in versions if v.get("storage")]
    if len(storage) != 1:
        problems.append(f"spec.versions: exactly one storage version needed, found {storage}")
    if len({v["name"] for v in versions}) != len(versions):
        problems.append("spec.versions: duplicate version names")
    for v in versions:
        where = f"spec.versions[{v['name']}]"
        if v.get("storage") and not v.get("served"):
            problems.append(f"{where}: the storage version must be served")
        if v.get("deprecationWarning") and not v.get("deprecated"):
            problems.append(f"{where}: deprecationWarning without deprecated: true")
        schema = (v.get("schema") or {}).get("openAPIV3Schema")
        if schema is None:
            problems.append(f"{where}.schema.openAPIV3Schema: required in apiextensions/v1")
            continue
        problems += structural_problems(schema, f"{where}.schema.openAPIV3Schema", root=True)
        for col in v.get("additionalPrinterColumns") or []:
            if not json_path_declared(schema, col.get("jsonPath", "")):
                problems.append(f"{where}.additionalPrinterColumns[{col.get('name')}]: "
                                f"{col.get('jsonPath')} is not a declared field")
    return problems


def validate_crd(doc, k8s_version):
    status, message = validate_builtin(doc, k8s_version)
    if status != "ok":
        return status, message
    problems = crd_problems(doc)
    if problems:
        return "error", "; ".join(problems)
    return "ok", message + " + structural schema checks"


# ----- built-in kinds -----

def validate_builtin(doc, k8s_version):
    try:
        used = kv.validate(doc, k8s_version, strict=True)
    except kv.ValidationError as e:
        path = ".".join(str(p) for p in e.path) or "(root)"
        return "error", f"{path}: {e.message}"
    except kv.SchemaNotFoundError as e:
        return "error", (f"{e.message}, and no CRD given to this validator defines it: add its "
                         "CRD (--crds) or, with a reason, an entry to ALLOWED_UNVALIDATED")
    except kv.VersionNotSupportedError:
        return "error", f"kubernetes-validate {KV_VERSION} does not support {k8s_version}"
    return "ok", f"kubernetes-validate {KV_VERSION} strict, Kubernetes {used}"


# ----- driver -----

def check(doc, crds, k8s_version):
    if isinstance(doc, YamlError):
        return "error", "invalid YAML: " + doc.message
    if not isinstance(doc, dict) or not doc.get("apiVersion") or not doc.get("kind"):
        return "error", "not a Kubernetes object (needs apiVersion and kind)"
    api_version, kind = str(doc["apiVersion"]), str(doc["kind"])
    if is_crd(doc):
        return validate_crd(doc, k8s_version)
    found = crds.lookup(api_version, kind)
    if found:
        return validate_custom_resource(doc, found[0], found[1], k8s_version)
    reason = ALLOWED_UNVALIDATED.get((group_of(api_version), kind))
    if reason:
        return "skipped", reason
    return validate_builtin(doc, k8s_version)


def cmd_manifests(args):
    crds = CrdIndex()
    for d in args.crds or []:
        crds.add_dir(d)
    inputs = []
    for p in args.paths:
        for f in yaml_files(p):
            inputs.append((f, documents(f)))
    for f, docs in inputs:
        for _, doc in docs:
            if is_crd(doc):
                crds.add(doc, f)
    failed = 0
    for f, docs in inputs:
        for index, doc in docs:
            status, message = check(doc, crds, args.kubernetes_version)
            meta = doc.get("metadata") if isinstance(doc, dict) else None
            meta = meta if isinstance(meta, dict) else {}
            line = {
                "source": f,
                "index": index,
                "apiVersion": doc.get("apiVersion") if isinstance(doc, dict) else None,
                "kind": doc.get("kind") if isinstance(doc, dict) else None,
                "namespace": meta.get("namespace"),
                "name": meta.get("name"),
                "status": status,
                "message": message,
            }
            failed += status == "error"
            print(json.dumps(line), flush=True)
    return 1 if failed else 0


def cmd_versions(_args):
    print(json.dumps({
        "python": sys.version.split()[0],
        "kubernetes_validate": KV_VERSION,
        "kubernetes_validate_schemas": kv.all_versions()[-1],
        "jsonschema": _dist_version("jsonschema"),
        "pyyaml": yaml.__version__,
        "module": kubernetes_validate.__file__,
    }))
    return 0


def _dist_version(name):
    from importlib.metadata import version
    return version(name)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("manifests", help="validate manifests (files, directories or -)")
    m.add_argument("--crds", action="append", help="directory of CRDs whose kinds to accept")
    m.add_argument("--kubernetes-version", default=DEFAULT_KUBERNETES_VERSION)
    m.add_argument("paths", nargs="+")
    m.set_defaults(func=cmd_manifests)
    v = sub.add_parser("versions", help="print the validators' versions")
    v.set_defaults(func=cmd_versions)
    args = parser.parse_args()
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
