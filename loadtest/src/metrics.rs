//! Scraping sealpipe's Prometheus `/metrics` before and after a run, and the deltas.
//!
//! A plain HTTP/1.0 GET over a std `TcpStream` with timeouts is all the endpoint needs (HTTP/1.0
//! means the server closes after the body, so no chunked decoding). The text format is parsed
//! just far enough to key each sample by name and labels.

use anyhow::{Context, Result, bail};
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

/// The families whose deltas are reported next to the client's numbers.
pub const FAMILIES: [&str; 3] = [
    "sealpipe_bytes_total",
    "sealpipe_handshakes_total",
    "sealpipe_connections_closed_total",
];

/// Bodies larger than this are refused: a metrics page is kilobytes.
const MAX_BODY: u64 = 8 << 20;

/// Samples keyed by `name{labels}` exactly as the server wrote them.
pub type Samples = BTreeMap<String, f64>;

/// Splits `http://host:port/path` (or `host:port`) into address and path.
pub fn parse_url(url: &str) -> Result<(String, String)> {
    let rest = match url.split_once("://") {
        Some(("http", r)) => r,
        Some((scheme, _)) => bail!("metrics URL {url:?}: only http is supported, not {scheme}"),
        None => url,
    };
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/metrics"),
    };
    if host.is_empty() {
        bail!("metrics URL {url:?} has no host");
    }
    Ok((host.to_string(), path.to_string()))
}

/// Fetches and parses one scrape.
pub fn scrape(url: &str) -> Result<Samples> {
    let (host, path) = parse_url(url)?;
    let addr = host
        .to_socket_addrs()
        .with_context(|| format!("resolving {host}"))?
        .next()
        .with_context(|| format!("{host} resolves to nothing"))?;
    let timeout = Duration::from_secs(5);
    let mut s = TcpStream::connect_timeout(&addr, timeout)
        .with_context(|| format!("connecting to metrics {url}"))?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: {host}\r\nAccept: text/plain\r\n\r\n"
    )?;
    let mut resp = Vec::new();
    s.take(MAX_BODY)
        .read_to_end(&mut resp)
        .with_context(|| format!("reading metrics {url}"))?;
    let text = String::from_utf8_lossy(&resp);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("metrics {url}: no HTTP header end"))?;
    let status = head.lines().next().unwrap_or("");
    if status.split_whitespace().nth(1) != Some("200") {
        bail!("metrics {url}: {status}");
    }
    Ok(parse_text(body))
}

/// Parses the Prometheus text format; comments and malformed lines are skipped.
pub fn parse_text(body: &str) -> Samples {
    let mut out = Samples::new();
    for line in body.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        // The series ends at the first space outside a label block's quoted values.
        let mut in_braces = false;
        let mut in_quotes = false;
        let mut escaped = false;
        let mut end = None;
        for (i, c) in line.char_indices() {
            if in_quotes {
                match (escaped, c) {
                    (true, _) => escaped = false,
                    (false, '\\') => escaped = true,
                    (false, '"') => in_quotes = false,
                    _ => {}
                }
                continue;
            }
            match c {
                '{' => in_braces = true,
                '}' => in_braces = false,
                '"' if in_braces => in_quotes = true,
                ' ' | '\t' if !in_braces => {
                    end = Some(i);
                    break;
                }
                _ => {}
            }
        }
        let Some(end) = end else { continue };
        let series = &line[..end];
        let value = line[end..].split_whitespace().next().unwrap_or("");
        if let Ok(v) = value.parse::<f64>() {
            out.insert(series.to_string(), v);
        }
    }
    out
}

/// The family name of a series key (`name{...}` -> `name`).
fn family(series: &str) -> &str {
    series.split('{').next().unwrap_or(series)
}

/// One series' change over a run.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Delta {
    pub series: String,
    pub before: f64,
    pub after: f64,
    pub delta: f64,
}

/// Deltas of the reported families; a series absent before counts from zero.
pub fn deltas(before: &Samples, after: &Samples) -> Vec<Delta> {
    after
        .iter()
        .filter(|(k, _)| FAMILIES.contains(&family(k)))
        .map(|(k, &a)| {
            let b = before.get(k).copied().unwrap_or(0.0);
            Delta {
                series: k.clone(),
                before: b,
                after: a,
                delta: a - b,
            }
        })
        .collect()
}

