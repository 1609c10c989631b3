//! Logging setup: `tracing` to standard error, human-readable or JSON, filtered by
//! `RUST_LOG` (default `info`), written by a thread of its own.

use std::io::{BufWriter, Write};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// How many lines may wait for the writer thread before loggers wait for room.
const QUEUE_LINES: usize = 128_000;

/// How many bytes of log lines the writer thread gathers before it writes them out.
const WRITE_BUFFER: usize = 64 * 1024;

/// How long the writer thread lets lines gather while they keep coming.
const GATHER: Duration = Duration::from_millis(10);

/// How long dropping the [`LogGuard`] waits for the queued lines to be written.
const STOP_WAIT: Duration = Duration::from_secs(1);

/// Installs the global subscriber. Logs go to standard error so that commands which print
/// results (such as `user create`) keep standard output clean.
///
/// Lines are formatted where they are logged and written by a thread of their own (see
/// [`writer_thread`]): a runtime thread serving requests never blocks in a `write` to the
/// log. Dropping the returned guard waits (up to a second) for the queued lines to be
/// written; keep it until the process ends.
pub fn init(format: LogFormat) -> LogGuard {
    let (writer, guard) = match writer_thread(std::io::stderr()) {
        Ok(started) => started,
        Err(error) => {
            eprintln!("cannot start the log writer thread ({error}); logging directly");
            (LogWriter { queue: None }, LogGuard { running: None })
        }
    };
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

#[derive(Debug)]
enum Message {
    Line(Vec<u8>),
    /// Write out what came before, then stop.
    Stop,
}

/// Where the subscriber writes a formatted line: onto the writer thread's queue or, when
/// that thread could not be started, straight to standard error.
#[derive(Debug, Clone)]
pub struct LogWriter {
    queue: Option<Sender<Message>>,
}

impl Write for LogWriter {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        match &self.queue {
            // A full queue means the sink has stalled: wait for room rather than drop the
            // line. Once the writer thread has stopped (the guard was dropped), lines
            // logged after it go nowhere.
            Some(queue) => {
                let _ = queue.send(Message::Line(line.to_vec()));
                Ok(line.len())
            }
            None => std::io::stderr().write(line),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for LogWriter {
    type Writer = LogWriter;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// Keeps the writer thread. Dropping it writes out the lines queued so far (waiting at
/// most a second for a slow sink) and stops the thread.
#[derive(Debug)]
pub struct LogGuard {
    running: Option<Running>,
}

#[derive(Debug)]
struct Running {
    queue: Sender<Message>,
    stopped: Receiver<()>,
    thread: JoinHandle<()>,
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        let Some(running) = self.running.take() else {
            return;
        };
        // A queue that stays full, or lines that are not written within the wait, mean a
        // stalled sink: the process does not wait for it any longer.
        if running.queue.send_timeout(Message::Stop, STOP_WAIT).is_ok()
            && running.stopped.recv_timeout(STOP_WAIT).is_ok()
        {
            let _ = running.thread.join();
        }
    }
}

/// Starts the thread that writes log lines to `sink`; returns the writer that queues lines
/// for it and the guard that stops it.
///
/// While no line comes, the thread sleeps on the queue, and the first line wakes it. It
/// writes what is queued and then sleeps on a timer for [`GATHER`] instead: lines logged
/// meanwhile only join the queue, and it writes them all at once when it wakes, for as
/// long as lines keep coming. So a busy server's loggers do not wake the thread, and
/// the log costs about a hundred wake-ups and writes a second however many lines there
/// are, instead of one of each per line; a line reaches the sink at most about
/// [`GATHER`] after it was logged. When [`QUEUE_LINES`] lines wait for a stalled sink,
/// loggers wait for room: no line is dropped.
fn writer_thread(sink: impl Write + Send + 'static) -> std::io::Result<(LogWriter, LogGuard)> {
    let (queue, lines) = crossbeam_channel::bounded(QUEUE_LINES);
    let (done, stopped) = crossbeam_channel::bounded(1);
    let mut out = BufWriter::with_capacity(WRITE_BUFFER, sink);
    let thread = std::thread::Builder::new()
        .name("hindsight-log".into())
        .spawn(move || {
            write_until_stopped(&lines, &mut out);
            // A write error has nowhere to be reported: the lines are lost, not the process.
            let _ = out.flush();
            let _ = done.send(());
        })?;
    let guard = LogGuard {
        running: Some(Running {
            queue: queue.clone(),
            stopped,
            thread,
        }),
    };
    Ok((LogWriter { queue: Some(queue) }, guard))
}

/// The writer thread's loop (see [`writer_thread`]): returns at [`Message::Stop`], or
/// when every writer is gone.
fn write_until_stopped(lines: &Receiver<Message>, out: &mut impl Write) {
    // Quiet: sleep on the queue until a line comes.
    while let Ok(first) = lines.recv() {
        // Lines coming: write what is queued, then let more gather on a timer.
        let mut waiting = Some(first);
        while let Some(first) = waiting {
            for message in std::iter::once(first).chain(lines.try_iter()) {
                match message {
                    Message::Line(line) => {
                        let _ = out.write_all(&line);
                    }
                    Message::Stop => return,
                }
            }
            let _ = out.flush();
            std::thread::sleep(GATHER);
            waiting = lines.try_recv().ok();
        }
    }
}

#[cfg(test)]
#[allow(clippy::expect_used)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{mpsc, Arc};

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
        })
        .expect("the writer thread starts");
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

    /// A sink that counts the writes it is given.
    struct Counting {
        writes: Arc<AtomicUsize>,
        bytes: Arc<AtomicUsize>,
    }

    impl Write for Counting {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.writes.fetch_add(1, Ordering::SeqCst);
            self.bytes.fetch_add(bytes.len(), Ordering::SeqCst);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_that_keep_coming_are_written_in_batches_not_one_write_each() {
        let writes = Arc::new(AtomicUsize::new(0));
        let bytes = Arc::new(AtomicUsize::new(0));
        let (writer, guard) = writer_thread(Counting {
            writes: Arc::clone(&writes),
            bytes: Arc::clone(&bytes),
        })
        .expect("the writer thread starts");
        // 2,000 lines, one every 50 µs or more: a line at a time, as a busy server logs.
        // Written as they come, they would take 2,000 writes.
        for i in 0..2_000 {
            let line = format!("{i:>63}\n");
            let _ = writer.make_writer().write_all(line.as_bytes());
            std::thread::sleep(Duration::from_micros(50));
        }
        drop(guard);
        assert_eq!(
            bytes.load(Ordering::SeqCst),
            2_000 * 64,
            "every line arrives"
        );
        let writes = writes.load(Ordering::SeqCst);
        assert!(writes <= 200, "{writes} writes for 2,000 lines");
    }

    #[test]
    fn a_quiet_log_writes_each_line_soon_and_stopping_writes_what_is_queued() {
        let (written, lines) = mpsc::channel();
        let (writer, guard) = writer_thread(Gate {
            open: None,
            written,
        })
        .expect("the writer thread starts");
        let _ = writer.make_writer().write_all(b"first\n");
        // The thread wakes for a line after a quiet spell, without waiting for more.
        let first = lines.recv_timeout(Duration::from_secs(30));
        assert_eq!(first.ok().as_deref(), Some(&b"first\n"[..]));
        let _ = writer.make_writer().write_all(b"second\n");
        let _ = writer.make_writer().write_all(b"third\n");
        drop(guard);
        let rest: Vec<u8> = lines.try_iter().flatten().collect();
        assert_eq!(rest, b"second\nthird\n");
    }
}
