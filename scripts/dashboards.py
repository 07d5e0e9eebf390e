"""Writes the Grafana dashboards of the Helm chart (the one source of them).

Usage: python3 scripts/dashboards.py charts/trainyard/files/dashboards

Two dashboards: "Trainyard / Platform" (operator metrics: jobs, restarts,
time to running, reconciles, the history store) and "Trainyard / TrainingJob"
(one job: trainer and operator series selected by job_namespace/job_name,
which the chart's PodMonitor gives trainer pods). Every metric named here
must be declared in operator/src/metrics.rs or trainer/src/metrics.rs:
scripts/check-chart checks that, parses every query with promtool,
type-checks the output against @grafana/schema, and fails when the JSON in
the chart differs from what this script writes.
"""
import json, sys
DS = {"type": "prometheus", "uid": "${datasource}"}

def panel(pid, title, targets, x, y, w=12, h=8, kind="timeseries", unit=None, desc=None, stack=False):
    p = {"id": pid, "type": kind, "title": title, "datasource": DS,
         "gridPos": {"x": x, "y": y, "w": w, "h": h},
         "targets": [{"refId": chr(65 + i), "datasource": DS, "expr": e, "legendFormat": l}
                     for i, (e, l) in enumerate(targets)],
         "fieldConfig": {"defaults": {}, "overrides": []}, "options": {}}
    if unit:
        p["fieldConfig"]["defaults"]["unit"] = unit
    if desc:
        p["description"] = desc
    if kind == "timeseries":
        p["fieldConfig"]["defaults"]["custom"] = {"drawStyle": "line", "fillOpacity": 10,
                                                   "stacking": {"mode": "normal" if stack else "none"}}
        p["options"] = {"legend": {"displayMode": "list", "placement": "bottom"},
                        "tooltip": {"mode": "multi"}}
    if kind == "stat":
        p["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                        "colorMode": "value", "graphMode": "none"}
    return p

def row(pid, title, y):
    return {"id": pid, "type": "row", "title": title, "collapsed": False,
            "gridPos": {"x": 0, "y": y, "w": 24, "h": 1}, "panels": []}

def dashboard(uid, title, desc, panels, variables):
    return {"uid": uid, "title": title, "description": desc, "tags": ["trainyard"],
            "timezone": "", "schemaVersion": 39, "version": 1, "editable": True,
            "refresh": "30s", "time": {"from": "now-6h", "to": "now"},
            "templating": {"list": variables}, "panels": panels,
            "annotations": {"list": []}, "links": [], "graphTooltip": 1}

ds_var = {"name": "datasource", "label": "Data source", "type": "datasource",
          "query": "prometheus", "hide": 0, "refresh": 1}

R = "$__rate_interval"
platform = [
    row(1, "Jobs", 0),
    panel(2, "Jobs by phase", [("sum by (phase) (trainyard_jobs)", "{{phase}}")], 0, 1, 8, 8, stack=True,
          desc="TrainingJobs the operator knows, by phase (trainyard_jobs)."),
    panel(3, "Jobs created per hour", [("sum by (mode) (increase(trainyard_jobs_created_total[1h]))", "{{mode}}")], 8, 1, 8, 8),
    panel(4, "Jobs finished per hour", [("sum by (result, reason) (increase(trainyard_jobs_finished_total[1h]))", "{{result}} {{reason}}")], 16, 1, 8, 8),
    panel(5, "Gang restarts per hour", [("sum by (reason) (increase(trainyard_job_restarts_total[1h]))", "{{reason}}")], 0, 9, 8, 8),
    panel(6, "Time to running", [
        (f"histogram_quantile(0.5, sum by (le) (rate(trainyard_job_time_to_running_seconds_bucket[{R}])))", "p50"),
        (f"histogram_quantile(0.95, sum by (le) (rate(trainyard_job_time_to_running_seconds_bucket[{R}])))", "p95")],
        8, 9, 8, 8, unit="s", desc="From creation until the whole gang first ran."),
    panel(7, "Running jobs: samples/s", [("sum by (job_namespace, job_name) (trainyard_job_samples_per_second)", "{{job_namespace}}/{{job_name}}")], 16, 9, 8, 8),
    row(8, "Operator", 17),
    panel(9, "Reconcile latency", [
        (f"histogram_quantile(0.5, sum by (le) (rate(trainyard_reconcile_duration_seconds_bucket[{R}])))", "p50"),
        (f"histogram_quantile(0.99, sum by (le) (rate(trainyard_reconcile_duration_seconds_bucket[{R}])))", "p99")],
        0, 18, 8, 8, unit="s"),
    panel(10, "Reconciles and errors", [
        (f"sum by (result) (rate(trainyard_reconcile_duration_seconds_count[{R}]))", "{{result}}"),
        (f"sum(rate(trainyard_reconcile_errors_total[{R}]))", "errors")], 8, 18, 8, 8, unit="ops"),
    panel(11, "Progress reports", [(f"sum by (result) (rate(trainyard_progress_reports_total[{R}]))", "{{result}}")], 16, 18, 8, 8, unit="reqps"),
    row(12, "History store (PostgreSQL)", 26),
    panel(13, "Store up", [("min(trainyard_store_up)", "up")], 0, 27, 4, 8, kind="stat",
          desc="1 while the last history write succeeded."),
    panel(14, "Write queue", [("sum(trainyard_store_queue_depth)", "queued")], 4, 27, 6, 8),
    panel(15, "Writes and errors", [
        (f"sum(rate(trainyard_store_writes_total[{R}]))", "writes"),
        (f"sum(rate(trainyard_store_write_errors_total[{R}]))", "errors (retried)")], 10, 27, 8, 8, unit="ops"),
    panel(16, "Records dropped", [("sum(increase(trainyard_store_dropped_total[1h]))", "per hour")], 18, 27, 6, 8),
]
plat = dashboard("trainyard-platform", "Trainyard / Platform",
                 "TrainingJobs across the cluster and the operator's own health.", platform, [ds_var])

sel = 'job_namespace="$namespace", job_name="$job"'
osel = sel
job_panels = [
    row(1, "Training", 0),
    panel(2, "Step", [(f"max(trainyard_trainer_step{{{sel}}})", "trainer"), (f"max(trainyard_job_step{{{osel}}})", "reported to the operator")], 0, 1, 8, 8),
    panel(3, "Samples/s", [(f"max(trainyard_trainer_samples_per_second{{{sel}}})", "last step (global batch)"),
                           (f"sum(rate(trainyard_trainer_samples_total{{{sel}}}[{R}]))", "all ranks, averaged")], 8, 1, 8, 8),
    panel(4, "Loss", [(f"trainyard_trainer_loss{{{sel}}}", "{{pod}}")], 16, 1, 8, 8),
    panel(5, "Validation", [(f"max(trainyard_trainer_val_miou{{{sel}}})", "mIoU"),
                            (f"max(trainyard_trainer_val_pixel_accuracy{{{sel}}})", "pixel accuracy")], 0, 9, 8, 8, unit="percentunit"),
    panel(6, "Learning rate", [(f"max(trainyard_trainer_learning_rate{{{sel}}})", "lr")], 8, 9, 4, 8),
    panel(17, "Restarts", [(f"max(trainyard_job_gang_restarts{{{sel}}})", "gang restarts")], 12, 9, 4, 8, kind="stat",
          desc="Gang restarts of this job so far (from the operator; the series ends with the job)."),
    panel(7, "Checkpoint write time", [
        (f"histogram_quantile(0.95, sum by (le) (rate(trainyard_trainer_checkpoint_seconds_bucket{{{sel}}}[{R}])))", "p95"),
        (f"sum(rate(trainyard_trainer_checkpoint_seconds_sum{{{sel}}}[{R}])) / sum(rate(trainyard_trainer_checkpoint_seconds_count{{{sel}}}[{R}]))", "mean")],
        16, 9, 8, 8, unit="s"),
    row(8, "Data-parallel synchronisation", 17),
    panel(9, "Time in all-reduce", [(f"avg(rate(trainyard_trainer_allreduce_seconds_total{{{sel}}}[{R}]))", "share of wall time (mean rank)")], 0, 18, 12, 8, unit="percentunit",
          desc="Seconds per second a rank spends in all-reduce; the rest is compute and input."),
    panel(10, "All-reduce bandwidth", [(f"sum(rate(trainyard_trainer_allreduce_bytes_total{{{sel}}}[{R}]))", "bytes/s into all-reduce (all ranks)"),
                                       (f"sum(rate(trainyard_trainer_allreduce_bytes_total{{{sel}}}[{R}])) / sum(rate(trainyard_trainer_allreduce_seconds_total{{{sel}}}[{R}]))", "per rank while reducing")],
          12, 18, 12, 8, unit="Bps"),
    row(11, "Federated", 26),
    panel(12, "Round", [(f"max(trainyard_federated_round{{{sel}}})", "round")], 0, 27, 6, 8, kind="stat"),
    panel(13, "Participants per round", [(f"max(trainyard_federated_participants{{{sel}}})", "updates aggregated")], 6, 27, 6, 8),
    panel(14, "Round duration", [(f"max(trainyard_federated_round_seconds{{{sel}}})", "last round")], 12, 27, 6, 8, unit="s"),
    panel(15, "Privacy spent (ε)", [(f"max(trainyard_federated_epsilon{{{sel}}})", "epsilon")], 18, 27, 6, 8, kind="stat"),
    panel(16, "Client updates", [(f"sum(rate(trainyard_federated_updates_accepted_total{{{sel}}}[{R}]))", "accepted"),
                                 (f"sum by (reason) (rate(trainyard_federated_updates_rejected_total{{{sel}}}[{R}]))", "rejected: {{reason}}")],
          0, 35, 24, 8, unit="reqps"),
]
variables = [ds_var,
    {"name": "namespace", "label": "Namespace", "type": "query", "datasource": DS,
     "query": {"query": 'label_values({__name__=~"trainyard_trainer_step|trainyard_federated_round"}, job_namespace)', "refId": "ns"},
     "refresh": 2, "sort": 1, "hide": 0},
    {"name": "job", "label": "TrainingJob", "type": "query", "datasource": DS,
     "query": {"query": 'label_values({__name__=~"trainyard_trainer_step|trainyard_federated_round", job_namespace="$namespace"}, job_name)', "refId": "job"},
     "refresh": 2, "sort": 1, "hide": 0}]
job = dashboard("trainyard-job", "Trainyard / TrainingJob",
                "One TrainingJob: throughput, loss, validation, synchronisation, federated rounds, privacy and checkpoints.", job_panels, variables)
out = sys.argv[1]
for name, d in [("platform.json", plat), ("job.json", job)]:
    with open(f"{out}/{name}", "w") as f:
        json.dump(d, f, indent=2, ensure_ascii=False)
        f.write("\n")
