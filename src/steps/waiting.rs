//! A step waiting in the merge queue, with the channel its answer goes back through.
//!
//! Its own module because both the queue and the pooled buffers (which keep a batch's list of
//! waiting steps between calls) hold it.

use tokio::sync::oneshot;

use super::{Answer, Step};

/// A step waiting for a core, with the channel its answer goes back through.
pub(super) struct Waiting<S: Step> {
    pub(super) step: S,
    /// Taken when the step is answered.
    pub(super) reply: Option<oneshot::Sender<Answer<S>>>,
}

impl<S: Step> Waiting<S> {
    pub(super) fn new(step: S, reply: oneshot::Sender<Answer<S>>) -> Self {
        Self {
            step,
            reply: Some(reply),
        }
    }

    pub(super) fn answer(&mut self, answer: Answer<S>) {
        if let Some(reply) = self.reply.take() {
            // A closed channel means the client went away; nobody is left to tell.
            let _ = reply.send(answer);
        }
    }

    /// Whether the step still waits for its answer.
    pub(super) fn open(&self) -> bool {
        self.reply.is_some()
    }
}
