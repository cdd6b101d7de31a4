//! A connection to one bus and the transactions on it (an I/O edge).
//!
//! tokio-modbus does the framing and CRC; this layer adds what it leaves to the caller: a timeout on
//! every call, the silent interval between frames on RS485, reconnecting, and telling apart the ways a
//! transaction fails (no answer, a garbled answer, a Modbus exception, a broken transport).

use std::fmt;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_modbus::client::{rtu, tcp, Client, Context};
use tokio_modbus::prelude::{Request, Response, SlaveContext};
use tokio_modbus::Slave;
use tokio_serial::SerialPortBuilderExt;

use super::plan::ReadRequest;
use super::profile::Function;
use crate::config::{Bus, Parity, Transport};

/// How a transaction failed. The bus statistics count each kind apart, because they point at different
/// faults in the field: wiring or power (timeout), noise or a baud mismatch (garbled), a wrong profile
/// (exception), the gateway or network (transport).
#[derive(Debug, Error)]
pub enum LinkError {
    #[error("bus {bus}: cannot open serial port {path}: {detail}; check the path, that no other process (a running meterd?) holds it, and that the user is in the dialout group")]
    OpenSerial {
        bus: String,
        path: String,
        detail: String,
    },
    #[error("bus {bus}: cannot connect to {addr}: {detail}; check host, port and that the endpoint is powered and reachable")]
    Connect {
        bus: String,
        addr: String,
        detail: String,
    },
    #[error("unit {unit}: no response within {timeout:?}; check wiring, power, unit id and serial settings")]
    Timeout { unit: u8, timeout: Duration },
    #[error("unit {unit}: garbled response (CRC or framing error); check termination, bias and that baud/parity match the meter")]
    Garbled { unit: u8 },
    #[error("unit {unit}: Modbus exception {code:#04x} ({})", exception_meaning(*.code))]
    Exception { unit: u8, code: u8 },
    #[error("unit {unit}: transport error: {detail}")]
    Transport { unit: u8, detail: String },
    #[error("unit {unit}: unexpected response: {detail}")]
    Protocol { unit: u8, detail: String },
}

/// Coarse class of a failure, for counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    Timeout,
    Garbled,
    Exception(u8),
    Transport,
}

impl LinkError {
    /// The counter this failure goes into.
    pub fn kind(&self) -> FailureKind {
        match self {
            LinkError::Timeout { .. } => FailureKind::Timeout,
            LinkError::Garbled { .. } | LinkError::Protocol { .. } => FailureKind::Garbled,
            LinkError::Exception { code, .. } => FailureKind::Exception(*code),
            _ => FailureKind::Transport,
        }
    }

    /// True when the device did answer (an exception): it is alive, so retrying is pointless.
    pub fn device_answered(&self) -> bool {
        matches!(self, LinkError::Exception { .. })
    }
}

/// What a Modbus exception code means to a field engineer (Application Protocol V1.1b3 §7).
pub fn exception_meaning(code: u8) -> &'static str {
    match code {
        0x01 => "illegal function: the device does not support this function code; check the profile's table (holding/input)",
        0x02 => "illegal data address: the register is not in this device's map; wrong profile or firmware variant, or a read that splits a value",
        0x03 => "illegal data value: count or value rejected; the read may exceed the device's per-request limit",
        0x04 => "server device failure",
        0x05 => "acknowledge: accepted, still processing",
        0x06 => "server device busy: retry later",
        0x08 => "memory parity error",
        0x0A => "gateway path unavailable: the TCP gateway has no route to that unit",
        0x0B => "gateway target failed to respond: the device behind the gateway did not answer",
        _ => "non-standard exception code",
    }
}

/// Values returned by a read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Data {
    Words(Vec<u16>),
    Bits(Vec<bool>),
}