/// Everything learned from one endpoint.
#[derive(Debug, Clone, Serialize, Default)]
pub struct EndpointReport {
    pub url: String,
    pub deltas: Vec<Delta>,
    pub error: Option<String>,
}

/// Before-scrapes of every URL, so the after-scrape can subtract.
pub struct Scraper {
    before: Vec<(String, Result<Samples>)>,
}

impl Scraper {
    /// Scrapes each URL once; an unreachable endpoint is reported, not fatal.
    pub fn before(urls: &[String]) -> Scraper {
        Scraper {
            before: urls.iter().map(|u| (u.clone(), scrape(u))).collect(),
        }
    }

    /// Scrapes again and pairs with the first scrape.
    pub fn after(self) -> Vec<EndpointReport> {
        self.before
            .into_iter()
            .map(|(url, b)| {
                let a = scrape(&url);
                match (b, a) {
                    (Ok(b), Ok(a)) => EndpointReport {
                        deltas: deltas(&b, &a),
                        url,
                        error: None,
                    },
                    (Err(e), _) | (_, Err(e)) => EndpointReport {
                        url,
                        deltas: Vec::new(),
                        error: Some(format!("{e:#}")),
                    },
                }
            })
            .collect()
    }
}

/// Lines for the human table: non-zero deltas only.
pub fn print_reports(reports: &[EndpointReport]) {
    for r in reports {
        println!("server metrics {}:", r.url);
        if let Some(e) = &r.error {
            println!("  scrape failed: {e}");
            continue;
        }
        let mut any = false;
        for d in r.deltas.iter().filter(|d| d.delta != 0.0) {
            println!("  {:<70} {:>+16}", d.series, d.delta);
            any = true;
        }
        if !any {
            println!("  (no change in {})", FAMILIES.join(", "));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_text_format() {
        let body = "# HELP sealpipe_bytes_total bytes\n# TYPE sealpipe_bytes_total counter\n\
            sealpipe_bytes_total{direction=\"up\",shard=\"0\"} 1024\n\
            sealpipe_bytes_total{direction=\"down\",shard=\"0\"} 2.5e3 1700000000\n\
            sealpipe_handshakes_total{result=\"a b}c\\\"\"} 3\n\
            process_open_fds 12\n\
            garbage_without_value\n";
        let s = parse_text(body);
        assert_eq!(
            s["sealpipe_bytes_total{direction=\"up\",shard=\"0\"}"],
            1024.0
        );
        assert_eq!(
            s["sealpipe_bytes_total{direction=\"down\",shard=\"0\"}"],
            2500.0
        );
        assert_eq!(s["sealpipe_handshakes_total{result=\"a b}c\\\"\"}"], 3.0);
        assert_eq!(s["process_open_fds"], 12.0);
        assert_eq!(s.len(), 4);
    }

    #[test]
    fn deltas_only_for_reported_families() {
        let before = parse_text("sealpipe_bytes_total{d=\"up\"} 10\nprocess_open_fds 5\n");
        let after = parse_text(
            "sealpipe_bytes_total{d=\"up\"} 25\nsealpipe_handshakes_total{r=\"ok\"} 4\nprocess_open_fds 9\n",
        );
        let d = deltas(&before, &after);
        assert_eq!(d.len(), 2);
        assert_eq!(d[0].series, "sealpipe_bytes_total{d=\"up\"}");
        assert_eq!(d[0].delta, 15.0);
        assert_eq!(d[1].delta, 4.0);
    }

    #[test]
    fn urls() {
        assert_eq!(
            parse_url("http://127.0.0.1:9100/metrics").unwrap(),
            ("127.0.0.1:9100".into(), "/metrics".into())
        );
        assert_eq!(
            parse_url("127.0.0.1:9100").unwrap(),
            ("127.0.0.1:9100".into(), "/metrics".into())
        );
        assert!(parse_url("https://x/").is_err());
    }
}
