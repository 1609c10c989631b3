//! Commands on one aggregate take turns within a process.
//!
//! Optimistic concurrency keeps the store right whatever runs at once, but two commands
//! on one aggregate that race inside one process only waste work: the loser misses the
//! cache, reads the aggregate afresh, has its append refused, waits a random moment and
//! decides again, and its refused append leaves a gap in the global positions that the
//! relay must wait out (docs/adr/0002). On a hot aggregate such retries pile up until
//! commands are refused for contention. [`Turns`] queues such commands instead: each waits,
//! first come first served, until the one before it has appended and put the aggregate
//! back into the cache, then decides on that entry. Commands on other aggregates never
//! wait for each other; commands from other processes still meet only in the database.
//!
//! A key is held only while some command has or awaits its turn, so the map stays as
//! small as the number of aggregates in use at this instant.
//!
//! A [`Batch`](crate::batch::Batch) holds the turns of every aggregate it decides on until
//! it has appended ([`Turns::take`]). It is the only holder of more than one turn at a
//! time (a command holds one, and waits for none while holding it), and a bus runs one
//! batch at a time, so no two holders can each wait for a turn the other holds.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use uuid::Uuid;

type Queue = Arc<tokio::sync::Mutex<()>>;

/// One queue per aggregate that has a command in flight.
#[derive(Debug, Default)]
pub struct Turns {
    queues: Mutex<HashMap<Uuid, Queue>>,
}

/// A place in an aggregate's queue. [`Ticket::wait`] returns once it is this command's
/// turn; dropping the ticket (or the guard `wait` returned, then the ticket) hands the
/// turn on, also when the command is cancelled while it waits.
#[derive(Debug)]
pub struct Ticket<'a> {
    turns: &'a Turns,
    id: Uuid,
    queue: Queue,
}

impl Turns {
    /// The map, locked. Every change to it is a single insert or removal, so a lock a
    /// panicking holder poisoned is taken over.
    fn queues(&self) -> MutexGuard<'_, HashMap<Uuid, Queue>> {
        self.queues
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Joins the queue of aggregate `id`.
    pub fn ticket(&self, id: Uuid) -> Ticket<'_> {
        let queue = Arc::clone(self.queues().entry(id).or_default());
        Ticket {
            turns: self,
            id,
            queue,
        }
    }

    /// Waits for aggregate `id`'s turn and holds it until the [`Turn`] is dropped.
    pub async fn take(&self, id: Uuid) -> Turn<'_> {
        let ticket = self.ticket(id);
        let guard = Arc::clone(&ticket.queue).lock_owned().await;
        Turn {
            _guard: guard,
            _ticket: ticket,
        }
    }

    /// Aggregates with a command holding or awaiting its turn.
    #[cfg(test)]
    fn in_use(&self) -> usize {
        self.queues().len()
    }
}

/// A turn held apart from a borrow of its ticket, so that one holder can keep several.
/// The guard is dropped before the ticket (fields drop in order), so the ticket sees only
/// the map's reference and its own when no one else waits.
#[derive(Debug)]
pub struct Turn<'a> {
    _guard: tokio::sync::OwnedMutexGuard<()>,
    _ticket: Ticket<'a>,
}

impl Ticket<'_> {
    /// Waits for this command's turn (tokio's mutex serves its waiters in order).
    pub async fn wait(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.queue.lock().await
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        let mut queues = self.turns.queues();
        // Every ticket holds a clone, and clones are only made under this lock: two
        // references (the map's and this one) mean no one else holds or awaits a turn.
        if Arc::strong_count(&self.queue) == 2 {
            queues.remove(&self.id);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn commands_on_one_aggregate_take_turns_in_order() {
        let turns = Arc::new(Turns::default());
        let id = Uuid::new_v4();
        let inside = Arc::new(AtomicUsize::new(0));
        let order = Arc::new(Mutex::new(Vec::new()));
        let first = turns.ticket(id);
        let held = first.wait().await;
        let mut waiting = Vec::new();
        for n in 0..5 {
            let (turns, inside, order) = (turns.clone(), inside.clone(), order.clone());
            waiting.push(tokio::spawn(async move {
                let ticket = turns.ticket(id);
                let _turn = ticket.wait().await;
                assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0, "two at once");
                tokio::time::sleep(Duration::from_millis(2)).await;
                order.lock().unwrap().push(n);
                inside.fetch_sub(1, Ordering::SeqCst);
            }));
            // Let each join the queue before the next.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(
            order.lock().unwrap().is_empty(),
            "someone went before the holder"
        );
        drop(held);
        drop(first);
        for task in waiting {
            task.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), vec![0, 1, 2, 3, 4]);
        assert_eq!(turns.in_use(), 0);
    }

    #[tokio::test]
    async fn other_aggregates_do_not_wait() {
        let turns = Turns::default();
        let a = turns.ticket(Uuid::new_v4());
        let _held = a.wait().await;
        let b = turns.ticket(Uuid::new_v4());
        let _other = tokio::time::timeout(Duration::from_secs(1), b.wait())
            .await
            .expect("another aggregate's turn is free");
        assert_eq!(turns.in_use(), 2);
    }

    #[tokio::test]
    async fn a_cancelled_wait_hands_on_and_leaves_nothing_behind() {
        let turns = Turns::default();
        let id = Uuid::new_v4();
        let first = turns.ticket(id);
        let held = first.wait().await;
        {
            let second = turns.ticket(id);
            let waited = tokio::time::timeout(Duration::from_millis(20), second.wait()).await;
            assert!(waited.is_err(), "the turn was taken twice");
        }
        assert_eq!(turns.in_use(), 1);
        drop(held);
        drop(first);
        assert_eq!(turns.in_use(), 0);
        let third = turns.ticket(id);
        let _third = tokio::time::timeout(Duration::from_secs(1), third.wait())
            .await
            .expect("the turn passed on after a cancelled wait");
    }

    #[tokio::test]
    async fn held_turns_wait_like_tickets_and_leave_nothing_behind() {
        let turns = Turns::default();
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let held_a = turns.take(a).await;
        let held_b = turns.take(b).await;
        {
            let waited = tokio::time::timeout(Duration::from_millis(20), turns.take(a)).await;
            assert!(waited.is_err(), "a held turn was taken twice");
        }
        let ticket = turns.ticket(b);
        let waited = tokio::time::timeout(Duration::from_millis(20), ticket.wait()).await;
        assert!(
            waited.is_err(),
            "a command went while a batch held its aggregate"
        );
        assert_eq!(turns.in_use(), 2);
        drop(held_b);
        let _turn = tokio::time::timeout(Duration::from_secs(1), ticket.wait())
            .await
            .expect("the turn passed on when the batch let go");
        drop(held_a);
        assert_eq!(turns.in_use(), 1, "only b, whose ticket is still out");
    }
}
