//! A stream's answers on their way to a slow reader, bounded in bytes: each answer takes its
//! encoded size from the stream's budget (`--max-stream-buffer-bytes`) until tonic takes it
//! for sending, so a client that stops reading holds at most that much of the server's
//! memory (and, through the full budget, stops its own requests being read).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_stream::Stream;
use tonic::Status;

/// The sending side (cheap to clone).
pub struct Outbound<M> {
    tx: mpsc::Sender<(Result<M, Status>, OwnedSemaphorePermit)>,
    budget: Arc<Semaphore>,
    max: usize,
}

impl<M> Clone for Outbound<M> {
    fn clone(&self) -> Self {
        Outbound {
            tx: self.tx.clone(),
            budget: self.budget.clone(),
            max: self.max,
        }
    }
}

/// The reader went away.
#[derive(Debug)]
pub struct Closed;

/// A channel of answers holding at most `max_bytes` of them (an answer larger than that
/// waits until the channel is empty) and at most `messages` answers.
pub fn channel<M: prost::Message>(
    max_bytes: usize,
    messages: usize,
) -> (Outbound<M>, AnswerStream<M>) {
    let (tx, rx) = mpsc::channel(messages.max(1));
    let max = max_bytes.clamp(1, Semaphore::MAX_PERMITS);
    (
        Outbound {
            tx,
            budget: Arc::new(Semaphore::new(max)),
            max,
        },
        AnswerStream { rx },
    )
}

impl<M: prost::Message> Outbound<M> {
    /// Waits for room in the budget, then queues `answer`.
    pub async fn send(&self, answer: Result<M, Status>) -> Result<(), Closed> {
        let bytes = match &answer {
            Ok(m) => m.encoded_len(),
            Err(s) => s.message().len(),
        };
        let permits = bytes.clamp(1, self.max) as u32;
        let permit = tokio::select! {
            permit = self.budget.clone().acquire_many_owned(permits) => permit.map_err(|_| Closed)?,
            _ = self.tx.closed() => return Err(Closed),
        };
        self.tx.send((answer, permit)).await.map_err(|_| Closed)
    }

    /// Resolves when the reader has gone.
    pub async fn closed(&self) {
        self.tx.closed().await
    }

    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

/// The receiving side, as tonic reads it: each answer gives its bytes back to the budget as
/// it is taken.
pub struct AnswerStream<M> {
    rx: mpsc::Receiver<(Result<M, Status>, OwnedSemaphorePermit)>,
}

impl<M> Stream for AnswerStream<M> {
    type Item = Result<M, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx
            .poll_recv(cx)
            .map(|item| item.map(|(answer, _permit)| answer))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_stream::StreamExt;

    /// A message of `n` bytes on the wire (a bytes field: tag, length, data).
    fn message(n: usize) -> tideway_proto::tideway::v1::Tensor {
        tideway_proto::tideway::v1::Tensor {
            data: vec![0; n],
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn a_reader_that_does_not_read_holds_at_most_the_budget() {
        let (tx, mut rx) = channel(100, 16);
        tx.send(Ok(message(40))).await.unwrap();
        tx.send(Ok(message(40))).await.unwrap();
        // A third 42-byte answer does not fit until the reader takes one.
        let third = tokio::time::timeout(
            std::time::Duration::from_millis(50),
            tx.send(Ok(message(40))),
        )
        .await;
        assert!(third.is_err(), "sent past the budget");
        assert_eq!(rx.next().await.unwrap().unwrap().data.len(), 40);
        tx.send(Ok(message(40))).await.unwrap();
        // An answer larger than the whole budget waits for an empty channel, then goes.
        let big = tokio::spawn({
            let tx = tx.clone();
            async move { tx.send(Ok(message(500))).await }
        });
        for _ in 0..2 {
            rx.next().await.unwrap().unwrap();
        }
        big.await.unwrap().unwrap();
        assert_eq!(rx.next().await.unwrap().unwrap().data.len(), 500);
        // A reader that goes away frees a waiting sender.
        tx.send(Ok(message(90))).await.unwrap();
        let waiting = tokio::spawn({
            let tx = tx.clone();
            async move { tx.send(Ok(message(90))).await }
        });
        drop(rx);
        assert!(waiting.await.unwrap().is_err());
        assert!(tx.is_closed());
    }
}
