"""config/grafana/nzserve.json, the Grafana dashboard of the nzserve metrics.

* the file is a dashboard Grafana can import: valid JSON, a schema version,
  a Prometheus datasource variable every panel uses, unique panel ids, panels
  on the 24-column grid without overlaps, every panel with PromQL targets;
* every metric a query names (panel targets and template variables) is a
  metric family a live server exports on /metrics (one server with both demo
  models, a translation and a dialogue request so the histogram series
  exist), `_bucket` / `_sum` / `_count` only on a histogram;
* every label a query matches on or aggregates by is one those series carry
  (or `job` / `instance`, which Prometheus adds when it scrapes).
"""
import json
import os
import re

import pytest

from server_util import REPO, Server

DASHBOARD = os.path.join(REPO, "config", "grafana", "nzserve.json")
DEMO = os.path.join(REPO, "models", "demo")
SCRAPE_LABELS = {"job", "instance"}  # added by Prometheus, not by the server
METRIC = re.compile(r"\bnzserve_[a-z0-9_]+")
SELECTOR = re.compile(r"\b(nzserve_[a-z0-9_]+)\s*\{([^}]*)\}")
MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)\s*\"")
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")


@pytest.fixture(scope="module")
def dashboard():
    with open(DASHBOARD) as f:
        return json.load(f)


def panels(dash):
    """Every panel, rows' nested panels included."""
    for p in dash["panels"]:
        yield p
        yield from p.get("panels", [])


def queries(dash):
    """(where, PromQL) of every panel target and every query variable."""
    for p in panels(dash):
        for t in p.get("targets", []):
            yield f"panel '{p['title']}' target {t['refId']}", t["expr"]
    for v in dash["templating"]["list"]:
        if v["type"] == "query":
            q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            yield f"variable ${v['name']}", q


@pytest.fixture(scope="module")
def exported():
    """What a live server exports: ({family: type}, {sample name: set of label names})."""
    models = [{"name": "nat-ende", "task": "translate", "path": os.path.join(DEMO, "nat-ende.nzp")},
              {"name": "dialogue", "task": "dialogue", "path": os.path.join(DEMO, "dialogue.nzp")}]
    with Server(models=models, config={"tile_cache_bytes": "64MiB"}) as s:
        s.wait_ready()
        assert s.translate({"text": "Open the file."}).status == 200
        assert s.dialogue({"context": ["Hello"]}).status == 200
        assert s.get("/v1/nothing").status == 404
        r = s.get("/metrics")
        assert r.status == 200, r
        text = r.body.decode()
    families, labels = {}, {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            families[name] = kind
        elif line and not line.startswith("#"):
            m = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s", line)
            assert m, line
            labels.setdefault(m.group(1), set()).update(re.findall(r'([a-zA-Z_]\w*)="', m.group(2) or ""))
    return families, labels


def family_of(name, families):
    """The metric family a series name belongs to, or None."""
    if name in families:
        return name
    for suffix, kinds in (("_bucket", {"histogram"}), ("_sum", {"histogram", "summary"}),
                          ("_count", {"histogram", "summary"})):
        base = name[: -len(suffix)]
        if name.endswith(suffix) and families.get(base) in kinds:
            return base
    return None


def test_dashboard_shape(dashboard):
    d = dashboard
    assert d["title"] and d["uid"] and isinstance(d["schemaVersion"], int) and d["schemaVersion"] >= 36
    ds_vars = [v for v in d["templating"]["list"] if v["type"] == "datasource"]
    assert len(ds_vars) == 1 and ds_vars[0]["query"] == "prometheus"
    ds_ref = "${%s}" % ds_vars[0]["name"]
    names = [v["name"] for v in d["templating"]["list"]]
    assert len(names) == len(set(names))
    ids = [p["id"] for p in panels(d)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    boxes = []
    for p in panels(d):
        g = p["gridPos"]
        assert g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        for other, og in boxes:
            overlap = (g["x"] < og["x"] + og["w"] and og["x"] < g["x"] + g["w"] and
                       g["y"] < og["y"] + og["h"] and og["y"] < g["y"] + g["h"])
            assert not overlap, f"panels '{p['title']}' and '{other}' overlap"
        boxes.append((p["title"], g))
        if p["type"] == "row":
            continue
        assert p["title"] and p.get("description"), p
        assert p["datasource"]["uid"] == ds_ref, p["title"]
        assert p["targets"], f"panel '{p['title']}' has no query"
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == ds_ref and t["expr"].strip(), p["title"]
            assert t["expr"].count("(") == t["expr"].count(")"), t["expr"]
            assert t["expr"].count("{") == t["expr"].count("}"), t["expr"]
    # what the issue asks the board to show
    kinds = {p["type"] for p in panels(d)}
    assert {"row", "timeseries", "stat"} <= kinds
    units = {p["fieldConfig"]["defaults"].get("unit") for p in panels(d) if p["type"] != "row"}
    assert {"bytes", "s", "reqps", "percentunit"} <= units
    exprs = " ".join(e for _, e in queries(d))
    for needed in ("histogram_quantile(0.5,", "histogram_quantile(0.95,", "histogram_quantile(0.99,",
                   "nzserve_tile_cache_hits_total", "nzserve_weights_compressed_bytes", "nzserve_kv_cache_bytes",
                   "nzserve_activations_bytes", "nzserve_resident_memory_bytes", "nzserve_allocator_free_bytes",
                   "nzserve_queue_depth", "nzserve_rejected_total", 'status=~"5..'):
        assert needed in exprs, needed


def test_every_queried_metric_is_exported(dashboard, exported):
    families, labels = exported
    assert len(families) >= 20 and all(f.startswith("nzserve_") for f in families)
    seen = set()
    for where, expr in queries(dashboard):
        names = METRIC.findall(expr)
        assert names, f"{where} names no nzserve metric: {expr}"
        for name in names:
            fam = family_of(name, families)
            assert fam, f"{where}: {name} is not exported by the server (# TYPE lines: {sorted(families)})"
            assert name in labels, f"{where}: the server exports no {name} series after a request"
            seen.add(fam)
        # labels matched in a selector exist on that series
        for name, body in SELECTOR.findall(expr):
            for label in MATCHER.findall(body):
                assert label in labels[name] | SCRAPE_LABELS, f"{where}: {name} has no label {label!r}"
        # labels aggregated by exist on some series of the expression
        have = set().union(*(labels[n] for n in names)) | SCRAPE_LABELS
        for group in GROUPING.findall(expr):
            for label in filter(None, (x.strip() for x in group.split(","))):
                assert label in have, f"{where}: no series of {names} has the label {label!r}"
    # the board covers the memory breakdown, the cache, traffic, latency, queue and errors
    for fam in ("nzserve_weights_compressed_bytes", "nzserve_weights_decoded_equivalent_bytes",
                "nzserve_tile_cache_bytes", "nzserve_tile_cache_limit_bytes", "nzserve_kv_cache_bytes",
                "nzserve_activations_bytes", "nzserve_scratch_bytes", "nzserve_resident_memory_bytes",
                "nzserve_mapped_resident_bytes", "nzserve_allocator_free_bytes", "nzserve_tile_cache_hits_total",
                "nzserve_tile_cache_misses_total", "nzserve_requests_total", "nzserve_request_duration_seconds",
                "nzserve_queue_wait_seconds", "nzserve_queue_depth", "nzserve_requests_in_flight",
                "nzserve_rejected_total", "nzserve_input_tokens_total", "nzserve_output_tokens_total"):
        assert fam in seen, f"the dashboard does not show {fam}"