/// Counts bytes received, so a timeout with bytes on the line can be told from silence: tokio-modbus
/// drops a frame whose CRC fails and keeps waiting, which surfaces as a timeout.
#[derive(Debug)]
struct Counted<T> {
    inner: T,
    rx: Arc<AtomicU64>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        self.rx.fetch_add(n as u64, Ordering::Relaxed);
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// One connection to a bus. Not shared: a bus task owns one per concurrent transaction slot, so on
/// RS485 there is never more than one request on the line.
pub struct Link {
    bus: Bus,
    ctx: Option<Context>,
    rx: Arc<AtomicU64>,
    last_end: Option<Instant>,
}

impl fmt::Debug for Link {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Link")
            .field("bus", &self.bus.name)
            .field("connected", &self.ctx.is_some())
            .finish()
    }
}

impl Link {
    /// A link that connects on first use.
    pub fn new(bus: &Bus) -> Link {
        Link {
            bus: bus.clone(),
            ctx: None,
            rx: Arc::new(AtomicU64::new(0)),
            last_end: None,
        }
    }

    fn is_serial_line(&self) -> bool {
        !matches!(self.bus.transport, Transport::Tcp { .. })
    }

    async fn connect(&mut self) -> Result<&mut Context, LinkError> {
        if self.ctx.is_none() {
            let rx = self.rx.clone();
            let ctx = match &self.bus.transport {
                Transport::Rtu(s) => {
                    let parity = match s.parity {
                        Parity::None => tokio_serial::Parity::None,
                        Parity::Even => tokio_serial::Parity::Even,
                        Parity::Odd => tokio_serial::Parity::Odd,
                    };
                    let stop = if s.stop_bits == 2 {
                        tokio_serial::StopBits::Two
                    } else {
                        tokio_serial::StopBits::One
                    };
                    let port = tokio_serial::new(&s.device, s.baud)
                        .parity(parity)
                        .stop_bits(stop)
                        .data_bits(tokio_serial::DataBits::Eight)
                        .open_native_async()
                        .map_err(|e| LinkError::OpenSerial {
                            bus: self.bus.name.clone(),
                            path: s.device.clone(),
                            detail: e.to_string(),
                        })?;
                    rtu::attach(Counted { inner: port, rx })
                }
                Transport::Tcp {
                    host,
                    port,
                    connect_timeout,
                    ..
                } => {
                    let stream = connect_tcp(&self.bus.name, host, *port, *connect_timeout).await?;
                    tcp::attach(Counted { inner: stream, rx })
                }
                Transport::RtuOverTcp {
                    host,
                    port,
                    connect_timeout,
                } => {
                    let stream = connect_tcp(&self.bus.name, host, *port, *connect_timeout).await?;
                    rtu::attach(Counted { inner: stream, rx })
                }
            };
            self.ctx = Some(ctx);
            if !self.bus.connect_delay.is_zero() {
                tokio::time::sleep(self.bus.connect_delay).await;
            }
        }
        Ok(self.ctx.as_mut().expect("connected above"))
    }

    /// Runs one transaction with `unit`: waits out the line's silent interval (and the device's own
    /// `pause`), sends, and waits at most `timeout` for the answer.
    pub async fn call(
        &mut self,
        unit: u8,
        request: Request<'static>,
        timeout: Duration,
        pause: Duration,
    ) -> Result<Response, LinkError> {
        let gap = self.bus.gap.max(pause);
        if let Some(end) = self.last_end {
            crate::clock::sleep_until_precise(end + gap).await;
        }
        let serial = self.is_serial_line();
        let rx_before = self.rx.load(Ordering::Relaxed);
        let ctx = match self.connect().await {
            Ok(c) => c,
            Err(e) => {
                self.last_end = Some(Instant::now());
                return Err(e);
            }
        };
        ctx.set_slave(Slave(unit));
        let result = tokio::time::timeout(timeout, ctx.call(request)).await;
        self.last_end = Some(Instant::now());
        match result {
            Err(_) => {
                let garbled = self.rx.load(Ordering::Relaxed) != rx_before;
                if !serial {
                    // A late answer would carry a stale transaction id: start a fresh connection.
                    self.ctx = None;
                }
                if garbled && serial {
                    Err(LinkError::Garbled { unit })
                } else {
                    Err(LinkError::Timeout { unit, timeout })
                }
            }
            Ok(Ok(Ok(response))) => Ok(response),
            Ok(Ok(Err(code))) => Err(LinkError::Exception {
                unit,
                code: code.into(),
            }),
            Ok(Err(tokio_modbus::Error::Protocol(p))) => {
                if !serial {
                    self.ctx = None;
                }
                Err(LinkError::Protocol {
                    unit,
                    detail: p.to_string(),
                })
            }
            Ok(Err(tokio_modbus::Error::Transport(e))) => {
                self.ctx = None;
                if e.kind() == io::ErrorKind::InvalidData {
                    Err(LinkError::Garbled { unit })
                } else {
                    Err(LinkError::Transport {
                        unit,
                        detail: e.to_string(),
                    })
                }
            }
        }
    }

