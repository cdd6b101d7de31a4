//! The master side of CJ/T 188 on a line: current data (901F), the single meter's address, and
//! valve control with the status the meter reports.

use std::time::Duration;

use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite};

use super::{
    current_data, read_address_request, read_request, ser, valve_answer, valve_request, Address,
    AnswerError, CurrentData, DiOrder, Frame, MeterType, Receiver, Status,
};
use crate::exchange::{exchange, Answers, ExchangeError};

/// How a CJ/T 188 transaction failed, with the meter it was for.
#[derive(Debug, Error)]
pub enum ClientError {
    #[error("water meter {address}: {source}")]
    Line {
        address: Address,
        source: ExchangeError,
    },
    #[error("water meter {address}: {source}")]
    Answer {
        address: Address,
        source: AnswerError,
    },
}

/// A CJ/T 188 master on one line.
#[derive(Debug, Default)]
pub struct Client {
    rx: Receiver,
    /// Wake-up `FE`s before each request (battery meters need them).
    pub preamble: usize,
    /// The sequence byte of the next request (echoed by the meter, §B5).
    ser: u8,
}

impl Client {
    #[must_use]
    pub fn new(preamble: usize) -> Client {
        Client {
            preamble,
            ..Client::default()
        }
    }

    /// Bytes dropped as noise so far.
    #[must_use]
    pub fn noise(&self) -> u64 {
        self.rx.noise()
    }

    /// Sends `request` and waits for the frame `parse` accepts: the answer from the addressed meter
    /// to this function (another meter's frame or an echo is passed over; a refusal or an
    /// unreadable answer from the right meter ends the exchange).
    async fn transact<IO, T>(
        &mut self,
        io: &mut IO,
        request: &Frame,
        timeout: Duration,
        parse: impl Fn(&Frame) -> Result<T, AnswerError>,
    ) -> Result<T, ClientError>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let address = request.address;
        let sent_ser = request.data.get(2).copied();
        self.ser = self.ser.wrapping_add(1);
        self.rx.clear();
        let mut accept = |f: &Frame| match parse(f) {
            Err(AnswerError::Control(_) | AnswerError::Address { .. }) => None,
            other => {
                if ser(f) != sent_ser {
                    tracing::debug!(meter = %f.address, "CJ/T 188 answer with another SER (many meters answer 00)");
                }
                Some(other)
            }
        };
        let mut listener = Answers {
            rx: &mut self.rx,
            accept: &mut accept,
        };
        exchange(io, &request.encode(self.preamble), timeout, &mut listener)
            .await
            .map_err(|source| ClientError::Line { address, source })?
            .map_err(|source| ClientError::Answer { address, source })
    }

    /// Reads a water meter's current data.
    pub async fn read<IO>(
        &mut self,
        io: &mut IO,
        meter_type: MeterType,
        address: Address,
        order: DiOrder,
        timeout: Duration,
    ) -> Result<CurrentData, ClientError>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let request = read_request(meter_type, address, order, self.ser);
        self.transact(io, &request, timeout, |f| current_data(address, f))
            .await
    }

    /// Reads the type and address of the single meter on the line.
    pub async fn read_address<IO>(
        &mut self,
        io: &mut IO,
        order: DiOrder,
        timeout: Duration,
    ) -> Result<(MeterType, Address), ClientError>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let request = read_address_request(order, self.ser);
        self.transact(io, &request, timeout, |f| {
            if f.control & 0x80 != 0 && f.control & 0x3F == super::function::READ_ADDRESS {
                Ok((f.meter_type, f.address))
            } else {
                Err(AnswerError::Control(f.control))
            }
        })
        .await
    }

    /// Opens or closes the valve; the status the meter reports right after (the motor may still be
    /// moving: read again until the valve bits settle).
    pub async fn valve<IO>(
        &mut self,
        io: &mut IO,
        meter_type: MeterType,
        address: Address,
        order: DiOrder,
        open: bool,
        timeout: Duration,
    ) -> Result<Status, ClientError>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let request = valve_request(meter_type, address, order, self.ser, open);
        self.transact(io, &request, timeout, |f| valve_answer(address, f))
            .await
    }
}
