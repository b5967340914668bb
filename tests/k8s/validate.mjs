#!/usr/bin/env node
// Validate Kubernetes manifests offline against the API schemas.
//
//   kubectl kustomize config/k8s | node tests/k8s/validate.mjs
//   node tests/k8s/validate.mjs FILE.yaml [FILE.yaml ...]     ("-" = stdin)
//
// Every YAML document (empty ones are skipped) must be an object whose
// apiVersion/kind is a Kubernetes API type of the kubernetes-models package
// (the OpenAPI schemas of Kubernetes 1.27, compiled to ajv validators); it is
// validated against that type's schema. Also refused: an unknown
// apiVersion/kind (a typo, or a custom resource we have no schema for), an
// alpha or beta API version (the schemas still carry them, current clusters
// removed most: policy/v1beta1, autoscaling/v2beta2, ...), an object without
// metadata.name, a YAML syntax error or duplicate key, and input with no
// object at all. What the schemas cannot see: unknown fields (Kubernetes'
// schemas do not forbid extra properties) and cross-object consistency;
// tests/python/test_k8s.py checks the fields that matter to nzserve.
//
// Prints one line per object; exit status 0 when every object is valid, 1
// when one is not (each failure names the input, document number,
// apiVersion, kind, name and every schema error with its JSON path), 2 on
// unreadable input or a usage error.
import { readFileSync } from "node:fs";
import { loadAll } from "js-yaml";
import * as models from "kubernetes-models";

function registry() {
  const reg = new Map();
  const seen = new Set();
  const walk = (ns) => {
    if (!ns || seen.has(ns)) return;
    seen.add(ns);
    for (const v of Object.values(ns)) {
      if (typeof v === "function" && typeof v.apiVersion === "string" && typeof v.kind === "string") {
        if (typeof v.prototype.validate === "function") reg.set(`${v.apiVersion} ${v.kind}`, v);
      } else if (v && typeof v === "object") {
        walk(v);
      }
    }
  };
  walk(models);
  return reg;
}

function describe(obj) {
  const name = obj && obj.metadata && typeof obj.metadata.name === "string" ? obj.metadata.name : "(no name)";
  return `${obj.apiVersion} ${obj.kind} ${name}`;
}

function schemaErrors(err) {
  const list = Array.isArray(err.errors) ? err.errors : [];
  if (!list.length) return [String(err.message || err)];
  return list.map((e) => {
    const path = e.instancePath || "/";
    let extra = "";
    if (e.params && e.params.allowedValues) extra = ` (${e.params.allowedValues.join(", ")})`;
    return `${path} ${e.message}${extra}`;
  });
}

function check(obj, reg) {
  if (obj === null || typeof obj !== "object" || Array.isArray(obj)) {
    return ["the document is not a YAML mapping (a Kubernetes object)"];
  }
  if (typeof obj.apiVersion !== "string" || !obj.apiVersion) return ["apiVersion is missing or not a string"];
  if (typeof obj.kind !== "string" || !obj.kind) return ["kind is missing or not a string"];
  const Model = reg.get(`${obj.apiVersion} ${obj.kind}`);
  if (!Model) return [`unknown apiVersion/kind ${obj.apiVersion} ${obj.kind}: no Kubernetes schema for it`];
  if (/^(.*\/)?v\d+(alpha|beta)\d*$/.test(obj.apiVersion)) {
    return [`${obj.apiVersion} is an alpha/beta API version; use the GA version of ${obj.kind}`];
  }
  const errors = [];
  const md = obj.metadata;
  if (!md || typeof md !== "object" || typeof md.name !== "string" || !md.name) {
    errors.push("/metadata/name is required");
  }
  try {
    new Model(obj).validate();
  } catch (err) {
    errors.push(...schemaErrors(err));
  }
  return errors;
}

function main(argv) {
  const files = argv.length ? argv : ["-"];
  for (const f of files) {
    if (f.startsWith("-") && f !== "-") {
      process.stderr.write("usage: node tests/k8s/validate.mjs [FILE|-]...\n");
      return 2;
    }
  }
  const reg = registry();
  let total = 0;
  let bad = 0;
  for (const f of files) {
    const label = f === "-" ? "<stdin>" : f;
    let docs;
    try {
      const text = readFileSync(f === "-" ? 0 : f, "utf8");
      docs = loadAll(text, null, { filename: label });
    } catch (err) {
      process.stderr.write(`validate: ${label}: ${err.message}\n`);
      return 2;
    }
    docs.forEach((obj, i) => {
      if (obj === null || obj === undefined) return; // an empty document ("---" at the end)
      total++;
      const errors = check(obj, reg);
      const what = obj && typeof obj === "object" && !Array.isArray(obj) ? describe(obj) : "(not an object)";
      if (errors.length) {
        bad++;
        process.stdout.write(`FAIL ${label} document ${i + 1}: ${what}\n`);
        for (const e of errors) process.stdout.write(`       ${e}\n`);
      } else {
        process.stdout.write(`ok   ${label} document ${i + 1}: ${what}\n`);
      }
    });
  }
  if (!total) {
    process.stdout.write("validate: FAILED: no Kubernetes object in the input\n");
    return 1;
  }
  if (bad) {
    process.stdout.write(`validate: FAILED: ${bad} of ${total} objects invalid\n`);
    return 1;
  }
  process.stdout.write(`validate: OK: ${total} objects valid\n`);
  return 0;
}

process.exitCode = main(process.argv.slice(2));
