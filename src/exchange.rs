//! One request and its answer on a byte stream, for the framed protocols that are not Modbus
//! (DL/T 645, CJ/T 188): write the request, then read until the protocol's receiver recognises the
//! answer to it, or the timeout passes. Frames that are not the answer (an adapter's echo of the
//! request, another meter's late answer, noise) are passed over, so a late meter never
//! desynchronises the line: its answer is simply not ours.

use std::time::Duration;

use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Why an exchange brought no answer.
#[derive(Debug, Error)]
pub enum ExchangeError {
    #[error("no answer within {timeout:?}{}", if *.garbled { " (bytes came, but no valid frame)" } else { "" })]
    Timeout { timeout: Duration, garbled: bool },
    #[error("line error: {0}")]
    Io(#[from] std::io::Error),
    #[error("the line closed")]
    Closed,
}

/// A byte stream to a line (a serial port, a serial server's socket).
pub trait Line: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Line for T {}

/// What listens for the answer: the protocol's receiver and its test of "the answer to this
/// request".
pub trait Listener {
    type Answer;
    /// Takes bytes off the line; the answer once it is complete.
    fn feed(&mut self, bytes: &[u8]) -> Option<Self::Answer>;
    /// Bytes dropped as noise so far (to tell a garbled answer from silence).
    fn noise(&self) -> u64;
}

/// A protocol's receiver: bytes off the line in, whole frames out.
pub trait Receive {
    type Frame;
    fn push(&mut self, bytes: &[u8]);
    fn next_frame(&mut self) -> Option<Self::Frame>;
    fn noise(&self) -> u64;
}

/// The frames of `rx`, tested by `accept` for the answer to the request on the line.
pub struct Answers<'a, R, F> {
    pub rx: &'a mut R,
    pub accept: &'a mut F,
}

impl<R: Receive, T, F: FnMut(&R::Frame) -> Option<T>> Listener for Answers<'_, R, F> {
    type Answer = T;

    fn feed(&mut self, bytes: &[u8]) -> Option<T> {
        self.rx.push(bytes);
        while let Some(f) = self.rx.next_frame() {
            if let Some(t) = (self.accept)(&f) {
                return Some(t);
            }
        }
        None
    }

    fn noise(&self) -> u64 {
        self.rx.noise()
    }
}

/// Sends `request`, then feeds what the line brings to `listener` until it has the answer or
/// `timeout` passes.
pub async fn exchange<IO, L>(
    io: &mut IO,
    request: &[u8],
    timeout: Duration,
    listener: &mut L,
) -> Result<L::Answer, ExchangeError>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    L: Listener,
{
    let noise_before = listener.noise();
    io.write_all(request).await?;
    io.flush().await?;
    // One timer for the whole exchange (on tokio's clock, so a paused test clock holds it too).
    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline);
    let mut buf = [0u8; 256];
    loop {
        let read = tokio::select! {
            biased;
            r = io.read(&mut buf) => Ok(r),
            () = &mut deadline => Err(()),
        };
        let n = match read {
            Err(()) => {
                return Err(ExchangeError::Timeout {
                    timeout,
                    garbled: listener.noise() != noise_before,
                })
            }
            Ok(Ok(0)) => return Err(ExchangeError::Closed),
            Ok(Ok(n)) => n,
            Ok(Err(e)) => return Err(e.into()),
        };
        if let Some(a) = listener.feed(&buf[..n]) {
            return Ok(a);
        }
    }
}
