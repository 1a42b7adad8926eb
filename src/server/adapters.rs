//! The LoRA adapters served next to the model, by name and slot: the `--lora-modules` ones from
//! the start, and with `--allow-runtime-lora-updating` those loaded (`POST
//! /v1/load_lora_adapter`) and unloaded (`POST /v1/unload_lora_adapter`) while serving.
//!
//! A slot is the index every worker's pipeline holds the adapter under
//! ([`crate::model::pipeline::GenerationSettings::adapter`]). A name is served only once every
//! worker has built it; unloading stops serving it at once, and frees its slot (and the workers'
//! copies) only once no request that named it is left, so that none loses its images to an
//! unload. A freed slot is used again by a later load.

use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// The adapters, shared by every clone (the server's configuration holds one).
#[derive(Debug, Clone, Default)]
pub struct Adapters(Arc<RwLock<Vec<Option<Slot>>>>);

#[derive(Debug)]
struct Slot {
    name: String,
    state: State,
    /// Every request resolved to the adapter holds a clone ([`AdapterLease`]).
    held: Arc<()>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Being built on the workers: the name is taken, not served.
    Loading,
    Served,
    /// Unloaded: no longer served; its requests still under way finish with it.
    Draining,
}

/// A request's hold on the adapter its `model` named: while any is alive, the adapter stays on
/// the workers after an unload.
#[derive(Debug, Clone)]
pub struct AdapterLease {
    slot: u16,
    _held: Arc<()>,
}

impl AdapterLease {
    pub fn slot(&self) -> u16 {
        self.slot
    }
}

impl PartialEq for AdapterLease {
    fn eq(&self, other: &Self) -> bool {
        self.slot == other.slot
    }
}

/// Why a name cannot be loaded now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// Loaded already (or being loaded).
    Taken,
    /// `limit` adapters are held already (served, loading or still draining).
    Full { limit: usize },
}

/// An unloaded adapter's slot and its requests' holds: it is free once `held` is the last.
#[derive(Debug)]
pub struct Retired {
    pub slot: u16,
    held: Arc<()>,
}

impl Retired {
    /// Whether a request that named the adapter is still under way.
    pub fn in_use(&self) -> bool {
        Arc::strong_count(&self.held) > 1
    }
}

impl Adapters {
    /// The `--lora-modules` adapters, served in slots `0..names.len()`.
    pub fn new(names: Vec<String>) -> Self {
        let slots = names
            .into_iter()
            .map(|name| {
                Some(Slot {
                    name,
                    state: State::Served,
                    held: Arc::new(()),
                })
            })
            .collect();
        Adapters(Arc::new(RwLock::new(slots)))
    }

