//! The queue's logic as plain data: which images wait, in what order, and which of them form
//! the next batch. No runtime, no channels, no model: the batcher holds a `State` behind a
//! mutex and calls these methods with the current time, so every rule here is unit-tested
//! synchronously (the TGI router's split between a thin handle and its `State`).
//!
//! The unit of work is one image. A request with `n = 4` becomes four entries sharing a
//! [`RequestId`]; they may run in different batches.
//!
//! Order: each entry has a *virtual time*, its enqueue time plus a penalty for its priority
//! class (`high` 0, `normal` one aging period, `low` two). The entry with the earliest virtual
//! time is served first. So higher classes go first, and an entry that has waited longer than
//! the gap between two classes overtakes newer entries of the higher class: `low` never
//! starves. Ties keep arrival order.
//!
//! Batches: the head entry decides the batch's [`ShapeKey`]; the batch takes up to `max`
//! entries of that key in virtual-time order. A batch is ready when it is full, or when the
//! oldest entry of that key has waited `max_batch_delay` (so an entry that already waited
//! behind a running batch goes at once).

use std::time::{Duration, Instant};

use crate::model::pipeline::GenerationSettings;

/// Identifies the request an image belongs to (for cancellation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(pub u64);

/// Classifier-free guidance of a batch. Guidance runs only when the scale is > 1 (diffusers'
/// rule), so every scale ≤ 1 is the same batch key; scales > 1 must match exactly because the
/// pipeline takes one scale per batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Guidance {
    Off,
    /// The scale's `f64` bits (exact match; `Eq`/`Hash` on floats need the bits).
    On(u64),
}

impl Guidance {
    pub fn from_scale(scale: f64) -> Self {
        if scale > 1.0 {
            Guidance::On(scale.to_bits())
        } else {
            Guidance::Off
        }
    }

    pub fn scale(self) -> f64 {
        match self {
            Guidance::Off => 0.0,
            Guidance::On(bits) => f64::from_bits(bits),
        }
    }
}

/// What images must share to run in one batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ShapeKey {
    pub width: u32,
    pub height: u32,
    /// The schedule's length (for an edit, diffusers' `num_inference_steps`, of which only the
    /// steps from `init_step` run).
    pub steps: u32,
    pub guidance: Guidance,
    /// Edits: the schedule step the images start from ([`GenerationSettings::init_step`]).
    pub init_step: Option<u32>,
    /// The `--lora-modules` adapter `model` named ([`GenerationSettings::adapter`]).
    pub adapter: Option<u16>,
}

impl ShapeKey {
    pub fn settings(&self) -> GenerationSettings {
        GenerationSettings {
            width: self.width as usize,
            height: self.height as usize,
            steps: self.steps as usize,
            guidance_scale: self.guidance.scale(),
            init_step: self.init_step.map(|s| s as usize),
            adapter: self.adapter.map(usize::from),
        }
    }
}

/// Scheduling class of a request (per API key, or from a trusted header).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Priority {
    High,
    #[default]
    Normal,
    Low,
}

impl Priority {
    /// How many aging periods an entry of this class is pushed back.
    fn penalty_periods(self) -> u32 {
        match self {
            Priority::High => 0,
            Priority::Normal => 1,
            Priority::Low => 2,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Priority::High => "high",
            Priority::Normal => "normal",
            Priority::Low => "low",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "high" => Some(Priority::High),
            "normal" => Some(Priority::Normal),
            "low" => Some(Priority::Low),
            _ => None,
        }
    }
}

/// The knobs of the queue.
#[derive(Debug, Clone, Copy)]
pub struct QueuePolicy {
    /// Most images queued (not yet running) at once.
    pub capacity: usize,
    /// The virtual-time gap between two adjacent priority classes.
    pub aging: Duration,
    /// How long the oldest entry of a key may wait for its batch to fill.
    pub max_batch_delay: Duration,
}

/// One image waiting to run, with whatever the caller attaches (`payload`).
#[derive(Debug)]
pub struct Entry<T> {
    pub request: RequestId,
    pub key: ShapeKey,
    pub priority: Priority,
    pub enqueued: Instant,
    /// After this the image is no longer wanted (the request's timeout).
    pub deadline: Instant,
    pub payload: T,
}

