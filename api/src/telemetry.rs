//! Logging setup: `tracing` to standard error, human-readable or JSON, filtered by
//! `RUST_LOG` (default `info`), written by a thread of its own.

use std::io::{BufWriter, Write};

use tracing_appender::non_blocking::{NonBlocking, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// How many bytes of log lines the writer thread gathers before it writes them out; it
/// also writes whenever no line is waiting.
const WRITE_BUFFER: usize = 64 * 1024;

/// Installs the global subscriber. Logs go to standard error so that commands which print
/// results (such as `user create`) keep standard output clean.
///
/// Lines are formatted where they are logged and written by a thread of their own, which
/// gathers the lines that queue up while it writes and hands them to the kernel together:
/// a runtime thread serving requests never blocks in a `write` to the log, and a busy
/// server makes one system call for many lines rather than one for each. Dropping the
/// returned guard waits (up to a second) for the queued lines to be written; keep it until
/// the process ends.
pub fn init(format: LogFormat) -> WorkerGuard {
    let (writer, guard) = writer_thread(std::io::stderr());
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,async_nats=warn"));
    let registry = tracing_subscriber::registry().with(filter);
    let result = match format {
        LogFormat::Human => registry
            .with(tracing_subscriber::fmt::layer().with_writer(writer))
            .try_init(),
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_span_list(false)
                    .with_writer(writer),
            )
            .try_init(),
    };
    // A subscriber already installed (tests embedding the app) is fine.
    drop(result);
    guard
}

/// A writer whose lines a thread of its own writes to `sink`, through a buffer it flushes
/// whenever no line is waiting.
fn writer_thread(sink: impl Write + Send + 'static) -> (NonBlocking, WorkerGuard) {
    NonBlockingBuilder::default()
        // When 128,000 lines wait for the sink, loggers wait for room: no line is dropped.
        .lossy(false)
        .thread_name("hindsight-log")
        .finish(BufWriter::with_capacity(WRITE_BUFFER, sink))
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::time::Duration;

    use tracing_subscriber::fmt::MakeWriter;

    use super::*;

    /// A sink that takes nothing until it is opened, as a stalled log collector would.
    struct Gate {
        open: Option<mpsc::Receiver<()>>,
        written: mpsc::Sender<Vec<u8>>,
    }

    impl Write for Gate {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            if let Some(open) = self.open.take() {
                let _ = open.recv();
            }
            let _ = self.written.send(bytes.to_vec());
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn loggers_do_not_wait_for_a_stalled_sink_and_every_line_arrives_in_order() {
        let (open, opened) = mpsc::channel();
        let (written, lines) = mpsc::channel();
        let (writer, guard) = writer_thread(Gate {
            open: Some(opened),
            written,
        });
        // 5,000 lines of 100 bytes: far beyond the buffer, so the thread is stuck in the
        // sink while they are logged.
        let (logged, logging) = mpsc::channel();
        std::thread::spawn(move || {
            for i in 0..5_000 {
                let line = format!("{i:>99}\n");
                let _ = writer.make_writer().write_all(line.as_bytes());
            }
            let _ = logged.send(());
        });
        assert!(
            logging.recv_timeout(Duration::from_secs(30)).is_ok(),
            "logging waited for the stalled sink"
        );
        let _ = open.send(());
        drop(guard);
        let text: Vec<u8> = lines.try_iter().flatten().collect();
        let expected: String = (0..5_000).map(|i| format!("{i:>99}\n")).collect();
        assert_eq!(String::from_utf8_lossy(&text), expected);
    }
}