    fn read(&self) -> RwLockReadGuard<'_, Vec<Option<Slot>>> {
        self.0.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Vec<Option<Slot>>> {
        self.0.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The served adapter named `name`, held for a request.
    pub fn resolve(&self, name: &str) -> Option<AdapterLease> {
        self.read().iter().enumerate().find_map(|(i, s)| match s {
            Some(s) if s.state == State::Served && s.name == name => Some(AdapterLease {
                slot: i as u16,
                _held: s.held.clone(),
            }),
            _ => None,
        })
    }

    /// The served adapters' names, by slot.
    pub fn names(&self) -> Vec<String> {
        self.read()
            .iter()
            .flatten()
            .filter(|s| s.state == State::Served)
            .map(|s| s.name.clone())
            .collect()
    }

    /// The name of the adapter in `slot`, served or not.
    pub fn name_of(&self, slot: u16) -> Option<String> {
        self.read()
            .get(usize::from(slot))
            .and_then(Option::as_ref)
            .map(|s| s.name.clone())
    }

    /// Takes a slot for `name`, to be built on the workers ([`Adapters::publish`] once built,
    /// [`Adapters::release`] if not). At most `limit` slots are held at once.
    pub fn reserve(&self, name: &str, limit: usize) -> Result<u16, Refused> {
        let mut slots = self.write();
        if slots
            .iter()
            .flatten()
            .any(|s| s.name == name && s.state != State::Draining)
        {
            return Err(Refused::Taken);
        }
        if slots.iter().flatten().count() >= limit {
            return Err(Refused::Full { limit });
        }
        let slot = Slot {
            name: name.to_string(),
            state: State::Loading,
            held: Arc::new(()),
        };
        let i = match slots.iter().position(Option::is_none) {
            Some(i) => i,
            None => {
                slots.push(None);
                slots.len() - 1
            }
        };
        slots[i] = Some(slot);
        Ok(i as u16)
    }

    /// Serves the adapter built in `slot`.
    pub fn publish(&self, slot: u16) {
        if let Some(Some(s)) = self.write().get_mut(usize::from(slot)) {
            s.state = State::Served;
        }
    }

    /// Stops serving `name`: later requests naming it get 404, those under way finish.
    pub fn retire(&self, name: &str) -> Option<Retired> {
        let mut slots = self.write();
        slots.iter_mut().enumerate().find_map(|(i, s)| match s {
            Some(s) if s.state == State::Served && s.name == name => {
                s.state = State::Draining;
                // Not resolved again: the requests' leases are the only holds left with it.
                Some(Retired {
                    slot: i as u16,
                    held: std::mem::take(&mut s.held),
                })
            }
            _ => None,
        })
    }

    /// Frees `slot` (a failed load's, or a drained one's) for a later load.
    pub fn release(&self, slot: u16) {
        let mut slots = self.write();
        if let Some(s) = slots.get_mut(usize::from(slot)) {
            *s = None;
        }
        while slots.last().is_some_and(Option::is_none) {
            slots.pop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_is_served_from_its_publication_to_its_retirement_and_its_slot_freed_when_drained() {
        let a = Adapters::new(vec!["pixel".into()]);
        assert_eq!(a.resolve("pixel").map(|l| l.slot()), Some(0));
        let slot = a.reserve("ink", 4).unwrap();
        assert_eq!(slot, 1);
        // Loading: the name is taken but not served.
        assert!(a.resolve("ink").is_none());
        assert_eq!(a.reserve("ink", 4), Err(Refused::Taken));
        assert_eq!(a.names(), ["pixel"]);
        a.publish(slot);
        assert_eq!(a.names(), ["pixel", "ink"]);
        let lease = a.resolve("ink").unwrap();
        assert_eq!(lease.slot(), 1);

        let retired = a.retire("ink").unwrap();
        assert_eq!(retired.slot, 1);
        assert!(a.resolve("ink").is_none() && a.retire("ink").is_none());
        assert_eq!(a.names(), ["pixel"]);
        assert!(retired.in_use());
        // The name may be loaded again while the old one drains, into another slot.
        let again = a.reserve("ink", 4).unwrap();
        assert_eq!(again, 2);
        drop(lease);
        assert!(!retired.in_use());
        a.release(retired.slot);
        assert_eq!(a.name_of(1), None);
        // The freed slot is the next load's.
        assert_eq!(a.reserve("wash", 4), Ok(1));
        a.release(again);
        a.release(1);
        assert_eq!(a.reserve("x", 4), Ok(1));
    }

    #[test]
    fn loading_and_draining_slots_count_against_the_limit() {
        let a = Adapters::new(vec!["a".into()]);
        let b = a.reserve("b", 3).unwrap();
        a.publish(b);
        a.reserve("c", 3).unwrap();
        assert_eq!(a.reserve("d", 3), Err(Refused::Full { limit: 3 }));
        let held = a.resolve("b").unwrap();
        let retired = a.retire("b").unwrap();
        assert_eq!(a.reserve("d", 3), Err(Refused::Full { limit: 3 }));
        drop(held);
        a.release(retired.slot);
        assert_eq!(a.reserve("d", 3), Ok(1));
    }

    #[test]
    fn clones_share_the_adapters() {
        let a = Adapters::new(Vec::new());
        let b = a.clone();
        let slot = a.reserve("x", 1).unwrap();
        b.publish(slot);
        assert_eq!(a.names(), ["x"]);
        assert!(b.resolve("x").is_some());
    }
}
