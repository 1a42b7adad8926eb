//! The images behind `response_format: "url"`: kept in memory under unguessable ids, for a
//! limited time (OpenAI's URLs last 60 minutes) and a bounded number of bytes, oldest evicted
//! first. A plain struct over explicit time, like the queue.

use std::collections::{HashMap, VecDeque};
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
}

/// The store: ids in insertion order (= expiry order, since every image lives equally long).
#[derive(Debug)]
pub struct ImageStore {
    ttl: Duration,
    max_bytes: usize,
    bytes: usize,
    slots: HashMap<String, Slot>,
    order: VecDeque<String>,
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
        }
    }

    /// 128 random bits from the thread-local CSPRNG (ChaCha, seeded by the OS), as hex.
    pub fn new_id() -> String {
        let mut raw = [0u8; 16];
        rand::rng().fill_bytes(&mut raw);
        format!("img_{}", hex::encode(raw))
    }

    /// Stores an image and returns its id, evicting expired and then the oldest images to
    /// make room.
    pub fn insert(&mut self, image: StoredImage, now: Instant) -> Result<String, TooLarge> {
        let size = image.bytes.len();
        if size > self.max_bytes {
            return Err(TooLarge {
                size,
                max: self.max_bytes,
            });
        }
        self.purge_expired(now);
        while self.bytes + size > self.max_bytes {
            if !self.evict_oldest() {
                break;
            }
        }
        let id = Self::new_id();
        self.bytes += size;
        self.order.push_back(id.clone());
        self.slots.insert(
            id.clone(),
            Slot {
                image,
                expires: now + self.ttl,
            },
        );
        Ok(id)
    }

    pub fn get(&mut self, id: &str, now: Instant) -> Option<StoredImage> {
        self.purge_expired(now);
        self.slots.get(id).map(|s| s.image.clone())
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

    fn purge_expired(&mut self, now: Instant) {
        while let Some(id) = self.order.front() {
            match self.slots.get(id) {
                Some(slot) if slot.expires > now => break,
                _ => {
                    self.evict_oldest();
                }
            }
        }
    }

    fn evict_oldest(&mut self) -> bool {
        let Some(id) = self.order.pop_front() else {
            return false;
        };
        if let Some(slot) = self.slots.remove(&id) {
            self.bytes -= slot.image.bytes.len();
        }
        true
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

    #[test]
    fn images_expire_after_the_ttl() {
        let t0 = Instant::now();
        let mut s = ImageStore::new(Duration::from_secs(60), 1000);
        let id = s.insert(img(10), t0).unwrap();
        assert_eq!(
            s.get(&id, t0 + Duration::from_secs(59))
                .unwrap()
                .bytes
                .len(),
            10
        );
        assert!(s.get(&id, t0 + Duration::from_secs(60)).is_none());
        assert_eq!((s.len(), s.bytes()), (0, 0));
    }

    #[test]
    fn byte_bound_evicts_oldest_first() {
        let t0 = Instant::now();
        let mut s = ImageStore::new(Duration::from_secs(60), 100);
        let a = s.insert(img(40), t0).unwrap();
        let b = s.insert(img(40), t0).unwrap();
        let c = s.insert(img(40), t0).unwrap();
        assert!(s.get(&a, t0).is_none());
        assert!(s.get(&b, t0).is_some());
        assert!(s.get(&c, t0).is_some());
        assert_eq!(s.bytes(), 80);
        assert_eq!(
            s.insert(img(101), t0),
            Err(TooLarge {
                size: 101,
                max: 100
            })
        );
        let d = s.insert(img(100), t0).unwrap();
        assert_eq!((s.len(), s.bytes()), (1, 100));
        assert!(s.get(&d, t0).is_some());
    }

    #[test]
    fn unknown_ids_are_absent() {
        let mut s = ImageStore::new(Duration::from_secs(60), 100);
        assert!(s.get("img_00", Instant::now()).is_none());
    }
}
