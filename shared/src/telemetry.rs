//! Tracing set-up, once per process. Logs go to stderr so stdout stays for command output.
//!
//! Every formatted log line passes through the PII redactor (`sluice_guard::pii`) before it is
//! written, so no field of any event (including errors that quote input) can carry an e-mail
//! address, a card number or a key into the logs. Prompts and outputs are never logged.

use std::io::Write;

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

/// Installs the global subscriber. `RUST_LOG` overrides the default `info` filter. Calling it
/// twice is harmless (the second call does nothing), which keeps tests simple.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    let _ = match format {
        LogFormat::Text => registry
            .with(fmt::layer().with_ansi(false).with_writer(RedactingStderr))
            .try_init(),
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_writer(RedactingStderr),
            )
            .try_init(),
    };
}
