//! Where the agent's calls go when its coordinator has several endpoints (a
//! leader and its standby, or the address it moved to): the current one until
//! it cannot be reached, then the next, round and round.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// One client per endpoint, and which one calls go to now.
#[derive(Clone, Debug)]
pub struct Coordinators<C> {
    clients: Arc<[C]>,
    current: Arc<AtomicUsize>,
}

impl<C: Clone> Coordinators<C> {
    /// `clients` in the order given; at least one.
    pub fn new(clients: Vec<C>) -> Self {
        assert!(!clients.is_empty(), "a coordinator needs an endpoint");
        Coordinators {
            clients: clients.into(),
            current: Arc::default(),
        }
    }

    /// The client to call now, and its place (for `unreachable`).
    pub fn pick(&self) -> (usize, C) {
        let at = self.current.load(Ordering::Relaxed) % self.clients.len();
        (at, self.clients[at].clone())
    }

    /// The client at `at` could not be reached: calls go to the next from now
    /// on. Calls that failed on the same one move on once, not once each.
    pub fn unreachable(&self, at: usize) {
        let next = (at + 1) % self.clients.len();
        let _ = self
            .current
            .compare_exchange(at, next, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// One call at the current endpoint; one found unreachable makes the next
    /// endpoint current for the calls after it.
    pub async fn call<T, F, Fut>(&self, call: F) -> Result<T, tonic::Status>
    where
        F: FnOnce(C) -> Fut,
        Fut: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        let (at, client) = self.pick();
        let answer = call(client).await;
        if answer
            .as_ref()
            .is_err_and(|s| s.code() == tonic::Code::Unavailable)
        {
            self.unreachable(at);
        }
        answer
    }

    pub fn len(&self) -> usize {
        self.clients.len()
    }

    pub fn is_empty(&self) -> bool {
        self.clients.is_empty()
    }
}

/// `http://a:7070,http://b:7070`: the endpoints of one coordinator, in order.
pub fn endpoints(list: &str) -> Vec<&str> {
    list.split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_move_on_once_per_failure_and_wrap_around() {
        let all = Coordinators::new(vec!["a", "b", "c"]);
        assert_eq!(all.pick(), (0, "a"));
        // Two calls failed on `a` at once: one step, not two.
        all.unreachable(0);
        all.unreachable(0);
        assert_eq!(all.pick(), (1, "b"));
        all.unreachable(1);
        all.unreachable(2);
        assert_eq!(all.pick(), (0, "a"), "round and round");
        let one = Coordinators::new(vec!["only"]);
        one.unreachable(0);
        assert_eq!(one.pick(), (0, "only"));
    }

    #[test]
    fn a_list_of_endpoints_splits_on_commas() {
        assert_eq!(
            endpoints("http://a:1, http://b:2,,"),
            vec!["http://a:1", "http://b:2"]
        );
        assert_eq!(endpoints("http://a:1"), vec!["http://a:1"]);
    }
}
