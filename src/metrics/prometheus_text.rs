//! The Prometheus text exposition format 0.0.4 (what `promtool check metrics` and older
//! scrapers read), converted from prometheus-client's OpenMetrics text, which is the only
//! text format that crate writes.
//!
//! The differences handled: a counter family `x` is described as `x` in OpenMetrics but
//! its samples are `x_total`, and Prometheus text wants HELP/TYPE to name `x_total`; an
//! `info` family `x` becomes a gauge `x_info`; `unknown` becomes `untyped`; `# UNIT`
//! lines, exemplars and the closing `# EOF` are dropped.

/// Converts one OpenMetrics exposition (as prometheus-client writes it) to Prometheus
/// text format 0.0.4.
pub fn from_openmetrics(om: &str) -> String {
    let mut out = String::with_capacity(om.len());
    // HELP comes before TYPE in OpenMetrics; it is held until TYPE tells the sample name.
    let mut help: Option<(&str, &str)> = None;
    for line in om.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, text) = rest.split_once(' ').unwrap_or((rest, ""));
            help = Some((name, text));
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "unknown"));
            let (sample, kind) = match kind {
                "counter" => (format!("{name}_total"), "counter"),
                "info" => (format!("{name}_info"), "gauge"),
                "gauge" | "histogram" | "summary" => (name.to_string(), kind),
                // unknown, stateset, gaugehistogram: no Prometheus text equivalent.
                _ => (name.to_string(), "untyped"),
            };
            let text = match help.take() {
                Some((n, t)) if n == name => t,
                _ => "",
            };
            out.push_str(&format!("# HELP {sample} {}\n", escape_help(text)));
            out.push_str(&format!("# TYPE {sample} {kind}\n"));
        } else if line.starts_with('#') {
            // `# UNIT`, `# EOF`: not part of format 0.0.4.
        } else if !line.is_empty() {
            out.push_str(strip_exemplar(line));
            out.push('\n');
        }
    }
    out
}

/// HELP text in format 0.0.4 escapes backslashes and line feeds.
fn escape_help(text: &str) -> String {
    text.replace('\\', "\\\\").replace('\n', "\\n")
}

/// `name{labels} value # {exemplar labels} value` → `name{labels} value`. Label values
/// may hold `#` or `}` inside quotes, so the label set is skipped quote-aware.
fn strip_exemplar(line: &str) -> &str {
    let bytes = line.as_bytes();
    let mut i = 0;
    let (mut in_labels, mut in_quotes) = (false, false);
    while i < bytes.len() {
        match bytes[i] {
            b'\\' if in_quotes => i += 1,
            b'"' if in_labels => in_quotes = !in_quotes,
            b'{' if !in_quotes => in_labels = true,
            b'}' if !in_quotes => in_labels = false,
            b'#' if !in_labels && !in_quotes => return line[..i].trim_end(),
            _ => {}
        }
        i += 1;
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_every_family_kind() {
        let om = "\
# HELP a_requests Requests.
# TYPE a_requests counter
a_requests_total{code=\"200\"} 3 # {trace_id=\"x\"} 1.0
# HELP a_build Build information.
# TYPE a_build info
a_build_info{version=\"1\"} 1
# HELP a_temp_celsius Temperature.
# TYPE a_temp_celsius gauge
# UNIT a_temp_celsius celsius
a_temp_celsius{room=\"a#b}\"} 21.5
# HELP a_odd Odd.
# TYPE a_odd unknown
a_odd 1
# HELP a_lat Latency.
# TYPE a_lat histogram
a_lat_bucket{le=\"+Inf\"} 1
a_lat_sum 0.5
a_lat_count 1
# EOF
";
        let want = "\
# HELP a_requests_total Requests.
# TYPE a_requests_total counter
a_requests_total{code=\"200\"} 3
# HELP a_build_info Build information.
# TYPE a_build_info gauge
a_build_info{version=\"1\"} 1
# HELP a_temp_celsius Temperature.
# TYPE a_temp_celsius gauge
a_temp_celsius{room=\"a#b}\"} 21.5
# HELP a_odd Odd.
# TYPE a_odd untyped
a_odd 1
# HELP a_lat Latency.
# TYPE a_lat histogram
a_lat_bucket{le=\"+Inf\"} 1
a_lat_sum 0.5
a_lat_count 1
";
        assert_eq!(from_openmetrics(om), want);
    }
}
