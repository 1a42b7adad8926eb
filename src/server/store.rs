//! The images behind `response_format: "url"`: kept in memory under unguessable ids, for a
//! limited time (OpenAI's URLs last 60 minutes) and a bounded number of bytes. A plain struct
//! over explicit time, like the queue.
//!
//! When the bytes run out, images go before their time: first those already fetched (most
//! clients fetch each URL once, at once), oldest fetch first, and only then those nobody has
//! fetched yet, oldest first. An image that goes unfetched is a URL that answers 404 within its
//! promised hour, so each is counted (`turbine_image_store_evictions_total{reason="unfetched"}`)
//! and said in a warning, and a request for it says why it is gone.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use rand::RngCore;

/// One stored image.
#[derive(Debug, Clone)]
pub struct StoredImage {
    pub bytes: Bytes,
    pub content_type: &'static str,
}

#[derive(Debug)]
struct Slot {
    image: StoredImage,
    expires: Instant,
    fetched: bool,
}

/// How many ids of images evicted unfetched are remembered, to say why their URLs answer 404.
const LOST_IDS_KEPT: usize = 10_000;

/// The store: ids in insertion order (= expiry order, since every image lives equally long),
/// and those fetched in the order of their first fetch. Both queues may hold ids already gone
/// (taken out through the other queue); they are skipped, and compacted when they pile up.
#[derive(Debug)]
pub struct ImageStore {
    ttl: Duration,
    max_bytes: usize,
    bytes: usize,
    slots: HashMap<String, Slot>,
    order: VecDeque<String>,
    fetched: VecDeque<String>,
    lost: VecDeque<String>,
    lost_set: HashSet<String>,
    evictions: Evictions,
    warned_at: Option<Instant>,
}

/// Images that left the store, by why, since it was made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Evictions {
    /// Their time was up.
    pub expired: u64,
    /// Made room, after at least one fetch.
    pub fetched: u64,
    /// Made room before anyone fetched them: URLs lost within their time.
    pub unfetched: u64,
}

/// What an insert had to do to make room.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct MadeRoom {
    /// Images evicted before anyone fetched them.
    pub unfetched: u64,
    /// How long the youngest of those had been kept.
    pub kept_for: Option<Duration>,
}

/// What `get` found.
#[derive(Debug, Clone)]
pub enum Lookup {
    /// The image, and how long it stays.
    Found(StoredImage, Duration),
    /// Evicted before anyone fetched it, to make room for newer images.
    Evicted,
    /// Never stored here, or gone with its time (or after its fetch).
    Missing,
}

/// `insert` refused: the image alone exceeds the store's byte bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("an image of {size} bytes exceeds the URL image store's limit of {max} bytes")]
pub struct TooLarge {
    pub size: usize,
    pub max: usize,
}

impl ImageStore {
    pub fn new(ttl: Duration, max_bytes: usize) -> Self {
        ImageStore {
            ttl,
            max_bytes,
            bytes: 0,
            slots: HashMap::new(),
            order: VecDeque::new(),
            fetched: VecDeque::new(),
            lost: VecDeque::new(),
            lost_set: HashSet::new(),
            evictions: Evictions::default(),
            warned_at: None,
        }
    }

    /// 128 random bits from the thread-local CSPRNG (ChaCha, seeded by the OS), as hex.
    pub fn new_id() -> String {
        let mut raw = [0u8; 16];
        rand::rng().fill_bytes(&mut raw);
        format!("img_{}", hex::encode(raw))
    }

    /// Stores an image and returns its id, and what making room for it took: expired images
    /// go, then fetched ones (oldest fetch first), then unfetched ones (oldest first).
    pub fn insert(
        &mut self,
        image: StoredImage,
        now: Instant,
    ) -> Result<(String, MadeRoom), TooLarge> {
        let size = image.bytes.len();
        if size > self.max_bytes {
            return Err(TooLarge {
                size,
                max: self.max_bytes,
            });
        }
        self.purge_expired(now);
        let mut made = MadeRoom::default();
        while self.bytes + size > self.max_bytes {
            if let Some(id) = self.fetched.pop_front() {
                if self.remove(&id).is_some() {
                    self.evictions.fetched += 1;
                }
                continue;
            }
            let Some(id) = self.order.pop_front() else {
                break;
            };
            if let Some(slot) = self.remove(&id) {
                self.evictions.unfetched += 1;
                made.unfetched += 1;
                let kept = self
                    .ttl
                    .saturating_sub(slot.expires.saturating_duration_since(now));
                made.kept_for = Some(kept);
                self.remember_lost(id);
            }
        }
        self.compact();
        let id = Self::new_id();
        self.bytes += size;
        self.order.push_back(id.clone());
        self.slots.insert(
            id.clone(),
            Slot {
                image,
                expires: now + self.ttl,
                fetched: false,
            },
        );
        Ok((id, made))
    }

