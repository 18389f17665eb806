//! The trace context a job carries through the queue, so the worker's spans join the caller's
//! trace.

use axum::http::HeaderMap;
use sluice_proto::TraceContext;

/// The job's trace context. With OpenTelemetry export on, the current span's (which continues
/// the caller's trace, see [`crate::metrics::track`]); otherwise it continues the caller's W3C
/// trace id when it sent a valid `traceparent`, else starts one.
pub fn trace_context(headers: &HeaderMap) -> TraceContext {
    // The caller's vendor trace state, passed on as it came (bounded).
    let tracestate = || {
        headers
            .get("tracestate")
            .and_then(|v| v.to_str().ok())
            .filter(|v| v.len() <= 512)
            .map(str::to_string)
    };
    if let Some(traceparent) = sluice_shared::telemetry::traceparent_of(&tracing::Span::current()) {
        return TraceContext {
            traceparent: Some(traceparent),
            tracestate: tracestate(),
        };
    }
    let incoming = headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .filter(|v| valid_traceparent(v));
    let trace_id = match incoming {
        Some(tp) => tp[3..35].to_string(),
        None => hex::encode(rand::random::<[u8; 16]>()),
    };
    let span_id = hex::encode(rand::random::<[u8; 8]>());
    TraceContext {
        traceparent: Some(format!("00-{trace_id}-{span_id}-01")),
        tracestate: incoming.and_then(|_| tracestate()),
    }
}

fn valid_traceparent(v: &str) -> bool {
    let parts: Vec<&str> = v.split('-').collect();
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    parts.len() == 4
        && parts[0] == "00"
        && hex(parts[1], 32)
        && parts[1] != "0".repeat(32)
        && hex(parts[2], 16)
        && hex(parts[3], 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn continues_a_valid_trace_and_replaces_an_invalid_one() {
        let mut headers = HeaderMap::new();
        let tid = "4bf92f3577b34da6a3ce929d0e0e4736";
        headers.insert(
            "traceparent",
            format!("00-{tid}-00f067aa0ba902b7-01")
                .parse()
                .expect("header"),
        );
        let tp = trace_context(&headers).traceparent.expect("set");
        assert!(tp.starts_with(&format!("00-{tid}-")));
        assert!(valid_traceparent(&tp));

        headers.insert("traceparent", "garbage".parse().expect("header"));
        let tp = trace_context(&headers).traceparent.expect("set");
        assert!(valid_traceparent(&tp));
        assert!(!tp.contains(tid));
    }
}
