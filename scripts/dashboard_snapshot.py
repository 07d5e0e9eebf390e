"""Plots every panel of Grafana dashboard JSON files from a Prometheus.

Usage: dashboard_snapshot.py PROMETHEUS_URL START END OUT.png DASHBOARD.json...

Each panel's queries are run as range queries over [START, END] with the
dashboards' variables set to the job the trainer's series are labelled
with; $__rate_interval becomes 15s, as Grafana picks for a 1 s scrape
interval. Rows become section titles. Called by
scripts/dashboard-snapshot.
"""
import json
import sys
import urllib.parse
import urllib.request

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

url, start, end, out, *dashboards = sys.argv[1:]
start, end = float(start), float(end)


def query(expr, variables):
    for k, v in variables.items():
        expr = expr.replace(k, v)
    q = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": 2})
    with urllib.request.urlopen(f"{url}/api/v1/query_range?{q}") as r:
        body = json.load(r)
    if body["status"] != "success":
        raise SystemExit(f"{expr}: {body}")
    return body["data"]["result"]


def legend(fmt, labels):
    for k, v in labels.items():
        fmt = fmt.replace("{{" + k + "}}", v)
    return fmt


def label(name):
    q = urllib.parse.urlencode({"match[]": "trainyard_trainer_step"})
    with urllib.request.urlopen(f"{url}/api/v1/label/{name}/values?{q}") as r:
        return json.load(r)["data"][0]


variables = {"$__rate_interval": "15s", "$namespace": label("job_namespace"), "$job": label("job_name")}
panels = []
for path in dashboards:
    d = json.load(open(path))
    for p in d["panels"]:
        if p["type"] != "row":
            panels.append((d["title"], p))

cols = 4
rows = -(-len(panels) // cols)
fig, axes = plt.subplots(rows, cols, figsize=(cols * 4.6, rows * 2.7), squeeze=False)
for ax in axes.flat[len(panels):]:
    ax.axis("off")
for ax, (dash, p) in zip(axes.flat, panels):
    ax.set_title(f"{dash.split(' / ')[-1]}: {p['title']}", fontsize=9, loc="left")
    ax.tick_params(labelsize=7)
    drawn = 0
    for t in p["targets"]:
        for series in query(t["expr"], variables):
            xs = [float(x) - start for x, _ in series["values"]]
            ys = [float(y) for _, y in series["values"]]
            ax.plot(xs, ys, linewidth=1.2, label=legend(t.get("legendFormat", ""), series["metric"]))
            drawn += 1
    if drawn:
        ax.legend(fontsize=6, loc="best")
        ax.set_xlabel("seconds into the run", fontsize=7)
    else:
        ax.text(0.5, 0.5, "no data in this run", ha="center", va="center", fontsize=8, color="grey",
                transform=ax.transAxes)
fig.suptitle("Trainyard dashboards' queries over one `trainyard local` run "
             "(examples/distributed-shapes.yaml, 2 workers, this 2-core machine)", fontsize=11)
fig.tight_layout(rect=(0, 0, 1, 0.98))
fig.savefig(out, dpi=80)
