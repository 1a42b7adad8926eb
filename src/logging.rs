//! Where log lines go: to stderr, through a queue that never makes the code that logs wait.
//!
//! Written straight to stderr, a log line waits whenever stderr's reader stops reading: a pipe
//! holds 64 KiB, and Docker's log driver in its default blocking mode (on a full disk, say), a
//! stalled journald, or a `| tee` onto a full disk stop reading. Every request logs a line, so
//! once the pipe was full every thread of the async runtime waited in `write`, and the server
//! answered nothing, `/health` included, after about 190 requests. Here each line goes to a
//! queue of at most `--log-buffer-bytes` (1 MiB, as Docker's non-blocking mode buffers), which
//! one thread writes to stderr. A line that finds the queue full is dropped and counted
//! (`turbine_log_lines_dropped_total`); once lines are written again, a warning says how many
//! were lost. [`flush`] writes what is queued before the process exits.

use std::io::Write;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::OnceLock;
use std::time::Duration;

/// The default `--log-buffer-bytes`.
pub const DEFAULT_BUFFER_BYTES: usize = 1 << 20;

/// Lines dropped since the process started (`turbine_log_lines_dropped_total`).
static DROPPED: AtomicU64 = AtomicU64::new(0);

/// The queue, once [`QueuedStderr::start`] made it.
static QUEUE: OnceLock<Queue> = OnceLock::new();

struct Queue {
    tx: Sender<Message>,
    /// Bytes of lines sent and not yet written, and the most there may be.
    queued: AtomicUsize,
    limit: usize,
}

enum Message {
    Line(Vec<u8>),
    /// Everything sent before it is written: say so.
    Flush(Sender<()>),
}

/// Lines dropped since the process started, for want of room in the queue.
pub fn dropped() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// The writer the log subscriber makes for each line.
#[derive(Clone, Copy)]
pub struct QueuedStderr;

impl QueuedStderr {
    /// Starts the thread that writes the queue to stderr (once; later calls change nothing),
    /// with room for `limit` bytes of lines.
    pub fn start(limit: usize) -> Self {
        QUEUE.get_or_init(|| {
            let (tx, rx) = mpsc::channel::<Message>();
            let spawned = std::thread::Builder::new()
                .name("log-writer".into())
                .spawn(move || write_lines(rx));
            if let Err(e) = spawned {
                // Lines are then written where they are made (`send` finds no reader).
                eprintln!("cannot start the log writer thread: {e}");
            }
            Queue {
                tx,
                queued: AtomicUsize::new(0),
                limit,
            }
        });
        QueuedStderr
    }
}

/// The writer thread: each line to stderr in order; after a line is written, a warning for
/// those dropped meanwhile (queued like any other line).
fn write_lines(rx: mpsc::Receiver<Message>) {
    let mut reported = 0u64;
    for message in rx {
        match message {
            Message::Line(line) => {
                // Nothing to do about a failed write: stderr is the last place to say so.
                let _ = std::io::stderr().write_all(&line);
                if let Some(q) = QUEUE.get() {
                    q.queued.fetch_sub(line.len(), Ordering::Relaxed);
                }
                let dropped = dropped();
                if dropped > reported {
                    let lost = dropped - reported;
                    reported = dropped;
                    tracing::warn!(
                        lines = lost,
                        "{lost} log lines were dropped: stderr did not take them as fast as \
                         they came (its reader was blocked or slow)"
                    );
                }
            }
            Message::Flush(done) => {
                let _ = done.send(());
            }
        }
    }
}

/// One log line, sent to the queue when the subscriber is done with it.
pub struct Line(Vec<u8>);

impl Write for Line {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for Line {
    fn drop(&mut self) {
        if !self.0.is_empty() {
            send(std::mem::take(&mut self.0));
        }
    }
}

fn send(line: Vec<u8>) {
    let Some(q) = QUEUE.get() else {
        let _ = std::io::stderr().write_all(&line);
        return;
    };
    let len = line.len();
    let taken = q
        .queued
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
            (n + len <= q.limit).then_some(n + len)
        });
    if taken.is_err() {
        DROPPED.fetch_add(1, Ordering::Relaxed);
        return;
    }
    if let Err(mpsc::SendError(Message::Line(line))) = q.tx.send(Message::Line(line)) {
        // No writer thread: write it here.
        q.queued.fetch_sub(len, Ordering::Relaxed);
        let _ = std::io::stderr().write_all(&line);
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for QueuedStderr {
    type Writer = Line;

    fn make_writer(&'a self) -> Line {
        Line(Vec::new())
    }
}

/// Waits until the lines logged so far are written, for at most `limit` (stderr may be the
/// blocked one). Called before the process exits.
pub fn flush(limit: Duration) {
    let Some(q) = QUEUE.get() else {
        return;
    };
    let (done_tx, done_rx) = mpsc::channel();
    if q.tx.send(Message::Flush(done_tx)).is_ok() {
        let _ = done_rx.recv_timeout(limit);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_go_through_the_queue_and_past_its_room_are_dropped_and_counted() {
        // The process-wide queue, as the binary has it, with room for two 8-byte lines.
        QueuedStderr::start(16);
        let q = QUEUE.get().unwrap();
        assert_eq!(q.limit, 16);
        let before = dropped();
        // Hold the room as if the writer were blocked on two lines.
        q.queued.store(16, Ordering::Relaxed);
        let mut line = tracing_subscriber::fmt::MakeWriter::make_writer(&QueuedStderr);
        line.write_all(b"dropped\n").unwrap();
        drop(line);
        assert_eq!(dropped(), before + 1);
        q.queued.store(0, Ordering::Relaxed);
        let mut line = tracing_subscriber::fmt::MakeWriter::make_writer(&QueuedStderr);
        line.write_all(b"written\n").unwrap();
        drop(line);
        assert_eq!(dropped(), before + 1);
        // Flushed: the line written, its room given back.
        let t0 = std::time::Instant::now();
        flush(Duration::from_secs(10));
        assert!(t0.elapsed() < Duration::from_secs(10));
        assert_eq!(q.queued.load(Ordering::Relaxed), 0);
    }
}
