//! [`StopFlag`]: a request to stop long work (a training run, sampling) between two steps, set by
//! whoever asks (a signal handler, another thread) and checked by the work. The bottom floor:
//! it depends on nothing else in the crate.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// A request to stop, shared between whoever asks and the work, which checks it between steps.
/// It holds the number of the signal that asked (any non-zero code), or 0.
#[derive(Clone, Debug, Default)]
pub struct StopFlag(Arc<AtomicUsize>);

impl StopFlag {
    /// A flag that nobody has raised.
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks the work to stop, recording `code` (e.g. a signal number; 0 is taken as 1).
    pub fn request(&self, code: usize) {
        self.0.store(code.max(1), Ordering::SeqCst);
    }

    /// The code of the request, if one was made.
    pub fn requested(&self) -> Option<usize> {
        match self.0.load(Ordering::SeqCst) {
            0 => None,
            code => Some(code),
        }
    }
}

impl PartialEq for StopFlag {
    /// Two handles are equal when they share one flag.
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_is_seen_by_every_clone_and_keeps_its_code() {
        let a = StopFlag::new();
        let b = a.clone();
        assert_eq!(b.requested(), None);
        a.request(15);
        assert_eq!(b.requested(), Some(15));
        assert_eq!(a, b);
        assert_ne!(a, StopFlag::new());
        let c = StopFlag::new();
        c.request(0);
        assert_eq!(c.requested(), Some(1));
    }
}