/// Up to `max` entries of one key, in service order.
#[derive(Debug)]
pub struct Batch<T> {
    pub key: ShapeKey,
    pub entries: Vec<Entry<T>>,
    /// Its token with the stall watch while it waits for its worker (set by the batcher), so
    /// that its images are told when that device is declared stalled.
    pub parked: Option<u64>,
}

/// What the batcher should do next.
#[derive(Debug)]
pub enum Next<T> {
    Batch(Batch<T>),
    /// Entries wait for their batch to fill; look again at this instant (or on a new arrival).
    WaitUntil(Instant),
    Empty,
}

/// `try_push` refused: accepting the request would exceed the capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueFull {
    pub queued: usize,
    pub requested: usize,
    pub capacity: usize,
}

#[derive(Debug)]
struct Queued<T> {
    seq: u64,
    /// Enqueue time plus the priority penalty, as an offset from `State::epoch`.
    virtual_time: Duration,
    entry: Entry<T>,
}

/// The queue: entries in arrival order plus the rules above.
#[derive(Debug)]
pub struct State<T> {
    policy: QueuePolicy,
    epoch: Instant,
    next_seq: u64,
    /// Arrival order (so `retain`-style removals keep it); queue sizes are bounded by
    /// `capacity` (hundreds), so the linear scans below cost microseconds.
    queued: Vec<Queued<T>>,
}

impl<T> State<T> {
    pub fn new(policy: QueuePolicy, epoch: Instant) -> Self {
        Self {
            policy,
            epoch,
            next_seq: 0,
            queued: Vec::new(),
        }
    }

    pub fn policy(&self) -> &QueuePolicy {
        &self.policy
    }

    /// Images waiting.
    pub fn len(&self) -> usize {
        self.queued.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queued.is_empty()
    }

    /// Adds all of a request's entries, or none of them if they do not fit.
    pub fn try_push(&mut self, entries: Vec<Entry<T>>) -> Result<(), QueueFull> {
        if self.queued.len() + entries.len() > self.policy.capacity {
            return Err(QueueFull {
                queued: self.queued.len(),
                requested: entries.len(),
                capacity: self.policy.capacity,
            });
        }
        self.requeue(entries);
        Ok(())
    }

    /// Puts back entries taken for a device that can no longer run them, ahead of later
    /// arrivals of their priority as before (their place follows from their enqueue time);
    /// capacity does not apply, they were admitted once.
    pub fn requeue(&mut self, entries: Vec<Entry<T>>) {
        for entry in entries {
            let virtual_time = entry.enqueued.saturating_duration_since(self.epoch)
                + self.policy.aging * entry.priority.penalty_periods();
            self.queued.push(Queued {
                seq: self.next_seq,
                virtual_time,
                entry,
            });
            self.next_seq += 1;
        }
    }

    /// Forms the next batch of at most `max` images, if one is ready (see the module doc).
    pub fn next_batch(&mut self, now: Instant, max: usize) -> Next<T> {
        let max = max.max(1);
        let Some(head) = self.queued.iter().min_by_key(|q| (q.virtual_time, q.seq)) else {
            return Next::Empty;
        };
        let key = head.entry.key;
        let mut count = 0;
        let mut oldest = now;
        for q in self.queued.iter().filter(|q| q.entry.key == key) {
            count += 1;
            oldest = oldest.min(q.entry.enqueued);
        }
        let due = oldest + self.policy.max_batch_delay;
        if count < max && now < due {
            return Next::WaitUntil(due);
        }
        Next::Batch(Batch {
            key,
            entries: self.take_key(&key, max),
            parked: None,
        })
    }

    /// Removes up to `max` entries of `key` in service order: forms a batch, or tops up a
    /// batch formed earlier (the prefetched one) with entries that arrived since.
    pub fn take_key(&mut self, key: &ShapeKey, max: usize) -> Vec<Entry<T>> {
        let mut picked: Vec<(Duration, u64)> = self
            .queued
            .iter()
            .filter(|q| q.entry.key == *key)
            .map(|q| (q.virtual_time, q.seq))
            .collect();
        picked.sort_unstable();
        picked.truncate(max);
        let mut chosen: Vec<u64> = picked.iter().map(|&(_, seq)| seq).collect();
        chosen.sort_unstable();
        let mut taken = self.extract(|q| chosen.binary_search(&q.seq).is_ok());
        taken.sort_by_key(|q| (q.virtual_time, q.seq));
        taken.into_iter().map(|q| q.entry).collect()
    }

