//! The dashboards and alert rules checked against what Trellis really exports.
//!
//! - Statically ([`check_all`]): every dashboard parses, has its stable UID and title, a
//!   `datasource` variable that every panel uses, and a query in every panel; every metric and
//!   label named in a panel query, a variable query or an alert expression exists in the
//!   exposition of the real registries: the sidecar's `Metrics` (built as `trellis-proxy` builds
//!   it) and the operator's (built as its runtime builds it), with one series in each family so
//!   its label names show. Only the scrape labels ([`SCRAPE_LABELS`]) are added by hand.
//! - Live ([`live`], ignored, run by `hack/dev-e2e.sh`): the same queries, with the template
//!   variables bound to the demo (`shop`, `catalog`, `catalog.shop`), evaluated by a real
//!   Prometheus scraping a `trellis dev` mesh: each returns series, every metric selector in
//!   them selects series that carry every label the query names, and the workload dashboard
//!   shows the demo's failing catalog replica.
//!
//! A PromQL expression is read by a small lexer ([`facts`]) that finds metric selectors and
//! label names; it is not a PromQL parser, and Prometheus itself (live) and `promtool` (rules)
//! are the judges of syntax.

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;
use serde_json::Value;

use super::{ALERT_RULES, Dashboard, dashboards};

/// Labels Prometheus attaches to every scraped series: `job` and `instance` always, and
/// `namespace`, `pod` and `app` (the workload) from the scrape configuration, as `trellis dev`'s
/// prometheus.yml sets them and as `trellis stat` also requires (README, Golden metrics).
const SCRAPE_LABELS: &[&str] = &["job", "instance", "namespace", "pod", "app"];

/// Grafana's built-in variables a query may use.
const GRAFANA_VARIABLES: &[&str] = &["__rate_interval", "__interval", "__range"];

/// PromQL words that are not metric names: aggregations (`sum by (...)` is not followed by a
/// parenthesis), binary operators and literals.
const NOT_METRICS: &[&str] = &[
    "sum",
    "min",
    "max",
    "avg",
    "count",
    "group",
    "stddev",
    "stdvar",
    "topk",
    "bottomk",
    "quantile",
    "count_values",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "atan2",
    "inf",
    "nan",
];

/// Words followed by a list of label names.
const GROUPING: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

/// One metric selector: `name{label="value", ...}`.
#[derive(Clone, Debug, PartialEq)]
pub struct Selector {
    pub metric: String,
    /// Label names of its matchers.
    pub labels: Vec<String>,
    /// The selector's text, matchers included (no range).
    pub text: String,
}

/// What an expression names.
#[derive(Debug, Default, PartialEq)]
pub struct Facts {
    pub selectors: Vec<Selector>,
    /// Labels in `by`, `without`, `on`, `ignoring`, `group_left` and `group_right` lists.
    pub grouping: Vec<String>,
}

impl Facts {
    /// Every label name the expression uses.
    fn labels(&self) -> BTreeSet<&str> {
        self.selectors
            .iter()
            .flat_map(|s| s.labels.iter())
            .chain(self.grouping.iter())
            .map(String::as_str)
            .collect()
    }
}

fn is_ident_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == ':'
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

fn skip_ws(c: &[char], mut i: usize) -> usize {
    while i < c.len() && c[i].is_whitespace() {
        i += 1;
    }
    i
}

/// The index after the string literal starting at `i`.
fn skip_string(c: &[char], i: usize) -> Result<usize, String> {
    let quote = c[i];
    let mut j = i + 1;
    while j < c.len() {
        if c[j] == '\\' && quote != '`' {
            j += 2;
            continue;
        }
        if c[j] == quote {
            return Ok(j + 1);
        }
        j += 1;
    }
    Err(format!("unterminated string at {i}"))
}

/// The index of the first `close` at or after `i`.
fn find(c: &[char], i: usize, close: char) -> Result<usize, String> {
    c[i..]
        .iter()
        .position(|&x| x == close)
        .map(|p| i + p)
        .ok_or_else(|| format!("no {close:?} after {i}"))
}

/// The label names of the matchers in `{...}` starting at `i`, and the index after `}`.
fn matchers(c: &[char], i: usize) -> Result<(Vec<String>, usize), String> {
    let mut labels = Vec::new();
    let mut j = i + 1;
    loop {
        j = skip_ws(c, j);
        match c.get(j) {
            Some('}') => return Ok((labels, j + 1)),
            Some(&ch) if is_ident_start(ch) => {}
            other => return Err(format!("expected a label name at {j}, found {other:?}")),
        }
        let start = j;
        while j < c.len() && is_ident(c[j]) {
            j += 1;
        }
        labels.push(c[start..j].iter().collect());
        j = skip_ws(c, j);
        while j < c.len() && matches!(c[j], '=' | '!' | '~') {
            j += 1;
        }
        j = skip_ws(c, j);
        if !matches!(c.get(j), Some('"' | '\'' | '`')) {
            return Err(format!("expected a quoted label value at {j}"));
        }
        j = skip_ws(c, skip_string(c, j)?);
        match c.get(j) {
            Some(',') => j += 1,
            Some('}') => {}
            other => return Err(format!("expected ',' or '}}' at {j}, found {other:?}")),
        }
    }
}

