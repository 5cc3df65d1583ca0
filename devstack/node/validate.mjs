// Reads a JSON array of prometheus-operator objects on stdin; prints a JSON array with, for each,
// null (valid) or the schema's first error ("<path>: <message>"). devstack/manifests.py runs it.
import { readFileSync } from "node:fs";
import { PodMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PodMonitor";

const kinds = { "monitoring.coreos.com/v1/PodMonitor": PodMonitor };
const objects = JSON.parse(readFileSync(0, "utf8"));
const out = objects.map((obj) => {
  const model = kinds[`${obj.apiVersion}/${obj.kind}`];
  if (!model) return `no schema here for ${obj.apiVersion} ${obj.kind}`;
  try {
    new model(obj).validate();
    return null;
  } catch (err) {
    return String(err.message || err).slice(0, 2000);
  }
});
process.stdout.write(JSON.stringify(out));
