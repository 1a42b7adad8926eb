//! The thin runtime around the queue [`State`]: a shared [`Queue`] that HTTP handlers submit
//! to and cancel from, and one batcher task per device that forms batches and hands them to
//! that device's worker thread through a channel of capacity one. The channel is the prefetch:
//! while the device runs batch k, the batcher forms k+1 and parks it there (TEI's design); the
//! worker then tops k+1 up with entries of its key that arrived meanwhile. Changes to the
//! device's adapters (`POST /v1/load_lora_adapter`) pass through the same slot, between
//! batches.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use image::RgbImage;
use tokio::sync::{mpsc, Notify};

use super::error::{BackendError, InferError};
use super::metrics::{DropReason, Metrics};
use super::queue::{Entry, Next, QueuePolicy, RequestId, ShapeKey, State};
use super::stall::Liveness;
use super::worker::{AdapterCommand, Work};
use crate::model::pipeline::ImageRequest;

/// What travels with each queued image.
#[derive(Debug)]
pub struct Item {
    /// Position of the image in its request's `data`.
    pub index: usize,
    pub image: ImageRequest,
    /// Closed when the request is gone (client disconnected, timed out, already failed).
    pub reply: mpsc::UnboundedSender<ItemOutcome>,
    /// The request's span, so the worker's logs carry the request id across the thread hop.
    pub span: tracing::Span,
    /// The image's own span while its batch runs on the device (its request's child), with
    /// `--otlp-endpoint`; none before and otherwise.
    pub run: tracing::Span,
}

/// One image's result, sent back to its request.
#[derive(Debug)]
pub struct ItemOutcome {
    pub index: usize,
    pub result: Result<RgbImage, BackendError>,
    /// `Some(k)`: the image's preview `k` (a stream's `partial_images`), not the image; its
    /// image (or error) follows.
    pub partial: Option<usize>,
}

/// The queue shared by every handler and every device.
#[derive(Debug)]
pub struct Queue {
    state: Mutex<State<Item>>,
    /// Wakes the batchers on new entries.
    arrivals: Notify,
    metrics: Arc<Metrics>,
    workers: AtomicUsize,
    /// Set (under the state's lock) once no device is left: why every submit fails.
    closed: OnceLock<BackendError>,
}

