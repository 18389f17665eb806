//! Tracing set-up, once per process. Logs go to stderr so stdout stays for command output.
//!
//! Every formatted log line passes through the PII redactor (`sluice_guard::pii`) before it is
//! written, so no field of any event (including errors that quote input) can carry an e-mail
//! address, a card number or a key into the logs. Prompts and outputs are never logged.

use std::collections::HashMap;
use std::io::Write;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::{EnvFilter, fmt, prelude::*};

use crate::settings::LogFormat;

/// Makes one [`RedactingLine`] per event.
#[derive(Clone, Copy, Default)]
pub struct RedactingStderr;

/// Buffers one formatted event and writes it redacted to stderr when dropped.
pub struct RedactingLine {
    buf: Vec<u8>,
}

impl Write for RedactingLine {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for RedactingLine {
    fn drop(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        let line = String::from_utf8_lossy(&self.buf);
        let redacted = sluice_guard::pii::redact(&line);
        let _ = std::io::stderr().lock().write_all(redacted.as_bytes());
    }
}

impl<'a> MakeWriter<'a> for RedactingStderr {
    type Writer = RedactingLine;
    fn make_writer(&'a self) -> Self::Writer {
        RedactingLine { buf: Vec::new() }
    }
}

/// Where traces go: an OTLP/HTTP collector (`{endpoint}/v1/traces`) and the service name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtelConfig {
    pub endpoint: String,
    pub service_name: String,
}

impl OtelConfig {
    /// From the common settings (`OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_SERVICE_NAME`).
    pub fn from_common(common: &crate::CommonSettings, default_name: &str) -> Option<Self> {
        Self::from_settings(
            common.otlp_endpoint.as_deref(),
            common.otel_service_name.as_deref(),
            default_name,
        )
    }

    /// Export is on when an endpoint is set.
    pub fn from_settings(
        endpoint: Option<&str>,
        service_name: Option<&str>,
        default_name: &str,
    ) -> Option<Self> {
        let endpoint = endpoint.map(str::trim).filter(|e| !e.is_empty())?;
        Some(Self {
            endpoint: endpoint.trim_end_matches('/').to_string(),
            service_name: service_name
                .map(str::trim)
                .filter(|n| !n.is_empty())
                .unwrap_or(default_name)
                .to_string(),
        })
    }
}

/// Keeps the trace exporter running; flushes the spans still batched when dropped (hold it in
/// `main` until the process ends).
#[must_use]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(e) = provider.shutdown()
        {
            eprintln!("trace export did not flush: {e}");
        }
    }
}

/// Installs the global subscriber. `RUST_LOG` overrides the default `info` filter. With an
/// [`OtelConfig`], spans are also exported over OTLP/HTTP (W3C trace context crosses processes
/// through [`set_remote_parent`] and [`traceparent_of`]). Calling it twice is harmless (the second call does nothing), which keeps tests
/// simple.
pub fn init(format: LogFormat, otel: Option<OtelConfig>) -> Telemetry {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let provider = otel.and_then(|config| match tracer_provider(&config) {
        Ok(p) => Some(p),
        Err(e) => {
            eprintln!("OpenTelemetry export disabled: {e}");
            None
        }
    });
    // Spans are exported at `info` whatever `RUST_LOG` says: it filters the logs only.
    let otel_layer = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("sluice"))
            .with_filter(LevelFilter::INFO)
    });
    let registry = tracing_subscriber::registry().with(otel_layer);
    let _ = match format {
        LogFormat::Text => registry
            .with(
                fmt::layer()
                    .with_ansi(false)
                    .with_writer(RedactingStderr)
                    .with_filter(filter),
            )
            .try_init(),
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_writer(RedactingStderr)
                    .with_filter(filter),
            )
            .try_init(),
    };
    Telemetry { provider }
}

fn tracer_provider(config: &OtelConfig) -> Result<SdkTracerProvider, String> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(format!("{}/v1/traces", config.endpoint))
        .with_timeout(std::time::Duration::from_secs(5))
        .build()
        .map_err(|e| e.to_string())?;
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            Resource::builder()
                .with_service_name(config.service_name.clone())
                .build(),
        )
        .build())
}

/// Makes `span` (not yet entered) a child of the remote span a W3C `traceparent` names. Does
/// nothing when export is off or the header is malformed.
pub fn set_remote_parent(span: &tracing::Span, traceparent: &str, tracestate: Option<&str>) {
    let mut carrier = HashMap::new();
    carrier.insert("traceparent".to_string(), traceparent.to_string());
    if let Some(state) = tracestate {
        carrier.insert("tracestate".to_string(), state.to_string());
    }
    let cx = TraceContextPropagator::new().extract(&carrier);
    if cx.span().span_context().is_valid() {
        let _ = span.set_parent(cx);
    }
}

/// The W3C `traceparent` of `span`, when spans are exported (else `None`: the span has no
/// OpenTelemetry context).
pub fn traceparent_of(span: &tracing::Span) -> Option<String> {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| {
        format!(
            "00-{}-{}-{:02x}",
            sc.trace_id(),
            sc.span_id(),
            sc.trace_flags().to_u8()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_is_off_without_an_endpoint() {
        assert_eq!(OtelConfig::from_settings(None, None, "x"), None);
        assert_eq!(OtelConfig::from_settings(Some(" "), None, "x"), None);
        let c = OtelConfig::from_settings(Some("http://c:4318/"), None, "sluice-api").expect("on");
        assert_eq!(c.endpoint, "http://c:4318");
        assert_eq!(c.service_name, "sluice-api");
        let c = OtelConfig::from_settings(Some("http://c:4318"), Some("edge"), "sluice-api")
            .expect("on");
        assert_eq!(c.service_name, "edge");
    }

    #[test]
    fn without_the_layer_spans_have_no_context() {
        let span = tracing::info_span!("x");
        set_remote_parent(
            &span,
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            None,
        );
        assert_eq!(traceparent_of(&span), None);
    }
}