    /// Reads one planned block.
    pub async fn read(
        &mut self,
        unit: u8,
        req: ReadRequest,
        timeout: Duration,
        pause: Duration,
    ) -> Result<Data, LinkError> {
        let request = match req.function {
            Function::Coil => Request::ReadCoils(req.address, req.count),
            Function::DiscreteInput => Request::ReadDiscreteInputs(req.address, req.count),
            Function::Holding => Request::ReadHoldingRegisters(req.address, req.count),
            Function::Input => Request::ReadInputRegisters(req.address, req.count),
        };
        let want = usize::from(req.count);
        let short = |got: usize| LinkError::Protocol {
            unit,
            detail: format!("asked for {want} values at {:#06x}, got {got}", req.address),
        };
        match self.call(unit, request, timeout, pause).await? {
            Response::ReadCoils(mut bits) | Response::ReadDiscreteInputs(mut bits) => {
                if bits.len() < want {
                    return Err(short(bits.len()));
                }
                bits.truncate(want);
                Ok(Data::Bits(bits))
            }
            Response::ReadHoldingRegisters(words) | Response::ReadInputRegisters(words) => {
                if words.len() != want {
                    return Err(short(words.len()));
                }
                Ok(Data::Words(words))
            }
            other => Err(LinkError::Protocol {
                unit,
                detail: format!("response {other:?} does not answer a read"),
            }),
        }
    }

    /// Writes one coil (FC05).
    pub async fn write_coil(
        &mut self,
        unit: u8,
        address: u16,
        on: bool,
        timeout: Duration,
    ) -> Result<(), LinkError> {
        self.call(
            unit,
            Request::WriteSingleCoil(address, on),
            timeout,
            Duration::ZERO,
        )
        .await
        .map(drop)
    }

    /// Writes holding registers: FC06 for one value unless `multiple`, FC16 otherwise (some meters
    /// accept only FC16).
    pub async fn write_registers(
        &mut self,
        unit: u8,
        address: u16,
        values: &[u16],
        multiple: bool,
        timeout: Duration,
    ) -> Result<(), LinkError> {
        let request = if values.len() == 1 && !multiple {
            Request::WriteSingleRegister(address, values[0])
        } else {
            Request::WriteMultipleRegisters(address, values.to_vec().into())
        };
        self.call(unit, request, timeout, Duration::ZERO)
            .await
            .map(drop)
    }
}

/// Connects to a Modbus TCP endpoint within `timeout`.
async fn connect_tcp(
    bus: &str,
    host: &str,
    port: u16,
    timeout: Duration,
) -> Result<TcpStream, LinkError> {
    let addr = format!("{host}:{port}");
    let err = |detail: String| LinkError::Connect {
        bus: bus.to_string(),
        addr: addr.clone(),
        detail,
    };
    let stream = tokio::time::timeout(timeout, TcpStream::connect(&addr))
        .await
        .map_err(|_| err(format!("no connection within {timeout:?}")))?
        .map_err(|e| err(e.to_string()))?;
    // Requests are tiny and latency-bound: never wait to coalesce them.
    let _ = stream.set_nodelay(true);
    Ok(stream)
}
