//! In-process coalescing of concurrent requests with the same tenant + key.
//!
//! The first request for a key becomes the leader and gets a [`Leader`]
//! guard; the ones that arrive while it runs are followers and wait for what
//! the leader publishes. Like pingora's cache lock: dropping the guard without
//! finishing (a panic, a cancelled task) still wakes every follower, with an
//! error, so nobody waits for a leader that is gone.
//!
//! A streamed response is published as soon as its head arrives
//! ([`Leader::stream`]) while the flight stays open, so duplicates that
//! arrive mid-stream still join it and read the recording.
//!
//! The map is sharded (dashmap) and no shard guard is ever held across an
//! `.await`. Followers cost the store nothing: whatever backend is used, only
//! the leader talks to it.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use tokio::sync::watch;

use super::recording::Recording;
use super::replay::Replay;
use crate::metrics::Outcome;
use crate::problem::{Code, Problem};
use crate::store::{Fingerprint, RecordKey};

/// What a leader hands to its followers.
#[derive(Debug, Clone)]
pub enum Shared {
    /// The response to give every follower, marked replayed.
    Response(Arc<Replay>),
    /// A problem to answer with, and how to count it.
    Problem(Problem, Outcome),
    /// A streamed response, recorded as it arrives: read it from the start.
    Stream(Arc<Recording>),
}

pub struct Flight {
    pub fingerprint: Option<Fingerprint>,
    waiters: AtomicU32,
    done: watch::Sender<Option<Shared>>,
    /// Set once the leader owns the key in the store: from then on its
    /// request is the key's request, and a different one is a mismatch.
    executing: watch::Sender<bool>,
}

impl Flight {
    /// Registers one more waiter, unless `max` are waiting already.
    pub fn add_waiter(self: &Arc<Self>, max: u32) -> Option<WaiterSlot> {
        let prev = self.waiters.fetch_add(1, Ordering::AcqRel);
        let slot = WaiterSlot(self.clone());
        (prev < max).then_some(slot)
    }

    /// Resolves once the leader owns the key in the store.
    pub fn executing(&self) -> watch::Receiver<bool> {
        self.executing.subscribe()
    }

    pub fn subscribe(&self) -> watch::Receiver<Option<Shared>> {
        self.done.subscribe()
    }
}

/// Holds one place among a flight's waiters; released on drop.
pub struct WaiterSlot(Arc<Flight>);

impl Drop for WaiterSlot {
    fn drop(&mut self) {
        self.0.waiters.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The in-flight keys of this process. Cheap to clone.
#[derive(Clone, Default)]
pub struct Flights {
    map: Arc<DashMap<RecordKey, Arc<Flight>>>,
}

pub enum Joined {
    Leader(Leader),
    Follower(Arc<Flight>),
}

impl Flights {
    /// Joins the flight for `key`, starting it if there is none.
    pub fn join(&self, key: &RecordKey, fingerprint: Option<Fingerprint>) -> Joined {
        match self.map.entry(key.clone()) {
            Entry::Occupied(e) => Joined::Follower(e.get().clone()),
            Entry::Vacant(e) => {
                let flight = Arc::new(Flight {
                    fingerprint,
                    waiters: AtomicU32::new(0),
                    done: watch::Sender::new(None),
                    executing: watch::Sender::new(false),
                });
                e.insert(flight.clone());
                Joined::Leader(Leader {
                    flights: self.clone(),
                    key: key.clone(),
                    flight,
                    finished: false,
                })
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// The leader's permit. Finish it with [`Leader::finish`]; dropping it
/// unfinished wakes the followers with an error.
pub struct Leader {
    flights: Flights,
    key: RecordKey,
    flight: Arc<Flight>,
    finished: bool,
}

impl Leader {
    pub fn key(&self) -> &RecordKey {
        &self.key
    }

    /// Tells followers that this leader's request is the one the key holds.
    pub fn executing(&self) {
        self.flight.executing.send_replace(true);
    }

    /// Hands a response that is still streaming to every follower, present
    /// and future, without ending the flight: a duplicate that arrives while
    /// the stream runs joins it instead of going to the store.
    pub fn stream(&self, recording: Arc<Recording>) {
        self.flight.done.send_replace(Some(Shared::Stream(recording)));
    }

    /// Publishes the outcome to every follower and ends the flight. The key is
    /// removed first, so a request that arrives afterwards is not treated as a
    /// held duplicate but goes to the store.
    pub fn finish(mut self, shared: Shared) {
        self.finished = true;
        self.flights
            .map
            .remove_if(&self.key, |_, f| Arc::ptr_eq(f, &self.flight));
        self.flight.done.send_replace(Some(shared));
    }
}

impl Drop for Leader {
    fn drop(&mut self) {
        if !self.finished {
            self.flights
                .map
                .remove_if(&self.key, |_, f| Arc::ptr_eq(f, &self.flight));
            let problem = Problem::new(
                Code::UpstreamUnavailable,
                "the original request was abandoned inside the proxy",
            );
            self.flight
                .done
                .send_replace(Some(Shared::Problem(problem, Outcome::upstream_error)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn dropped_leader_wakes_followers() {
        let flights = Flights::default();
        let key = RecordKey::new("t", "k");
        let Joined::Leader(leader) = flights.join(&key, None) else {
            panic!("first is leader")
        };
        let Joined::Follower(f) = flights.join(&key, None) else {
            panic!("second follows")
        };
        let mut rx = f.subscribe();
        drop(leader);
        let shared = rx.wait_for(Option::is_some).await.unwrap().clone();
        assert!(matches!(shared, Some(Shared::Problem(p, _)) if p.code == Code::UpstreamUnavailable));
        assert!(flights.is_empty());
        assert!(matches!(flights.join(&key, None), Joined::Leader(_)));
    }

    #[test]
    fn waiter_limit() {
        let flights = Flights::default();
        let Joined::Leader(l) = flights.join(&RecordKey::new("t", "k"), None) else {
            unreachable!()
        };
        let f = l.flight.clone();
        let a = f.add_waiter(2);
        let b = f.add_waiter(2);
        assert!(a.is_some() && b.is_some());
        assert!(f.add_waiter(2).is_none());
        drop(a);
        assert!(f.add_waiter(2).is_some());
    }
}
