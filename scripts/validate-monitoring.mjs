// Validates the Prometheus Operator objects of rendered manifests
// (ServiceMonitor, PodMonitor, PrometheusRule) against the CRD schemas that
// npm's @kubernetes-models/prometheus-operator generates from them.
// Usage: node scripts/validate-monitoring.mjs NODE_MODULES_DIR FILE...
import fs from "node:fs";
import path from "node:path";
import { pathToFileURL } from "node:url";

const [modules, ...files] = process.argv.slice(2);
const load = (p) => import(pathToFileURL(path.join(modules, p)).href);
const yaml = (await load("js-yaml/index.js")).default;
const v1 = "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1";
const kinds = {};
for (const kind of ["ServiceMonitor", "PodMonitor", "PrometheusRule"]) {
  kinds[kind] = (await load(`${v1}/${kind}.js`))[kind];
}
let failed = 0;
let checked = 0;
for (const file of files) {
  for (const doc of yaml.loadAll(fs.readFileSync(file, "utf8"))) {
    if (!doc || doc.apiVersion !== "monitoring.coreos.com/v1") continue;
    const Model = kinds[doc.kind];
    if (!Model) {
      console.error(`${file}: no schema for ${doc.kind}`);
      failed++;
      continue;
    }
    try {
      new Model(doc).validate();
      checked++;
    } catch (e) {
      console.error(`${file}: ${doc.kind} ${doc.metadata.name}: ${e.message}`);
      failed++;
    }
  }
}
console.log(`${checked} Prometheus Operator object(s) valid, ${failed} invalid`);
process.exit(failed ? 1 : 0);