impl Queue {
    pub fn new(policy: QueuePolicy, metrics: Arc<Metrics>) -> Self {
        Queue {
            state: Mutex::new(State::new(policy, Instant::now())),
            arrivals: Notify::new(),
            metrics,
            workers: AtomicUsize::new(1),
            closed: OnceLock::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State<Item>> {
        // No method of `State` panics between two consistent states, so a poisoned lock (a
        // panic elsewhere while holding it) still guards consistent data.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn set_workers(&self, n: usize) {
        self.workers.store(n.max(1), Ordering::Relaxed);
    }

    /// How many workers serve the queue (scales the throughput estimate).
    pub(crate) fn workers(&self) -> usize {
        self.workers.load(Ordering::Relaxed)
    }

    /// Puts back images a device took but can no longer run, for the other devices; fails
    /// them instead when no device is left ([`Queue::close`]).
    pub(crate) fn requeue(&self, entries: Vec<Entry<Item>>) {
        if entries.is_empty() {
            return;
        }
        let mut state = self.lock();
        if let Some(error) = self.closed.get() {
            drop(state);
            self.metrics
                .dropped(DropReason::DeviceFailed, entries.len());
            fail_all(entries, error);
            return;
        }
        state.requeue(entries);
        self.metrics.set_queue_images(state.len());
        drop(state);
        self.arrivals.notify_waiters();
    }

    /// No device is left to run anything: fails every queued image with `error`, and every
    /// later `submit` too; returns how many images were queued.
    pub(crate) fn close(&self, error: BackendError) -> usize {
        let failed = {
            let mut state = self.lock();
            let _ = self.closed.set(error.clone());
            let failed = state.remove_where(|_| true);
            self.metrics.set_queue_images(state.len());
            failed
        };
        let n = failed.len();
        self.metrics.dropped(DropReason::DeviceFailed, n);
        fail_all(failed, &error);
        n
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Queues all of a request's images, or answers `QueueFull` with a `Retry-After` from the
    /// measured throughput: the time for the images over capacity to leave the queue.
    pub fn submit(&self, entries: Vec<Entry<Item>>) -> Result<(), InferError> {
        let count = entries.len();
        let mut state = self.lock();
        if let Some(error) = self.closed.get() {
            return Err(error.clone().into());
        }
        match state.try_push(entries) {
            Ok(()) => {
                self.metrics.set_queue_images(state.len());
                self.metrics.enqueued(count);
                drop(state);
                self.arrivals.notify_waiters();
                Ok(())
            }
            Err(full) => {
                drop(state);
                let over = (full.queued + full.requested)
                    .saturating_sub(full.capacity)
                    .max(1);
                let secs = match self.metrics.throughput() {
                    Some(rate) if rate > 0.0 => over as f64 / rate,
                    _ => 1.0,
                };
                Err(InferError::QueueFull {
                    queued: full.queued,
                    requested: full.requested,
                    capacity: full.capacity,
                    retry_after: Duration::from_secs_f64(secs.clamp(1.0, 3600.0)),
                })
            }
        }
    }

    /// Drops a request's images that have not started; returns how many.
    pub fn cancel(&self, request: RequestId, reason: DropReason) -> usize {
        let mut state = self.lock();
        let n = state.cancel(request).len();
        self.metrics.set_queue_images(state.len());
        drop(state);
        self.metrics.dropped(reason, n);
        n
    }

    /// More entries of `key` for a batch formed earlier (see the module doc).
    pub(crate) fn top_up(&self, key: &ShapeKey, room: usize) -> Vec<Entry<Item>> {
        if room == 0 {
            return Vec::new();
        }
        let mut state = self.lock();
        let taken = state.take_key(key, room);
        self.metrics.set_queue_images(state.len());
        taken
    }

    /// Removes entries nobody waits for any more, counting them by reason.
    fn purge(&self, state: &mut State<Item>, now: Instant) {
        let expired = state.take_expired(now).len();
        let gone = state.remove_where(|e| e.payload.reply.is_closed()).len();
        self.metrics.dropped(DropReason::Timeout, expired);
        self.metrics.dropped(DropReason::ClientDisconnected, gone);
    }
}

/// Answers each image with `error` (a request that is gone is skipped).
pub(crate) fn fail_all(entries: Vec<Entry<Item>>, error: &BackendError) {
    for e in entries {
        crate::telemetry::fail(&e.payload.run, error.to_string());
        let _ = e.payload.reply.send(ItemOutcome {
            index: e.payload.index,
            result: Err(error.clone()),
            partial: None,
        });
    }
}

/// Forms batches for one device until its worker is gone (it closes the channel when its
/// device fails: then a batch formed meanwhile goes back to the queue, for the other devices).
///
/// Changes to the device's adapters (`commands`) go to the worker through the same slot, ahead
/// of the next batch: the batcher holds the slot while it waits for images, so nothing else
/// could get into the channel, and the worker runs them between batches in the order sent.
pub async fn run_batcher(
    queue: Arc<Queue>,
    to_worker: mpsc::Sender<Work>,
    mut commands: mpsc::UnboundedReceiver<AdapterCommand>,
    max_batch: usize,
    liveness: Arc<Liveness>,
) {
    // Once the App (the commands' only sender) is gone, no more come.
    let mut commands_open = true;
    loop {
        // Wait for the prefetch slot first, so a batch is formed as late as possible. A worker
        // declared stalled gets nothing more: the queue's images go to the other devices.
        let permit = tokio::select! {
            permit = to_worker.reserve() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
            _ = liveness.wait_stalled() => return,
        };
        let work = loop {
            if to_worker.is_closed() || liveness.stalled() {
                return;
            }
            let arrived = queue.arrivals.notified();
            tokio::pin!(arrived);
            // Registered before looking at the queue, so no arrival is missed in between.
            arrived.as_mut().enable();
            // A command waiting goes first: it is answered once the batch before it is done.
            let command = if commands_open {
                match commands.try_recv() {
                    Ok(command) => Some(command),
                    Err(mpsc::error::TryRecvError::Empty) => None,
                    Err(mpsc::error::TryRecvError::Disconnected) => {
                        commands_open = false;
                        None
                    }
                }
            } else {
                None
            };
            if let Some(command) = command {
                break Work::Adapter(command);
            }
            let next = {
                let now = Instant::now();
                let mut state = queue.lock();
                queue.purge(&mut state, now);
                let next = state.next_batch(now, max_batch);
                queue.metrics.set_queue_images(state.len());
                next
            };
            let until = match next {
                Next::Batch(batch) => break Work::Batch(batch),
                Next::WaitUntil(t) => Some(t),
                Next::Empty => None,
            };
            let sleep = async {
                match until {
                    Some(t) => tokio::time::sleep_until(t.into()).await,
                    None => std::future::pending().await,
                }
            };
            let command = tokio::select! {
                _ = sleep => None,
                _ = &mut arrived => None,
                _ = to_worker.closed() => None,
                _ = liveness.wait_stalled() => None,
                command = commands.recv(), if commands_open => match command {
                    Some(command) => Some(command),
                    None => {
                        commands_open = false;
                        None
                    }
                },
            };
            if let Some(command) = command {
                break Work::Adapter(command);
            }
        };
        let mut batch = match work {
            Work::Batch(batch) => batch,
            command => {
                permit.send(command);
                continue;
            }
        };
        // A worker whose device failed closes the channel: the batch goes back for the other
        // devices. Should it close between this look and the send, it still receives what was
        // sent until this task drops the channel, so nothing is lost either way.
        if to_worker.is_closed() || liveness.stalled() {
            queue.requeue(batch.entries);
            return;
        }
        batch.parked = Some(liveness.hold(&batch.entries));
        permit.send(Work::Batch(batch));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::queue::{Batch, Guidance, Priority};

    /// The next batch a batcher hands its worker (it sends nothing else).
    async fn next_batch(rx: &mut mpsc::Receiver<Work>) -> Batch<Item> {
        match rx.recv().await {
            Some(Work::Batch(b)) => b,
            Some(Work::Adapter(_)) => panic!("a batcher sent an adapter command"),
            None => panic!("the batcher stopped"),
        }
    }

    /// A batcher for `q` sending to `to_worker`, and the sender of its adapter commands.
    fn spawn_batcher(
        q: &Arc<Queue>,
        to_worker: mpsc::Sender<Work>,
    ) -> (
        mpsc::UnboundedSender<AdapterCommand>,
        tokio::task::JoinHandle<()>,
    ) {
        let (commands, commands_rx) = mpsc::unbounded_channel();
        let batcher = tokio::spawn(run_batcher(
            q.clone(),
            to_worker,
            commands_rx,
            2,
            Default::default(),
        ));
        (commands, batcher)
    }

    fn policy(capacity: usize) -> QueuePolicy {
        QueuePolicy {
            capacity,
            aging: Duration::from_secs(10),
            max_batch_delay: Duration::from_millis(5),
        }
    }

    fn entry(request: u64, reply: &mpsc::UnboundedSender<ItemOutcome>) -> Entry<Item> {
        let now = Instant::now();
        Entry {
            request: RequestId(request),
            key: ShapeKey {
                width: 64,
                height: 64,
                steps: 1,
                guidance: Guidance::Off,
                init_step: None,
                adapter: None,
            },
            priority: Priority::Normal,
            enqueued: now,
            deadline: now + Duration::from_secs(60),
            payload: Item {
                index: 0,
                image: ImageRequest {
                    prompt: "p".into(),
                    negative_prompt: String::new(),
                    seed: request,
                    init_image: None,
                    partials: None,
                },
                reply: reply.clone(),
                span: tracing::Span::none(),
                run: tracing::Span::none(),
            },
        }
    }

    #[test]
    fn full_queue_answers_with_retry_after_from_throughput() {
        let metrics = Arc::new(Metrics::new());
        metrics.calibrate(2, Duration::from_secs(1), 1);
        let q = Queue::new(policy(2), metrics);
        let (tx, _rx) = mpsc::unbounded_channel();
        q.submit(vec![entry(1, &tx), entry(1, &tx)]).unwrap();
        match q.submit(vec![
            entry(2, &tx),
            entry(2, &tx),
            entry(2, &tx),
            entry(2, &tx),
            entry(2, &tx),
            entry(2, &tx),
        ]) {
            // 6 images over capacity at 2 images/s: 3 s.
            Err(InferError::QueueFull { retry_after, .. }) => {
                assert_eq!(retry_after, Duration::from_secs(3))
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(q.len(), 2);
    }

    #[test]
    fn cancel_counts_dropped_images() {
        let metrics = Arc::new(Metrics::new());
        let q = Queue::new(policy(8), metrics.clone());
        let (tx, _rx) = mpsc::unbounded_channel();
        q.submit(vec![entry(1, &tx), entry(1, &tx), entry(2, &tx)])
            .unwrap();
        assert_eq!(q.cancel(RequestId(1), DropReason::ClientDisconnected), 2);
        assert_eq!(q.len(), 1);
        assert!(metrics
            .render()
            .contains("turbine_images_dropped_total{reason=\"client_disconnected\"} 2"));
        assert!(metrics.render().contains("turbine_queue_images 1"));
    }

    #[tokio::test]
    async fn batcher_skips_gone_clients_and_prefetches_one_batch() {
        let metrics = Arc::new(Metrics::new());
        let q = Arc::new(Queue::new(policy(16), metrics.clone()));
        let (to_worker, mut from_batcher) = mpsc::channel(1);
        let _batcher = spawn_batcher(&q, to_worker);
        let (gone_tx, gone_rx) = mpsc::unbounded_channel();
        drop(gone_rx);
        let (tx, _rx) = mpsc::unbounded_channel();
        q.submit(vec![entry(1, &gone_tx)]).unwrap();
        q.submit(vec![
            entry(2, &tx),
            entry(3, &tx),
            entry(4, &tx),
            entry(5, &tx),
            entry(6, &tx),
        ])
        .unwrap();
        let first = next_batch(&mut from_batcher).await;
        let seeds: Vec<u64> = first.entries.iter().map(|e| e.payload.image.seed).collect();
        assert_eq!(seeds, [2, 3]);
        // The worker has not taken another batch: exactly one more is formed and parked.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(q.len(), 1);
        let second = next_batch(&mut from_batcher).await;
        assert_eq!(second.entries.len(), 2);
        let third = next_batch(&mut from_batcher).await;
        assert_eq!(third.entries.len(), 1);
        assert!(metrics
            .render()
            .contains("turbine_images_dropped_total{reason=\"client_disconnected\"} 1"));
    }

    /// Images handed back by a failed device run before later arrivals, in their first order;
    /// once the queue is closed (no device left) they, everything queued and every later
    /// request fail with the device's error.
    #[test]
    fn requeued_images_keep_their_place_and_a_closed_queue_fails_everything() {
        let q = Queue::new(policy(8), Arc::new(Metrics::new()));
        let (tx, mut rx) = mpsc::unbounded_channel();
        q.submit(vec![entry(1, &tx), entry(2, &tx)]).unwrap();
        let taken = match q
            .lock()
            .next_batch(Instant::now() + Duration::from_secs(1), 2)
        {
            Next::Batch(b) => b.entries,
            _ => panic!("no batch"),
        };
        q.submit(vec![entry(3, &tx)]).unwrap();
        q.requeue(taken);
        let order = match q
            .lock()
            .next_batch(Instant::now() + Duration::from_secs(1), 3)
        {
            Next::Batch(b) => b.entries,
            _ => panic!("no batch"),
        };
        let seeds: Vec<u64> = order.iter().map(|e| e.payload.image.seed).collect();
        assert_eq!(seeds, [1, 2, 3]);
        q.requeue(order);

        let error = BackendError::DeviceFailed {
            device: "cuda:0".into(),
            message: "CUDA_ERROR_ILLEGAL_ADDRESS".into(),
        };
        assert_eq!(q.close(error), 3);
        assert!(q.is_empty());
        for _ in 0..3 {
            let o = rx.try_recv().unwrap();
            assert!(matches!(o.result, Err(BackendError::DeviceFailed { .. })));
        }
        match q.submit(vec![entry(4, &tx)]) {
            Err(InferError::Backend(BackendError::DeviceFailed { device, .. })) => {
                assert_eq!(device, "cuda:0")
            }
            other => panic!("{other:?}"),
        }
        // Handed back after the close: answered at once too.
        q.requeue(vec![entry(5, &tx)]);
        assert!(rx.try_recv().unwrap().result.is_err());
        assert!(q.is_empty());
    }

    /// A worker that closed its channel (its device failed) makes its batcher stop without
    /// taking anything more from the queue, which the other devices' batchers serve.
    #[tokio::test]
    async fn a_batcher_whose_worker_closed_the_channel_stops_and_takes_nothing() {
        let q = Arc::new(Queue::new(policy(8), Arc::new(Metrics::new())));
        let (to_worker, mut from_batcher) = mpsc::channel(1);
        let (_commands, batcher) = spawn_batcher(&q, to_worker);
        // Let it reserve the slot and wait for arrivals, then close as a failing worker does.
        tokio::time::sleep(Duration::from_millis(20)).await;
        from_batcher.close();
        tokio::time::timeout(Duration::from_secs(10), batcher)
            .await
            .expect("the batcher stops")
            .unwrap();
        let (tx, _rx) = mpsc::unbounded_channel();
        q.submit(vec![entry(1, &tx)]).unwrap();
        assert_eq!(q.len(), 1);
        assert!(from_batcher.recv().await.is_none());
    }

    /// A change to the adapters reaches the worker through the slot the batcher holds while
    /// the queue is empty, and goes ahead of images that are waiting; once the server drops
    /// the commands' sender, batches still flow.
    #[tokio::test]
    async fn adapter_commands_pass_through_the_batchers_slot_ahead_of_waiting_images() {
        let q = Arc::new(Queue::new(policy(8), Arc::new(Metrics::new())));
        let (to_worker, mut from_batcher) = mpsc::channel(1);
        let (commands, _batcher) = spawn_batcher(&q, to_worker);
        let unload = |slot| {
            let (done, _) = tokio::sync::oneshot::channel();
            AdapterCommand::Unload { slot, done }
        };
        let slot_of = |work: Option<Work>| match work {
            Some(Work::Adapter(AdapterCommand::Unload { slot, .. })) => slot,
            Some(Work::Adapter(_)) => panic!("another command"),
            Some(Work::Batch(_)) => panic!("a batch, not the command"),
            None => panic!("the batcher stopped"),
        };
        // Idle: the batcher holds the slot, waiting for images.
        tokio::time::sleep(Duration::from_millis(20)).await;
        commands.send(unload(3)).unwrap();
        let got = tokio::time::timeout(Duration::from_secs(10), from_batcher.recv())
            .await
            .expect("the command reaches the worker");
        assert_eq!(slot_of(got), 3);

        // Images and a command both waiting when the slot frees: the command first.
        let (tx, _rx) = mpsc::unbounded_channel();
        q.submit(vec![entry(1, &tx), entry(2, &tx)]).unwrap();
        let first = next_batch(&mut from_batcher).await;
        assert_eq!(first.entries.len(), 2);
        // Sent together (nothing runs in between on this runtime): the command goes first.
        q.submit(vec![entry(3, &tx), entry(4, &tx)]).unwrap();
        commands.send(unload(5)).unwrap();
        assert_eq!(slot_of(from_batcher.recv().await), 5);
        let seeds: Vec<u64> = next_batch(&mut from_batcher)
            .await
            .entries
            .iter()
            .map(|e| e.payload.image.seed)
            .collect();
        assert_eq!(seeds, [3, 4]);

        commands.send(unload(6)).unwrap();
        q.submit(vec![entry(7, &tx)]).unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(slot_of(from_batcher.recv().await), 6);
        drop(commands);
        assert_eq!(next_batch(&mut from_batcher).await.entries.len(), 1);
        q.submit(vec![entry(8, &tx)]).unwrap();
        assert_eq!(next_batch(&mut from_batcher).await.entries.len(), 1);
    }
}