/// The metric selectors and grouping labels of a PromQL expression.
pub fn facts(expr: &str) -> Result<Facts, String> {
    let c: Vec<char> = expr.chars().collect();
    let mut f = Facts::default();
    let mut i = 0;
    while i < c.len() {
        let ch = c[i];
        if ch.is_whitespace() {
            i += 1;
        } else if matches!(ch, '"' | '\'' | '`') {
            i = skip_string(&c, i)?;
        } else if ch == '#' {
            i = find(&c, i, '\n').unwrap_or(c.len());
        } else if ch == '[' {
            i = find(&c, i, ']')? + 1;
        } else if ch == '{' {
            return Err(format!("a selector without a metric name at {i}"));
        } else if ch == '$' {
            // A template variable outside a range or a string: skip its name.
            i += 1;
            while i < c.len() && (is_ident(c[i]) || matches!(c[i], '{' | '}')) {
                i += 1;
            }
        } else if ch.is_ascii_digit()
            || (ch == '.' && c.get(i + 1).is_some_and(char::is_ascii_digit))
        {
            // Numbers and durations (`0.99`, `1e3`, `5m` after offset).
            while i < c.len() && (c[i].is_ascii_alphanumeric() || c[i] == '.') {
                i += 1;
            }
        } else if is_ident_start(ch) {
            let start = i;
            while i < c.len() && is_ident(c[i]) {
                i += 1;
            }
            let word: String = c[start..i].iter().collect();
            let lower = word.to_ascii_lowercase();
            let j = skip_ws(&c, i);
            let next = c.get(j).copied();
            if GROUPING.contains(&lower.as_str()) {
                if next == Some('(') {
                    let end = find(&c, j, ')')?;
                    let list: String = c[j + 1..end].iter().collect();
                    f.grouping.extend(
                        list.split(',')
                            .map(str::trim)
                            .filter(|l| !l.is_empty())
                            .map(String::from),
                    );
                    i = end + 1;
                }
            } else if next == Some('(') || NOT_METRICS.contains(&lower.as_str()) {
                // A function, an aggregation or an operator.
            } else {
                let mut labels = Vec::new();
                let mut end = i;
                if next == Some('{') {
                    (labels, end) = matchers(&c, j)?;
                }
                f.selectors.push(Selector {
                    metric: word,
                    labels,
                    text: c[start..end].iter().collect(),
                });
                i = end;
            }
        } else {
            i += 1;
        }
    }
    Ok(f)
}

/// A Grafana variable query as PromQL: `label_values(sel, l)` becomes `group by (l) (sel)`,
/// which returns one series per value Grafana would offer.
pub fn variable_promql(query: &str) -> Result<String, String> {
    let q = query.trim();
    let inner = q
        .strip_prefix("label_values(")
        .and_then(|r| r.strip_suffix(')'))
        .ok_or_else(|| format!("{q:?} is not label_values(<selector>, <label>)"))?;
    let (sel, label) = inner
        .rsplit_once(',')
        .ok_or_else(|| format!("{q:?} names no selector"))?;
    Ok(format!("group by ({}) ({})", label.trim(), sel.trim()))
}

/// What one family exports: whether the exposition had a series of it, and their label names.
#[derive(Debug, Default)]
pub struct Family {
    pub sampled: bool,
    pub labels: BTreeSet<String>,
}

/// Sample name (`trellis_proxy_requests_total`, `..._bucket`) -> what it carries.
pub type Exported = BTreeMap<String, Family>;

/// Reads a text exposition: names from `# TYPE` lines (so families without series count too),
/// label names from the series.
pub fn exported(text: &str) -> Exported {
    let mut out = Exported::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let mut parts = rest.split_whitespace();
        let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
            continue;
        };
        let suffixes: &[&str] = match kind {
            "counter" => &["_total"],
            "histogram" => &["_bucket", "_sum", "_count"],
            "summary" => &["", "_sum", "_count"],
            "info" => &["_info"],
            _ => &[""],
        };
        for s in suffixes {
            out.entry(format!("{name}{s}")).or_default();
        }
    }
    for s in crate::dev::metrics::parse(text).expect("the registries' exposition parses") {
        let f = out.entry(s.name).or_default();
        f.sampled = true;
        f.labels.extend(s.labels.into_keys());
    }
    out
}