    /// Removes every entry of `request` (client gone or timed out).
    pub fn cancel(&mut self, request: RequestId) -> Vec<Entry<T>> {
        self.remove_where(|e| e.request == request)
    }

    /// Removes the entries whose deadline has passed.
    pub fn take_expired(&mut self, now: Instant) -> Vec<Entry<T>> {
        self.remove_where(|e| e.deadline <= now)
    }

    /// Removes the entries matching `pred` (e.g. those whose client is gone), in arrival order.
    pub fn remove_where(&mut self, mut pred: impl FnMut(&Entry<T>) -> bool) -> Vec<Entry<T>> {
        self.extract(|q| pred(&q.entry))
            .into_iter()
            .map(|q| q.entry)
            .collect()
    }

    fn extract(&mut self, mut pred: impl FnMut(&Queued<T>) -> bool) -> Vec<Queued<T>> {
        let mut taken = Vec::new();
        let mut kept = Vec::with_capacity(self.queued.len());
        for q in self.queued.drain(..) {
            if pred(&q) {
                taken.push(q);
            } else {
                kept.push(q);
            }
        }
        self.queued = kept;
        taken
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn key(width: u32) -> ShapeKey {
        ShapeKey {
            width,
            height: 64,
            steps: 1,
            guidance: Guidance::Off,
            init_step: None,
            adapter: None,
        }
    }

    struct Fixture {
        t0: Instant,
        state: State<&'static str>,
    }

    impl Fixture {
        fn new(capacity: usize) -> Self {
            let t0 = Instant::now();
            let policy = QueuePolicy {
                capacity,
                aging: Duration::from_secs(10),
                max_batch_delay: 5 * MS,
            };
            Self {
                t0,
                state: State::new(policy, t0),
            }
        }

        fn at(&self, ms: u64) -> Instant {
            self.t0 + Duration::from_millis(ms)
        }

        fn entry(
            &self,
            request: u64,
            k: ShapeKey,
            priority: Priority,
            at_ms: u64,
            payload: &'static str,
        ) -> Entry<&'static str> {
            Entry {
                request: RequestId(request),
                key: k,
                priority,
                enqueued: self.at(at_ms),
                deadline: self.at(at_ms + 1000),
                payload,
            }
        }

        fn push(
            &mut self,
            request: u64,
            k: ShapeKey,
            priority: Priority,
            at_ms: u64,
            p: &'static str,
        ) {
            let e = self.entry(request, k, priority, at_ms, p);
            self.state.try_push(vec![e]).unwrap();
        }

        fn batch(&mut self, now_ms: u64, max: usize) -> Vec<&'static str> {
            match self.state.next_batch(self.at(now_ms), max) {
                Next::Batch(b) => {
                    assert!(b.entries.iter().all(|e| e.key == b.key));
                    b.entries.into_iter().map(|e| e.payload).collect()
                }
                other => panic!("expected a batch, got {other:?}"),
            }
        }
    }

    #[test]
    fn empty_queue_has_nothing_to_do() {
        let mut f = Fixture::new(8);
        assert!(matches!(f.state.next_batch(f.at(0), 4), Next::Empty));
    }

    #[test]
    fn full_batch_is_ready_at_once_and_partial_waits_for_the_delay() {
        let mut f = Fixture::new(8);
        f.push(1, key(64), Priority::Normal, 0, "a");
        f.push(2, key(64), Priority::Normal, 1, "b");
        match f.state.next_batch(f.at(2), 3) {
            Next::WaitUntil(t) => assert_eq!(t, f.at(5)),
            other => panic!("expected wait, got {other:?}"),
        }
        f.push(3, key(64), Priority::Normal, 2, "c");
        assert_eq!(f.batch(2, 3), ["a", "b", "c"]);
        assert!(f.state.is_empty());
    }

    #[test]
    fn partial_batch_goes_once_its_oldest_entry_waited_the_delay() {
        let mut f = Fixture::new(8);
        f.push(1, key(64), Priority::Normal, 0, "a");
        assert_eq!(f.batch(5, 4), ["a"]);
    }

    #[test]
    fn batches_group_by_shape_key_and_never_mix_keys() {
        let mut f = Fixture::new(16);
        f.push(1, key(64), Priority::Normal, 0, "a64");
        f.push(2, key(128), Priority::Normal, 1, "b128");
        f.push(3, key(64), Priority::Normal, 2, "c64");
        f.push(4, key(128), Priority::Normal, 3, "d128");
        assert_eq!(f.batch(10, 8), ["a64", "c64"]);
        assert_eq!(f.batch(10, 8), ["b128", "d128"]);
    }

    #[test]
    fn guidance_on_and_off_are_different_keys_and_scales_below_one_coincide() {
        let off_a = Guidance::from_scale(0.0);
        let off_b = Guidance::from_scale(1.0);
        assert_eq!(off_a, off_b);
        assert_ne!(Guidance::from_scale(2.0), Guidance::from_scale(3.0));
        assert_eq!(Guidance::from_scale(2.5).scale(), 2.5);
        let mut f = Fixture::new(8);
        let mut cfg = key(64);
        cfg.guidance = Guidance::from_scale(5.0);
        f.push(1, key(64), Priority::Normal, 0, "off");
        f.push(2, cfg, Priority::Normal, 1, "on");
        assert_eq!(f.batch(10, 8), ["off"]);
        assert_eq!(f.batch(10, 8), ["on"]);
    }

    #[test]
    fn batch_size_is_capped_and_order_is_fifo_within_a_class() {
        let mut f = Fixture::new(16);
        let names = ["0", "1", "2", "3", "4", "5"];
        for (i, n) in names.iter().enumerate() {
            f.push(i as u64, key(64), Priority::Normal, i as u64, n);
        }
        assert_eq!(f.batch(6, 4), ["0", "1", "2", "3"]);
        // The rest is partial and its oldest entry (4 ms) has not waited 5 ms yet.
        assert!(matches!(f.state.next_batch(f.at(6), 4), Next::WaitUntil(t) if t == f.at(9)));
        assert_eq!(f.batch(9, 4), ["4", "5"]);
    }

    #[test]
    fn higher_priority_goes_first() {
        let mut f = Fixture::new(8);
        f.push(1, key(64), Priority::Low, 0, "low");
        f.push(2, key(64), Priority::Normal, 1, "normal");
        f.push(3, key(64), Priority::High, 2, "high");
        assert_eq!(f.batch(100, 1), ["high"]);
        assert_eq!(f.batch(100, 1), ["normal"]);
        assert_eq!(f.batch(100, 1), ["low"]);
    }

    #[test]
    fn high_priority_head_decides_the_key_even_if_another_key_is_older() {
        let mut f = Fixture::new(8);
        f.push(1, key(128), Priority::Normal, 0, "old-normal-128");
        f.push(2, key(64), Priority::High, 50, "new-high-64");
        assert_eq!(f.batch(100, 4), ["new-high-64"]);
    }

    #[test]
    fn aging_lets_low_priority_overtake_newer_high_priority() {
        // aging = 10 s: a low entry is two periods (20 s) behind a high one enqueued with it.
        let mut f = Fixture::new(8);
        f.push(1, key(64), Priority::Low, 0, "low@0");
        f.push(2, key(64), Priority::High, 19_000, "high@19s");
        f.push(3, key(64), Priority::High, 21_000, "high@21s");
        assert_eq!(f.batch(30_000, 1), ["high@19s"]);
        assert_eq!(f.batch(30_000, 1), ["low@0"]);
        assert_eq!(f.batch(30_000, 1), ["high@21s"]);
    }

    #[test]
    fn low_priority_never_starves_under_a_steady_stream_of_high() {
        let mut f = Fixture::new(64);
        f.push(0, key(64), Priority::Low, 0, "low");
        // One high request per second, one image served per second.
        for s in 0..60u64 {
            f.push(s + 1, key(64), Priority::High, s * 1000, "high");
            if f.batch(s * 1000 + 500, 1) == ["low"] {
                assert!(s <= 21, "low served only after {s} s");
                return;
            }
        }
        panic!("low-priority entry starved");
    }

    #[test]
    fn capacity_is_all_or_nothing_per_request() {
        let mut f = Fixture::new(3);
        let two = vec![
            f.entry(1, key(64), Priority::Normal, 0, "a"),
            f.entry(1, key(64), Priority::Normal, 0, "b"),
        ];
        f.state.try_push(two).unwrap();
        let two_more = vec![
            f.entry(2, key(64), Priority::Normal, 1, "c"),
            f.entry(2, key(64), Priority::Normal, 1, "d"),
        ];
        let err = f.state.try_push(two_more).unwrap_err();
        assert_eq!(
            err,
            QueueFull {
                queued: 2,
                requested: 2,
                capacity: 3
            }
        );
        assert_eq!(f.state.len(), 2);
        f.push(3, key(64), Priority::Normal, 2, "e");
        assert_eq!(f.state.len(), 3);
    }

    #[test]
    fn cancel_removes_only_that_requests_images() {
        let mut f = Fixture::new(8);
        let req = |f: &Fixture, id, p| f.entry(id, key(64), Priority::Normal, 0, p);
        let a = vec![req(&f, 1, "a0"), req(&f, 1, "a1"), req(&f, 1, "a2")];
        f.state.try_push(a).unwrap();
        f.push(2, key(64), Priority::Normal, 1, "b0");
        let cancelled: Vec<_> = f
            .state
            .cancel(RequestId(1))
            .into_iter()
            .map(|e| e.payload)
            .collect();
        assert_eq!(cancelled, ["a0", "a1", "a2"]);
        assert!(f.state.cancel(RequestId(1)).is_empty());
        assert_eq!(f.batch(10, 8), ["b0"]);
    }

    #[test]
    fn expired_entries_are_taken_out() {
        let mut f = Fixture::new(8);
        let mut e = f.entry(1, key(64), Priority::Normal, 0, "short");
        e.deadline = f.at(100);
        f.state.try_push(vec![e]).unwrap();
        f.push(2, key(64), Priority::Normal, 0, "long");
        assert!(f.state.take_expired(f.at(99)).is_empty());
        let expired: Vec<_> = f
            .state
            .take_expired(f.at(100))
            .into_iter()
            .map(|e| e.payload)
            .collect();
        assert_eq!(expired, ["short"]);
        assert_eq!(f.batch(200, 8), ["long"]);
    }

    #[test]
    fn take_key_tops_up_a_formed_batch_with_later_arrivals_of_its_key() {
        let mut f = Fixture::new(8);
        f.push(1, key(64), Priority::Normal, 0, "a");
        let first = f.batch(5, 3);
        assert_eq!(first, ["a"]);
        f.push(2, key(128), Priority::Normal, 6, "other");
        f.push(3, key(64), Priority::Normal, 7, "b");
        f.push(4, key(64), Priority::Normal, 8, "c");
        f.push(5, key(64), Priority::Normal, 9, "d");
        let more: Vec<_> = f
            .state
            .take_key(&key(64), 2)
            .into_iter()
            .map(|e| e.payload)
            .collect();
        assert_eq!(more, ["b", "c"]);
        assert_eq!(f.state.len(), 2);
    }

    #[test]
    fn remove_where_drops_entries_whose_client_is_gone() {
        let mut f = Fixture::new(8);
        f.push(1, key(64), Priority::Normal, 0, "gone");
        f.push(2, key(64), Priority::Normal, 1, "here");
        let removed = f.state.remove_where(|e| e.payload == "gone");
        assert_eq!(removed.len(), 1);
        assert_eq!(f.batch(10, 8), ["here"]);
    }

    #[test]
    fn priority_parses_case_insensitively() {
        assert_eq!(Priority::parse(" HIGH "), Some(Priority::High));
        assert_eq!(Priority::parse("low"), Some(Priority::Low));
        assert_eq!(Priority::parse("urgent"), None);
    }
}