    /// The image `id`, and how long it stays. A fetch (not a `HEAD`) marks it fetched: it is
    /// then among the first to go when room is needed.
    pub fn get(&mut self, id: &str, now: Instant, fetch: bool) -> Lookup {
        self.purge_expired(now);
        match self.slots.get_mut(id) {
            Some(slot) => {
                if fetch && !slot.fetched {
                    slot.fetched = true;
                    self.fetched.push_back(id.to_string());
                }
                Lookup::Found(
                    slot.image.clone(),
                    slot.expires.saturating_duration_since(now),
                )
            }
            None if self.lost_set.contains(id) => Lookup::Evicted,
            None => Lookup::Missing,
        }
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn max_bytes(&self) -> usize {
        self.max_bytes
    }

    pub fn evictions(&self) -> Evictions {
        self.evictions
    }

    /// Whether a warning about images evicted unfetched is due at `now` (at most one a minute).
    pub fn warning_due(&mut self, now: Instant) -> bool {
        super::warning_due(&mut self.warned_at, now)
    }

    fn purge_expired(&mut self, now: Instant) {
        while let Some(id) = self.order.front() {
            match self.slots.get(id) {
                Some(slot) if slot.expires > now => break,
                Some(_) => {
                    let id = self.order.pop_front().expect("a front");
                    self.remove(&id);
                    self.evictions.expired += 1;
                }
                None => {
                    self.order.pop_front();
                }
            }
        }
    }

    fn remove(&mut self, id: &str) -> Option<Slot> {
        let slot = self.slots.remove(id)?;
        self.bytes -= slot.image.bytes.len();
        Some(slot)
    }

    fn remember_lost(&mut self, id: String) {
        if self.lost.len() == LOST_IDS_KEPT {
            if let Some(old) = self.lost.pop_front() {
                self.lost_set.remove(&old);
            }
        }
        self.lost_set.insert(id.clone());
        self.lost.push_back(id);
    }

    /// Drops the ids of images already gone from the queues, once they are mostly such.
    fn compact(&mut self) {
        let live = self.slots.len();
        for queue in [&mut self.order, &mut self.fetched] {
            if queue.len() > 2 * live + 1024 {
                queue.retain(|id| self.slots.contains_key(id));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn img(len: usize) -> StoredImage {
        StoredImage {
            bytes: Bytes::from(vec![7u8; len]),
            content_type: "image/png",
        }
    }

    #[test]
    fn ids_are_128_random_bits_and_distinct() {
        let a = ImageStore::new_id();
        let b = ImageStore::new_id();
        assert_eq!(a.len(), 4 + 32);
        assert!(a[4..].bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    fn found(s: &mut ImageStore, id: &str, now: Instant) -> Option<usize> {
        match s.get(id, now, true) {
            Lookup::Found(image, _) => Some(image.bytes.len()),
            _ => None,
        }
    }

    #[test]
    fn images_expire_after_the_ttl() {
        let t0 = Instant::now();
        let mut s = ImageStore::new(Duration::from_secs(60), 1000);
        let (id, _) = s.insert(img(10), t0).unwrap();
        match s.get(&id, t0 + Duration::from_secs(45), true) {
            Lookup::Found(image, left) => {
                assert_eq!(image.bytes.len(), 10);
                assert_eq!(left, Duration::from_secs(15));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            s.get(&id, t0 + Duration::from_secs(60), true),
            Lookup::Missing
        ));
        assert_eq!((s.len(), s.bytes()), (0, 0));
        assert_eq!(
            s.evictions(),
            Evictions {
                expired: 1,
                ..Evictions::default()
            }
        );
    }

    #[test]
    fn byte_bound_evicts_oldest_first() {
        let t0 = Instant::now();
        let mut s = ImageStore::new(Duration::from_secs(60), 100);
        let (a, _) = s.insert(img(40), t0).unwrap();
        let (b, _) = s.insert(img(40), t0).unwrap();
        let (c, made) = s.insert(img(40), t0 + Duration::from_secs(5)).unwrap();
        assert_eq!(made.unfetched, 1);
        assert_eq!(made.kept_for, Some(Duration::from_secs(5)));
        assert!(matches!(s.get(&a, t0, true), Lookup::Evicted));
        assert_eq!(found(&mut s, &b, t0), Some(40));
        assert_eq!(found(&mut s, &c, t0), Some(40));
        assert_eq!(s.bytes(), 80);
        assert_eq!(
            s.insert(img(101), t0),
            Err(TooLarge {
                size: 101,
                max: 100
            })
        );
        let (d, _) = s.insert(img(100), t0).unwrap();
        assert_eq!((s.len(), s.bytes()), (1, 100));
        assert_eq!(found(&mut s, &d, t0), Some(100));
        assert_eq!(
            s.evictions(),
            Evictions {
                expired: 0,
                fetched: 2,
                unfetched: 1
            }
        );
    }

    /// Room is made from the images already fetched (oldest fetch first) before any that nobody
    /// fetched yet: a slow client's URLs outlive a fast client's, whatever their age.
    #[test]
    fn fetched_images_make_room_before_unfetched_ones() {
        let t0 = Instant::now();
        let mut s = ImageStore::new(Duration::from_secs(60), 100);
        let (slow, _) = s.insert(img(20), t0).unwrap();
        let (fast1, _) = s.insert(img(20), t0).unwrap();
        let (fast2, _) = s.insert(img(20), t0).unwrap();
        assert_eq!(found(&mut s, &fast2, t0), Some(20));
        assert_eq!(found(&mut s, &fast1, t0), Some(20));
        // A HEAD does not count as a fetch.
        let (peeked, _) = s.insert(img(20), t0).unwrap();
        assert!(matches!(s.get(&peeked, t0, false), Lookup::Found(..)));
        // 80 of 100 taken: 40 more take fast2 (fetched first) and no more.
        let (_, made) = s.insert(img(40), t0).unwrap();
        assert_eq!(made, MadeRoom::default());
        assert!(matches!(s.get(&fast2, t0, true), Lookup::Missing));
        assert_eq!(found(&mut s, &fast1, t0), Some(20));
        assert_eq!(found(&mut s, &slow, t0), Some(20));
        // Fetched after fast1, `slow` goes after it, and still before anything unfetched.
        let (big, made) = s.insert(img(40), t0).unwrap();
        assert_eq!(made, MadeRoom::default());
        assert!(matches!(s.get(&fast1, t0, true), Lookup::Missing));
        assert!(matches!(s.get(&slow, t0, true), Lookup::Missing));
        // Nothing fetched is left: the oldest unfetched go (`peeked`, then the first 40).
        let (_, made) = s.insert(img(40), t0 + Duration::from_secs(2)).unwrap();
        assert_eq!(made.unfetched, 2);
        assert_eq!(made.kept_for, Some(Duration::from_secs(2)));
        assert!(matches!(s.get(&peeked, t0, true), Lookup::Evicted));
        assert_eq!(found(&mut s, &big, t0), Some(40));
        assert_eq!(s.bytes(), 80);
        assert_eq!(
            s.evictions(),
            Evictions {
                expired: 0,
                fetched: 3,
                unfetched: 2
            }
        );
    }

    /// The queues do not keep the ids of images long gone.
    #[test]
    fn many_images_leave_no_trail() {
        let t0 = Instant::now();
        let mut s = ImageStore::new(Duration::from_secs(60), 1000);
        for i in 0..100_000u32 {
            let (id, _) = s.insert(img(10), t0).unwrap();
            if i % 2 == 0 {
                assert_eq!(found(&mut s, &id, t0), Some(10));
            }
        }
        assert_eq!((s.len(), s.bytes()), (100, 1000));
        assert!(s.order.len() <= 2 * 100 + 1024 + 1, "{}", s.order.len());
        assert!(s.fetched.len() <= 2 * 100 + 1024 + 1, "{}", s.fetched.len());
        assert_eq!(s.lost.len(), LOST_IDS_KEPT);
        assert_eq!(s.lost_set.len(), LOST_IDS_KEPT);
    }

    #[test]
    fn unknown_ids_are_absent() {
        let mut s = ImageStore::new(Duration::from_secs(60), 100);
        assert!(matches!(
            s.get("img_00", Instant::now(), true),
            Lookup::Missing
        ));
    }
}
