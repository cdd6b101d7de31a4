//! The master side of DL/T 645 on a line: reads (with follow-up frames), the read of the single
//! meter's address, and relay control with read-back of status word 3.

use std::time::Duration;

use chrono::NaiveDateTime;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite};

use super::data::{
    follow_up_request, read_address_request, read_answer, relay_answer, relay_request,
    ControlError, Credentials, Di, ErrorWord, ReadAnswer, RelayAction, Status3,
};
use super::frame::{function, Address, Frame, Receiver, TooLong};
use crate::exchange::{exchange, Answers, ExchangeError};

/// How a DL/T 645 transaction failed, with the meter it was for.
#[derive(Debug, Error)]
pub enum ClientError {
    #[error("meter {address}: {source}")]
    Line {
        address: Address,
        source: ExchangeError,
    },
    #[error("meter {address} refused the read of {di}: {word}")]
    Refused {
        address: Address,
        di: Di,
        word: ErrorWord,
    },
    #[error("meter {address} refused the relay command: {error}")]
    ControlRefused {
        address: Address,
        error: ControlError,
    },
    #[error("meter {address}: more than {0} follow-up frames", MAX_FOLLOW_UPS)]
    TooManyFollowUps { address: Address },
    #[error("meter {address}: {source}")]
    Encode { address: Address, source: TooLong },
}

impl ClientError {
    /// Whether the meter answered (a refusal) rather than the line failing.
    #[must_use]
    pub fn meter_answered(&self) -> bool {
        matches!(
            self,
            ClientError::Refused { .. } | ClientError::ControlRefused { .. }
        )
    }
}

/// Longest chain of 0xB1 answers followed.
const MAX_FOLLOW_UPS: u8 = 16;

/// A DL/T 645 master on one line (its receiver keeps bytes between exchanges' reads).
#[derive(Debug, Default)]
pub struct Client {
    rx: Receiver,
    /// Wake-up `FE`s before each request.
    pub preamble: usize,
}

impl Client {
    #[must_use]
    pub fn new(preamble: usize) -> Client {
        Client {
            rx: Receiver::default(),
            preamble,
        }
    }

    /// Bytes dropped as noise so far.
    #[must_use]
    pub fn noise(&self) -> u64 {
        self.rx.noise()
    }

    async fn transact<IO, T>(
        &mut self,
        io: &mut IO,
        request: &Frame,
        timeout: Duration,
        mut accept: impl FnMut(&Frame) -> Option<T>,
    ) -> Result<T, ClientError>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let address = request.address;
        let bytes = request
            .encode(self.preamble)
            .map_err(|source| ClientError::Encode { address, source })?;
        // What came before this request is stale (a late answer to the previous one).
        self.rx.clear();
        let mut listener = Answers {
            rx: &mut self.rx,
            accept: &mut accept,
        };
        let result = exchange(io, &bytes, timeout, &mut listener).await;
        result.map_err(|source| ClientError::Line { address, source })
    }

    /// Reads `di` from the meter at `address`: the value bytes, after following 0xB1 answers with
    /// 0x12 requests until the last frame (§A5).
    pub async fn read<IO>(
        &mut self,
        io: &mut IO,
        address: Address,
        di: Di,
        timeout: Duration,
    ) -> Result<Vec<u8>, ClientError>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let mut value = Vec::new();
        let mut request = super::data::read_request(address, di);
        for seq in 1..=MAX_FOLLOW_UPS {
            let answer = self
                .transact(io, &request, timeout, |f| read_answer(address, di, f).ok())
                .await?;
            match answer {
                ReadAnswer::Refused(word) => {
                    return Err(ClientError::Refused { address, di, word });
                }
                ReadAnswer::Data { value: v, more } => {
                    value.extend(v);
                    if !more {
                        return Ok(value);
                    }
                }
            }
            request = follow_up_request(address, di, seq);
        }
        Err(ClientError::TooManyFollowUps { address })
    }

    /// Reads the address of the single meter on the line (every meter would answer: §A3).
    pub async fn read_address<IO>(
        &mut self,
        io: &mut IO,
        timeout: Duration,
    ) -> Result<Address, ClientError>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        self.transact(io, &read_address_request(), timeout, |f| {
            (f.control.is_answer() && f.control.function() == function::READ_ADDRESS)
                .then_some(f.address)
        })
        .await
    }

    /// Sends relay control `action` (valid until `deadline`, meter time) and reads status word 3
    /// back: what the meter says its contact is after the command.
    pub async fn relay<IO>(
        &mut self,
        io: &mut IO,
        address: Address,
        action: RelayAction,
        credentials: &Credentials,
        deadline: NaiveDateTime,
        timeout: Duration,
    ) -> Result<Status3, ClientError>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let request = relay_request(address, action, credentials, deadline);
        let outcome = self
            .transact(io, &request, timeout, |f| relay_answer(address, f).ok())
            .await?;
        if let Err(error) = outcome {
            return Err(ClientError::ControlRefused { address, error });
        }
        self.relay_status(io, address, timeout).await
    }

    /// Reads status word 3: the relay as the meter senses it, and the last command (§A11).
    pub async fn relay_status<IO>(
        &mut self,
        io: &mut IO,
        address: Address,
        timeout: Duration,
    ) -> Result<Status3, ClientError>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let word = self.read(io, address, Di::STATUS_WORD_3, timeout).await?;
        let word = match word.as_slice() {
            [lo, hi, ..] => u16::from_le_bytes([*lo, *hi]),
            _ => 0,
        };
        Ok(Status3::from_word(word))
    }
}