/// Why `expr` names something Trellis does not export, one message per problem.
pub fn check_expr(place: &str, expr: &str, known: &Exported) -> Vec<String> {
    let f = match facts(expr) {
        Ok(f) => f,
        Err(e) => return vec![format!("{place}: cannot read {expr:?}: {e}")],
    };
    let mut errors = Vec::new();
    if f.selectors.is_empty() {
        errors.push(format!("{place}: {expr:?} names no metric"));
    }
    let mut available: BTreeSet<&str> = SCRAPE_LABELS.iter().copied().collect();
    for s in &f.selectors {
        let Some(family) = known.get(&s.metric) else {
            errors.push(format!(
                "{place}: metric {} is not exported by the proxy or the operator",
                s.metric
            ));
            continue;
        };
        available.extend(family.labels.iter().map(String::as_str));
        for l in &s.labels {
            if !SCRAPE_LABELS.contains(&l.as_str()) && !family.labels.contains(l) {
                errors.push(if family.sampled {
                    format!(
                        "{place}: metric {} has no label {l} (it has {:?})",
                        s.metric, family.labels
                    )
                } else {
                    format!(
                        "{place}: metric {} has no series in the sample exposition, so label {l} cannot be checked: record one in the sample",
                        s.metric
                    )
                });
            }
        }
    }
    for l in &f.grouping {
        if !available.contains(l.as_str()) {
            errors.push(format!(
                "{place}: label {l} is on none of the metrics the expression reads"
            ));
        }
    }
    errors
}

/// The `$name`, `${name}` and `${name:format}` variables `text` uses.
fn variables(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(p) = rest.find('$') {
        rest = &rest[p + 1..];
        let name: String = if let Some(r) = rest.strip_prefix('{') {
            r.chars().take_while(|&c| c != '}' && c != ':').collect()
        } else {
            rest.chars().take_while(|&c| is_ident(c)).collect()
        };
        if !name.is_empty() {
            out.push(name);
        }
    }
    out
}

/// Replaces every variable in `text` by its value in `values`; unknown ones stay.
pub fn substitute(text: &str, values: &BTreeMap<&str, &str>) -> String {
    let c: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < c.len() {
        if c[i] == '$' {
            let (name, end) = if c.get(i + 1) == Some(&'{') {
                let close = find(&c, i, '}').unwrap_or(c.len() - 1);
                let inner: String = c[i + 2..close].iter().collect();
                (inner.split(':').next().unwrap_or("").to_string(), close + 1)
            } else {
                let mut j = i + 1;
                while j < c.len() && is_ident(c[j]) {
                    j += 1;
                }
                (c[i + 1..j].iter().collect(), j)
            };
            if let Some(v) = values.get(name.as_str()) {
                out.push_str(v);
                i = end;
                continue;
            }
        }
        out.push(c[i]);
        i += 1;
    }
    out
}

/// Where a query comes from, and what it must do against live data.
#[derive(Clone, Debug, PartialEq)]
pub enum Kind {
    /// A panel's target: returns series.
    Panel,
    /// A template variable's values: returns series.
    Variable,
    /// An alert's expression: returns series only while the alert fires.
    Alert,
}

/// One query of the assets.
#[derive(Clone, Debug)]
pub struct Query {
    /// `trellis-workload.json: panel "Success rate by pod" (A)`.
    pub place: String,
    pub expr: String,
    pub kind: Kind,
}

fn str_at<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or("")
}

fn panels_of(list: &Value, out: &mut Vec<Value>) {
    for p in list.as_array().into_iter().flatten() {
        if str_at(p, "type") == "row" {
            panels_of(&p["panels"], out);
        } else {
            out.push(p.clone());
        }
    }
}

/// The queries of one dashboard, after the structural checks (their failures in `errors`).
pub fn dashboard_queries(d: &Dashboard, errors: &mut Vec<String>) -> Vec<Query> {
    let file = d.file_name;
    let v: Value = match serde_json::from_str(d.json) {
        Ok(v) => v,
        Err(e) => {
            errors.push(format!("{file}: not JSON: {e}"));
            return Vec::new();
        }
    };
    if str_at(&v, "uid") != d.uid {
        errors.push(format!(
            "{file}: uid {:?}, expected {:?}",
            str_at(&v, "uid"),
            d.uid
        ));
    }
    if str_at(&v, "title") != d.title {
        errors.push(format!(
            "{file}: title {:?}, expected {:?}",
            v["title"], d.title
        ));
    }
    if v["schemaVersion"].as_u64().unwrap_or(0) < 41 {
        errors.push(format!("{file}: schemaVersion below 41 (Grafana 12)"));
    }
    let vars = v["templating"]["list"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let mut defined: BTreeSet<String> = GRAFANA_VARIABLES.iter().map(|s| s.to_string()).collect();
    defined.extend(vars.iter().map(|x| str_at(x, "name").to_string()));
    if !vars.iter().any(|x| {
        str_at(x, "name") == "datasource"
            && str_at(x, "type") == "datasource"
            && str_at(x, "query") == "prometheus"
    }) {
        errors.push(format!(
            "{file}: no `datasource` variable of type prometheus"
        ));
    }
    let uses_variable_datasource =
        |x: &Value| x.get("datasource").map(|d| str_at(d, "uid")) == Some("${datasource}");
    let mut out = Vec::new();
    let check_vars = |place: &str, expr: &str, errors: &mut Vec<String>| {
        for name in variables(expr) {
            if !defined.contains(&name) {
                errors.push(format!("{place}: undefined variable ${name}"));
            }
        }
    };
    for var in vars.iter().filter(|x| str_at(x, "type") == "query") {
        let place = format!("{file}: variable {}", str_at(var, "name"));
        if !uses_variable_datasource(var) {
            errors.push(format!("{place}: data source is not ${{datasource}}"));
        }
        let q = var["query"]
            .as_str()
            .or_else(|| var["query"]["query"].as_str())
            .unwrap_or("");
        match variable_promql(q) {
            Ok(expr) => {
                check_vars(&place, &expr, errors);
                out.push(Query {
                    place,
                    expr,
                    kind: Kind::Variable,
                });
            }
            Err(e) => errors.push(format!("{place}: {e}")),
        }
    }
    let mut panels = Vec::new();
    panels_of(&v["panels"], &mut panels);
    if panels.is_empty() {
        errors.push(format!("{file}: no panels"));
    }
    let mut ids = BTreeSet::new();
    for p in &panels {
        let place = format!("{file}: panel {:?}", str_at(p, "title"));
        if !ids.insert(p["id"].as_u64()) {
            errors.push(format!("{place}: duplicate id"));
        }
        if !uses_variable_datasource(p) {
            errors.push(format!("{place}: data source is not ${{datasource}}"));
        }
        let targets = p["targets"].as_array().cloned().unwrap_or_default();
        if targets.is_empty() {
            errors.push(format!("{place}: no query"));
        }
        for t in &targets {
            let place = format!("{place} ({})", str_at(t, "refId"));
            let expr = str_at(t, "expr");
            if expr.trim().is_empty() {
                errors.push(format!("{place}: empty query"));
                continue;
            }
            if !uses_variable_datasource(t) {
                errors.push(format!("{place}: data source is not ${{datasource}}"));
            }
            check_vars(&place, expr, errors);
            out.push(Query {
                place,
                expr: expr.to_string(),
                kind: Kind::Panel,
            });
        }
    }
    out
}

#[derive(Debug, Deserialize)]
struct RuleFile {
    groups: Vec<RuleGroup>,
}

#[derive(Debug, Deserialize)]
struct RuleGroup {
    name: String,
    rules: Vec<Rule>,
}

#[derive(Debug, Deserialize)]
struct Rule {
    alert: Option<String>,
    expr: String,
    #[serde(rename = "for")]
    for_: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

/// The alert expressions of a rule file, after the checks on each rule's shape.
pub fn alert_queries(rules: &str, errors: &mut Vec<String>) -> Vec<Query> {
    let file: RuleFile = match serde_saphyr::from_str(rules) {
        Ok(f) => f,
        Err(e) => {
            errors.push(format!("alerts.yaml: {e}"));
            return Vec::new();
        }
    };
    let mut out = Vec::new();
    for g in &file.groups {
        for r in &g.rules {
            let name = r.alert.clone().unwrap_or_default();
            let place = format!("alerts.yaml: {}/{name}", g.name);
            if r.alert.is_none() {
                errors.push(format!("{place}: not an alerting rule"));
            }
            if r.for_.is_none() {
                errors.push(format!("{place}: no `for:`"));
            }
            if !matches!(
                r.labels.get("severity").map(String::as_str),
                Some("critical" | "warning" | "info")
            ) {
                errors.push(format!(
                    "{place}: severity is not critical, warning or info"
                ));
            }
            for a in ["summary", "description", "runbook"] {
                if r.annotations.get(a).is_none_or(|t| t.trim().is_empty()) {
                    errors.push(format!("{place}: no {a} annotation"));
                }
            }
            out.push(Query {
                place,
                expr: r.expr.clone(),
                kind: Kind::Alert,
            });
        }
    }
    out
}

/// Every query of `boards` and `rules`, with the structural errors.
pub fn all_queries(boards: &[Dashboard], rules: &str) -> (Vec<Query>, Vec<String>) {
    let mut errors = Vec::new();
    let mut queries = Vec::new();
    for d in boards {
        queries.extend(dashboard_queries(d, &mut errors));
    }
    queries.extend(alert_queries(rules, &mut errors));
    (queries, errors)
}

/// The sidecar's exposition, from its registry built as `trellis-proxy` builds it
/// (`Metrics::with_traffic`), with one series recorded in every family so label names show.
pub fn proxy_exposition() -> String {
    use std::sync::Arc;
    use std::time::Duration;
    use trellis_proxy::metrics::{
        Direction, Metrics, OpenConn, ReasonLabels, ResultLabels, SeriesCache, TcpBytesMeter,
        TcpLabels,
    };
    use trellis_proxy::traffic::{BackendLabels, OverflowLabels, TrafficMetrics};

    let traffic = TrafficMetrics::new();
    let m = Metrics::with_traffic(&traffic);
    let peer: Arc<str> = "spiffe://cluster.local/ns/shop/sa/frontend".into();
    let svc: Arc<str> = "catalog.shop".into();
    m.record_request_cached(
        &SeriesCache::default(),
        Direction::Outbound,
        &peer,
        &svc,
        200,
        true,
        Duration::from_millis(2),
    );
    let tcp = TcpLabels {
        direction: Direction::Outbound.as_str(),
        dst_service: svc,
        tls: true,
    };
    let _open = OpenConn::new(&m, &tcp);
    let meter = TcpBytesMeter::new(&m, &tcp);
    meter.from_client().add(1);
    meter.flush();
    m.refused
        .get_or_create(&ReasonLabels {
            reason: "plaintext",
        })
        .inc();
    m.config_reloads
        .get_or_create(&ResultLabels { result: "applied" })
        .inc();
    m.set_config_revision("r1");
    m.cert_expiry.set(1);
    m.spans_dropped.inc();
    let backend = BackendLabels {
        backend: "catalog.shop".into(),
    };
    for f in [
        &traffic.requests,
        &traffic.retries,
        &traffic.retry_budget_exhausted,
        &traffic.ejections,
        &traffic.rate_limited,
        &traffic.timeouts,
    ] {
        f.get_or_create(&backend).inc();
    }
    traffic.ejected.get_or_create(&backend).set(1);
    traffic
        .overflow
        .get_or_create(&OverflowLabels {
            backend: "catalog.shop".into(),
            limit: "requests",
        })
        .inc();
    traffic.inbound_rate_limited.inc();
    m.encode()
}

/// The operator's exposition, from the registry its runtime serves with every component's
/// metrics registered in it (controllers, identity endpoint, webhook), one series in each family.
pub fn operator_exposition() -> String {
    let mut r = crate::runtime::new_registry();
    let controllers = crate::controller::Metrics::register(&mut r);
    controllers.reconciles.count("mesh", "ok");
    controllers.leader.set(1);
    let identity = crate::identity::IdentityMetrics::register(&mut r);
    identity.rejected("not_found");
    let webhook = crate::webhook::WebhookMetrics::register(&mut r);
    let reason = vec![("reason".to_string(), "host_network".to_string())];
    webhook.skips.get_or_create(&reason).inc();
    webhook.denials.get_or_create(&reason).inc();
    webhook.injections.inc();
    let (_, mesh) = tokio::sync::watch::channel(crate::inject::default_mesh());
    r.register_collector(Box::new(crate::webhook::DesiredProxy(mesh)));
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &r).expect("encoding into a String");
    out
}

/// Everything Trellis exports.
pub fn trellis_exported() -> Exported {
    let mut e = exported(&proxy_exposition());
    e.extend(exported(&operator_exposition()));
    e
}

/// Every static problem of `boards` and `rules`.
pub fn check_all(boards: &[Dashboard], rules: &str) -> Vec<String> {
    let known = trellis_exported();
    let (queries, mut errors) = all_queries(boards, rules);
    for q in &queries {
        errors.extend(check_expr(&q.place, &q.expr, &known));
    }
    errors
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn facts_find_selectors_and_grouping_labels() {
        let f = facts(
            "histogram_quantile(0.99, sum by (namespace, le) (rate(a_bucket{x=\"1\", y!~'a,}'}[$__rate_interval])))\n/ on (pod) group_left (version) b > bool 0\nand sum without (z) (c) offset 5m",
        )
        .unwrap();
        let sel: Vec<(&str, Vec<&str>)> = f
            .selectors
            .iter()
            .map(|s| {
                (
                    s.metric.as_str(),
                    s.labels.iter().map(String::as_str).collect(),
                )
            })
            .collect();
        assert_eq!(
            sel,
            [("a_bucket", vec!["x", "y"]), ("b", vec![]), ("c", vec![])]
        );
        assert_eq!(f.selectors[0].text, "a_bucket{x=\"1\", y!~'a,}'}");
        assert_eq!(f.grouping, ["namespace", "le", "pod", "version", "z"]);
        assert!(facts("sum({a=\"b\"})").is_err());
        assert!(facts("a{b=c}").is_err());
        assert!(facts("a{b=\"c}").is_err());
    }

    #[test]
    fn variable_queries_become_promql() {
        assert_eq!(
            variable_promql("label_values(m{a=\"$x\"}, app)").unwrap(),
            "group by (app) (m{a=\"$x\"})"
        );
        assert!(variable_promql("query_result(m)").is_err());
    }

    #[test]
    fn substitution_binds_every_form_of_variable() {
        let v = BTreeMap::from([("ns", "shop"), ("__rate_interval", "1m")]);
        assert_eq!(
            substitute(
                "m{n=~\"$ns\",o=\"${ns}\",p=\"${ns:regex}\"}[$__rate_interval] $other",
                &v
            ),
            "m{n=~\"shop\",o=\"shop\",p=\"shop\"}[1m] $other"
        );
    }

    /// The sample expositions carry what the dashboards rely on, named as the registries name
    /// them (counters `_total`, histograms `_bucket`, info metrics `_info`).
    #[test]
    fn expositions_come_from_the_real_registries() {
        let e = trellis_exported();
        for (metric, label) in [
            ("trellis_proxy_requests_total", "dst_service"),
            ("trellis_proxy_response_latency_seconds_bucket", "le"),
            ("trellis_proxy_build_info", "version"),
            ("trellis_proxy_traffic_retries_total", "backend"),
            ("trellis_operator_build_info", "version"),
            ("trellis_operator_desired_proxy_info", "version"),
            ("trellis_operator_reconciles_total", "controller"),
            ("trellis_operator_identity_rejections_total", "reason"),
            ("trellis_operator_injector_skips_total", "reason"),
        ] {
            assert!(
                e.get(metric).is_some_and(|f| f.labels.contains(label)),
                "{metric} {label}: {e:?}"
            );
        }
    }

    #[test]
    fn dashboards_and_alerts_name_only_what_trellis_exports() {
        let errors = check_all(dashboards(), ALERT_RULES);
        assert!(errors.is_empty(), "{}", errors.join("\n"));
    }

    #[test]
    fn dashboard_uids_are_stable_and_unique() {
        let uids: Vec<&str> = dashboards().iter().map(|d| d.uid).collect();
        // Grafana links, bookmarks and the addons' ConfigMaps use these: never change them.
        assert_eq!(
            uids,
            [
                "trellis-mesh",
                "trellis-service",
                "trellis-workload",
                "trellis-control-plane"
            ]
        );
        let files: BTreeSet<&str> = dashboards().iter().map(|d| d.file_name).collect();
        assert_eq!(files.len(), dashboards().len());
        for d in dashboards() {
            assert_eq!(d.file_name, format!("{}.json", d.uid));
        }
    }

    #[test]
    fn every_alert_the_mesh_promises_is_there() {
        let mut errors = Vec::new();
        let names: Vec<String> = alert_queries(ALERT_RULES, &mut errors)
            .into_iter()
            .map(|q| q.place.rsplit('/').next().unwrap().to_string())
            .collect();
        assert!(errors.is_empty(), "{errors:?}");
        for want in [
            "TrellisSuccessRateLow",
            "TrellisLatencyHigh",
            "TrellisCertificateExpiringSoon",
            "TrellisConfigRejected",
            "TrellisProxyVersionOld",
            "TrellisOperatorDown",
        ] {
            assert!(
                names.iter().any(|n| n == want),
                "{want} missing from {names:?}"
            );
        }
    }

    /// A copy of a real dashboard with `from` replaced by `to`: what the checks must refuse.
    fn broken(uid: &str, from: &str, to: &str) -> Vec<Dashboard> {
        let d = dashboards().iter().find(|d| d.uid == uid).unwrap();
        assert!(d.json.contains(from), "{from} not in {uid}");
        vec![Dashboard {
            json: Box::leak(d.json.replace(from, to).into_boxed_str()),
            ..*d
        }]
    }

    #[test]
    fn unknown_metrics_labels_and_variables_are_refused() {
        let cases = [
            (
                broken(
                    "trellis-mesh",
                    "trellis_proxy_requests_total",
                    "trellis_proxy_request_total",
                ),
                "metric trellis_proxy_request_total is not exported",
            ),
            (
                broken(
                    "trellis-service",
                    "dst_service=\\\"$service\\\"",
                    "destination=\\\"$service\\\"",
                ),
                "has no label destination",
            ),
            (
                broken("trellis-workload", "sum by (pod)", "sum by (replica)"),
                "label replica is on none of the metrics",
            ),
            (
                broken(
                    "trellis-workload",
                    "app=\\\"$workload\\\"",
                    "app=\\\"$workloads\\\"",
                ),
                "undefined variable $workloads",
            ),
            (
                broken(
                    "trellis-control-plane",
                    "\"uid\": \"${datasource}\"",
                    "\"uid\": \"prometheus\"",
                ),
                "data source is not ${datasource}",
            ),
            (
                broken(
                    "trellis-mesh",
                    "\"uid\": \"trellis-mesh\"",
                    "\"uid\": \"mesh\"",
                ),
                "uid \"mesh\"",
            ),
        ];
        for (boards, want) in cases {
            let errors = check_all(&boards, "groups: []");
            assert!(
                errors.iter().any(|e| e.contains(want)),
                "{want:?} not in {errors:#?}"
            );
        }
        let rules = ALERT_RULES.replace(
            "trellis_proxy_config_stale",
            "trellis_proxy_config_is_stale",
        );
        let errors = check_all(&[], &rules);
        assert!(
            errors
                .iter()
                .any(|e| e.contains("trellis_proxy_config_is_stale is not exported")),
            "{errors:#?}"
        );
        let rules = ALERT_RULES.replacen("severity: warning", "level: warning", 1);
        assert!(
            check_all(&[], &rules)
                .iter()
                .any(|e| e.contains("severity"))
        );
    }
}

/// Metrics a `trellis dev` run cannot show, by exact name, so the live check cannot ask them
/// for series (the static check still covers their names and labels). Everything else must
/// have series: the operator's metrics come from the operator code `trellis dev` runs (identity
/// endpoint, injector; see `crate::dev::operator_metrics`), `trellis_proxy_tcp_*` from the
/// demo's opaque TCP `cache`, `trellis_proxy_inbound_refused_total` from the plaintext `legacy`
/// client once `hack/dev-e2e.sh` has made `shop` Strict.
const NOT_IN_DEV: &[(&str, &str)] = &[(
    "trellis_operator_leader",
    "no leader election in `trellis dev` (one process, no Lease): the gauge is absent, not faked",
)];

fn not_in_dev(metric: &str) -> bool {
    NOT_IN_DEV.iter().any(|(m, _)| metric == *m)
}

/// The template variables bound to demo workloads, and Grafana's interval variables to windows
/// the dev run's 1 s scrapes fill. A query passes when it passes under one binding: catalog
/// (three replicas, one failing on purpose) calls nothing, so the outbound panels of the
/// workload dashboard show data for frontend, and the opaque TCP panels for cache (called by
/// the `warmer` client).
fn demo_bindings() -> [BTreeMap<&'static str, &'static str>; 3] {
    let bind = |workload, service| {
        BTreeMap::from([
            ("namespace", "shop"),
            ("workload", workload),
            ("service", service),
            ("__rate_interval", "1m"),
            ("__interval", "15s"),
            ("__range", "5m"),
        ])
    };
    [
        bind("catalog", "catalog.shop"),
        bind("frontend", "reviews.shop"),
        bind("cache", "cache.shop"),
    ]
}

/// Evaluates every query against a live Prometheus; one message per failure.
pub async fn live_check(
    prom: &crate::stat::prometheus::Prometheus,
    queries: &[Query],
    time: f64,
) -> Vec<String> {
    let mut errors = Vec::new();
    for q in queries {
        let mut first = None;
        for values in demo_bindings() {
            let e = live_query(prom, q, &substitute(&q.expr, &values), time).await;
            if e.is_empty() {
                first = None;
                break;
            }
            first.get_or_insert(e);
        }
        errors.extend(first.unwrap_or_default());
    }
    errors
}

/// What is wrong with one query (variables bound) against live data.
async fn live_query(
    prom: &crate::stat::prometheus::Prometheus,
    q: &Query,
    expr: &str,
    time: f64,
) -> Vec<String> {
    let mut errors = Vec::new();
    let answer = match prom.query(expr, time).await {
        Ok(a) => a,
        Err(e) => return vec![format!("{}: {e}", q.place)],
    };
    let f = match facts(expr) {
        Ok(f) => f,
        Err(e) => return vec![format!("{}: {e}", q.place)],
    };
    let live: Vec<&Selector> = f
        .selectors
        .iter()
        .filter(|s| !not_in_dev(&s.metric))
        .collect();
    let mut seen: BTreeSet<String> = BTreeSet::new();
    for s in &live {
        match prom.query(&s.text, time).await {
            Ok(series) if series.is_empty() => {
                errors.push(format!("{}: {} selects no series", q.place, s.text))
            }
            Ok(series) => seen.extend(series.into_iter().flat_map(|x| x.labels.into_keys())),
            Err(e) => errors.push(format!("{}: {e}", q.place)),
        }
    }
    if !live.is_empty() {
        for l in f.labels() {
            if !seen.contains(l) {
                errors.push(format!(
                    "{}: no series the query reads carries label {l}",
                    q.place
                ));
            }
        }
    }
    let all_live = live.len() == f.selectors.len();
    if q.kind != Kind::Alert && all_live && answer.is_empty() {
        errors.push(format!("{}: {expr} returns no series", q.place));
    }
    errors
}

/// The live check (`hack/dev-e2e.sh` runs it against Prometheus scraping `trellis dev`): every
/// dashboard and alert query over the demo's data, the failing catalog replica visible, and
/// the same check refusing broken copies of the dashboards.
#[tokio::test]
#[ignore = "needs $TRELLIS_LIVE_PROMETHEUS scraping `trellis dev`: run by hack/dev-e2e.sh"]
async fn live() {
    let url = std::env::var("TRELLIS_LIVE_PROMETHEUS").expect(
        "TRELLIS_LIVE_PROMETHEUS=http://127.0.0.1:<port> of a Prometheus scraping `trellis dev`",
    );
    let prom = crate::stat::prometheus::Prometheus::new(&url).unwrap();
    let time = jiff::Timestamp::now().as_millisecond() as f64 / 1000.0;
    for (metric, why) in NOT_IN_DEV {
        println!("live: {metric} not asked for series: {why}");
        // An exemption the run has outgrown hides a query that could be checked: refuse it.
        let got = prom.query(metric, time).await.unwrap();
        assert!(
            got.is_empty(),
            "{metric} has series in `trellis dev` now: remove it from NOT_IN_DEV"
        );
    }
    let (queries, errors) = all_queries(dashboards(), ALERT_RULES);
    assert!(errors.is_empty(), "{errors:#?}");
    let errors = live_check(&prom, &queries, time).await;
    assert!(errors.is_empty(), "{}", errors.join("\n"));
    println!(
        "live: {} dashboard and alert queries answered by {url}",
        queries.len()
    );

    // The workload dashboard for catalog shows the replica that fails on purpose: below 100 %
    // in "Success rate by pod", while its siblings are at 100 %, and present in "Latency by pod".
    let [values, _, _] = demo_bindings();
    let panel = |title: &str| {
        queries
            .iter()
            .find(|q| {
                q.place
                    .starts_with(&format!("trellis-workload.json: panel {title:?}"))
            })
            .map(|q| substitute(&q.expr, &values))
            .unwrap_or_else(|| panic!("no panel {title:?}"))
    };
    //
    // The balancer sends the failing replica (30 % failures) only the trickle of requests it
    // needs to notice a recovery, so a window that Prometheus has only just begun to fill may
    // hold none of them (0/0: NaN, a gap in Grafana) or only successes. Ask again, at the
    // current time, until the window shows it, for at most 90 s; a healthy replica below 100 %
    // or the failing one never showing still fails the check.
    let pod = |s: &crate::stat::Sample| s.labels.get("pod").cloned().unwrap_or_default();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
    let (mut time, mut success, mut failing, mut healthy);
    loop {
        time = jiff::Timestamp::now().as_millisecond() as f64 / 1000.0;
        success = prom
            .query(&panel("Success rate by pod"), time)
            .await
            .unwrap();
        println!(
            "live: catalog success rate by pod: {:?}",
            success
                .iter()
                .map(|s| (pod(s), s.value))
                .collect::<Vec<_>>()
        );
        failing = success
            .iter()
            .filter(|s| s.value < 1.0)
            .map(pod)
            .collect::<Vec<String>>();
        healthy = success.iter().filter(|s| s.value == 1.0).count();
        if (failing.len() == 1 && healthy >= 1) || std::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    }
    assert!(failing.len() == 1 && healthy >= 1, "{success:?}");
    let latency = prom.query(&panel("Latency by pod"), time).await.unwrap();
    assert!(latency.iter().any(|s| pod(s) == failing[0]), "{latency:?}");

    // The same check refuses a query naming a metric or a label Trellis does not export, the
    // operator's and opaque TCP's included.
    // Each case: the dashboard, the text replaced, its replacement, and what the refusal names.
    for (uid, from, to, names) in [
        (
            "trellis-workload",
            "trellis_proxy_requests_total",
            "trellis_proxy_request_total",
            "trellis_proxy_request_total",
        ),
        (
            "trellis-workload",
            "app=\\\"$workload\\\"",
            "workload=\\\"$workload\\\"",
            "workload=",
        ),
        (
            "trellis-workload",
            "sum by (pod)",
            "sum by (replica)",
            "label replica",
        ),
        (
            "trellis-control-plane",
            "trellis_operator_identity_issuances_total",
            "trellis_operator_identity_issuance_total",
            "trellis_operator_identity_issuance_total",
        ),
        (
            "trellis-control-plane",
            "trellis_operator_injector_injections_total",
            "trellis_operator_injector_injection_total",
            "trellis_operator_injector_injection_total",
        ),
        (
            "trellis-service",
            "trellis_proxy_tcp_connections_open",
            "trellis_proxy_tcp_connection_open",
            "trellis_proxy_tcp_connection_open",
        ),
    ] {
        let d = dashboards().iter().find(|d| d.uid == uid).unwrap();
        assert!(d.json.contains(from), "{from} not in {uid}");
        let copy = [Dashboard {
            json: Box::leak(d.json.replace(from, to).into_boxed_str()),
            ..*d
        }];
        let (queries, _) = all_queries(&copy, "groups: []");
        let errors = live_check(&prom, &queries, time).await;
        let refusal = errors.iter().find(|e| e.contains(names));
        assert!(
            refusal.is_some(),
            "a broken copy ({from} -> {to}) was not refused for {names}: {errors:#?}"
        );
        println!(
            "live: broken copy ({from} -> {to}) refused: {}",
            refusal.unwrap()
        );
    }
}
