//! A connection to one bus and the transactions on it (an I/O edge).
//!
//! tokio-modbus does the framing and CRC; this layer adds what it leaves to the caller: a timeout on
//! every call, the silent interval between frames on RS485, reconnecting, and telling apart the ways a
//! transaction fails (no answer, a garbled answer, a Modbus exception, a broken transport).
//!
//! On RTU lines (serial and RTU over TCP) a [`LineGuard`] sits under tokio-modbus: it only hands up
//! the frame that answers the request on the line (see [`super::frame`]), drops late answers, other
//! units' frames and noise, and after a failed request keeps the line quiet until it is in step again.

use std::fmt;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::clock::Clock;
use tokio_modbus::client::{rtu, tcp, Client, Context};
use tokio_modbus::prelude::{Request, Response, SlaveContext};
use tokio_modbus::Slave;
use tokio_serial::SerialPortBuilderExt;

use super::frame::{self, Resync};
use super::plan::ReadRequest;
use super::profile::Function;
use super::spec::{Bus, Parity, Transport};

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
    /// A DL/T 645 or CJ/T 188 meter, named by its address (it has no unit id).
    #[error("meter {meter}: {detail}")]
    Meter {
        meter: String,
        kind: FailureKind,
        detail: String,
    },
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
    #[must_use]
    pub fn kind(&self) -> FailureKind {
        match self {
            LinkError::Timeout { .. } => FailureKind::Timeout,
            LinkError::Garbled { .. } | LinkError::Protocol { .. } => FailureKind::Garbled,
            LinkError::Exception { code, .. } => FailureKind::Exception(*code),
            LinkError::Meter { kind, .. } => *kind,
            _ => FailureKind::Transport,
        }
    }

    /// True when the device did answer (an exception): it is alive, so retrying is pointless.
    #[must_use]
    pub fn device_answered(&self) -> bool {
        matches!(
            self,
            LinkError::Exception { .. }
                | LinkError::Meter {
                    kind: FailureKind::Exception(_),
                    ..
                }
        )
    }
}

/// What a Modbus exception code means to a field engineer (Application Protocol V1.1b3 §7).
pub(crate) fn exception_meaning(code: u8) -> &'static str {
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

/// What the line guard saw on an RTU line, for `meterd status` and the tests.
#[derive(Debug, Default, serde::Serialize)]
pub struct LineStats {
    /// Bytes received.
    pub rx_bytes: AtomicU64,
    /// Bytes that were part of no valid frame (noise, garbled or cut frames).
    pub noise_bytes: AtomicU64,
    /// Valid frames from another unit than the one asked (late answers, duplicate addresses).
    pub foreign_frames: AtomicU64,
    /// Valid frames from the right unit that did not answer the request (a late answer to an
    /// earlier request).
    pub mismatched_frames: AtomicU64,
    /// Bytes discarded because they arrived before the request they would have answered.
    pub stale_bytes: AtomicU64,
}

impl LineStats {
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// The RTU line under tokio-modbus: drops what arrived before a request and lets only the answer to
/// the request through (see [`frame::Receiver`]). Shared with the [`Link`], which uses it to keep
/// the line quiet between requests ([`LineHandle`]).
struct Line<T> {
    inner: T,
    stats: Arc<LineStats>,
    rx: frame::Receiver,
    /// A new request starts with the next write.
    begin: bool,
    /// The request being written, to know what answers it.
    tx: Vec<u8>,
    armed: bool,
    /// An accepted answer not yet handed up in full.
    out: Vec<u8>,
    out_pos: usize,
    scratch: Box<[u8; 512]>,
}

impl<T: AsyncRead + AsyncWrite + Unpin> Line<T> {
    /// Reads and discards whatever is readable now; true if anything was.
    fn discard_readable(&mut self, cx: &mut TaskContext<'_>) -> io::Result<bool> {
        let mut any = false;
        loop {
            let mut buf = ReadBuf::new(&mut self.scratch[..]);
            match Pin::new(&mut self.inner).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) if !buf.filled().is_empty() => {
                    let n = buf.filled().len() as u64;
                    LineStats::add(&self.stats.rx_bytes, n);
                    LineStats::add(&self.stats.stale_bytes, n);
                    any = true;
                }
                Poll::Ready(Ok(())) | Poll::Pending => return Ok(any),
                Poll::Ready(Err(e)) => return Err(e),
            }
        }
    }

    fn poll_read(
        &mut self,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.armed {
            self.armed = true;
            let stale = self.rx.expect(frame::Expect::of_request(&self.tx));
            LineStats::add(&self.stats.stale_bytes, stale as u64);
        }
        loop {
            if self.out_pos < self.out.len() {
                let n = buf.remaining().min(self.out.len() - self.out_pos);
                buf.put_slice(&self.out[self.out_pos..self.out_pos + n]);
                self.out_pos += n;
                return Poll::Ready(Ok(()));
            }
            let noise_before = self.rx.noise;
            let event = self.rx.next_event();
            LineStats::add(&self.stats.noise_bytes, self.rx.noise - noise_before);
            match event {
                Some(frame::Event::Answer(f)) => {
                    self.out = f;
                    self.out_pos = 0;
                }
                Some(frame::Event::Foreign { unit, function }) => {
                    LineStats::add(&self.stats.foreign_frames, 1);
                    tracing::debug!(unit, function, "frame from another unit dropped");
                }
                Some(frame::Event::Mismatch { function, len }) => {
                    LineStats::add(&self.stats.mismatched_frames, 1);
                    tracing::debug!(
                        function,
                        len,
                        "frame that does not answer the request dropped"
                    );
                }
                None => {
                    let mut rb = ReadBuf::new(&mut self.scratch[..]);
                    match Pin::new(&mut self.inner).poll_read(cx, &mut rb) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                        // End of stream: hand up nothing, tokio-modbus reports it.
                        Poll::Ready(Ok(())) if rb.filled().is_empty() => {
                            return Poll::Ready(Ok(()))
                        }
                        Poll::Ready(Ok(())) => {
                            LineStats::add(&self.stats.rx_bytes, rb.filled().len() as u64);
                            self.rx.feed(rb.filled());
                        }
                    }
                }
            }
        }
    }

    fn poll_write(&mut self, cx: &mut TaskContext<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if self.begin {
            // Anything that arrived since the last answer cannot answer this request.
            self.discard_readable(cx)?;
            let stale = self.rx.expect(None) + (self.out.len() - self.out_pos);
            LineStats::add(&self.stats.stale_bytes, stale as u64);
            self.out.clear();
            self.out_pos = 0;
            self.tx.clear();
            self.armed = false;
            self.begin = false;
        }
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            self.tx.extend_from_slice(&buf[..n]);
        }
        r
    }
}

/// The transport handed to tokio-modbus.
struct LineGuard<T>(Arc<Mutex<Line<T>>>);

impl<T> LineGuard<T> {
    fn lock(&self) -> std::sync::MutexGuard<'_, Line<T>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for LineGuard<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.lock().poll_read(cx, buf)
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for LineGuard<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.lock().poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.lock().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.lock().inner).poll_shutdown(cx)
    }
}

/// The link's side of an RTU line, whatever the transport under it.
trait LineHandle: Send + Sync {
    /// The next write starts a new request.
    fn begin(&self);
    /// Reads and discards what is readable; true if anything was.
    fn discard(&self, cx: &mut TaskContext<'_>) -> io::Result<bool>;
    /// Reads the line's bytes as they come, past the Modbus framing (another protocol's exchange).
    fn raw_read(&self, cx: &mut TaskContext<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>>;
    /// Writes bytes to the line as they are.
    fn raw_write(&self, cx: &mut TaskContext<'_>, bytes: &[u8]) -> Poll<io::Result<usize>>;
    fn raw_flush(&self, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>>;
}

impl<T: AsyncRead + AsyncWrite + Unpin + Send> LineHandle for Mutex<Line<T>> {
    fn begin(&self) {
        self.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .begin = true;
    }
    fn discard(&self, cx: &mut TaskContext<'_>) -> io::Result<bool> {
        self.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .discard_readable(cx)
    }
    fn raw_read(&self, cx: &mut TaskContext<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let mut line = self
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Pin::new(&mut line.inner).poll_read(cx, buf)
    }
    fn raw_write(&self, cx: &mut TaskContext<'_>, bytes: &[u8]) -> Poll<io::Result<usize>> {
        let mut line = self
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Pin::new(&mut line.inner).poll_write(cx, bytes)
    }
    fn raw_flush(&self, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        let mut line = self
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Pin::new(&mut line.inner).poll_flush(cx)
    }
}

/// A link's serial line as plain bytes, for the exchanges of DL/T 645 and CJ/T 188 meters that
/// share it with Modbus ones (one transaction at a time, as the bus task runs them).
pub struct RawLine(Arc<dyn LineHandle>);

impl AsyncRead for RawLine {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.0.raw_read(cx, buf)
    }
}

impl AsyncWrite for RawLine {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        bytes: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.0.raw_write(cx, bytes)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        self.0.raw_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        self.0.raw_flush(cx)
    }
}

/// Wraps an RTU transport in a line guard: the transport for tokio-modbus and the link's handle.
fn guard<T: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    inner: T,
    stats: Arc<LineStats>,
) -> (LineGuard<T>, Arc<dyn LineHandle>) {
    let line = Arc::new(Mutex::new(Line {
        inner,
        stats,
        rx: frame::Receiver::default(),
        begin: true,
        tx: Vec::new(),
        armed: false,
        out: Vec::new(),
        out_pos: 0,
        scratch: Box::new([0; 512]),
    }));
    (LineGuard(line.clone()), line)
}

/// Keeps the line quiet until `plan` is done: whatever arrives meanwhile is discarded and pushes the
/// end out (up to the plan's limit).
async fn wait_quiet(
    line: &dyn LineHandle,
    mut plan: Resync,
    origin: Instant,
    clock: &Clock,
) -> io::Result<()> {
    let sleep = tokio::time::sleep_until(origin + plan.until);
    tokio::pin!(sleep);
    std::future::poll_fn(|cx| loop {
        let now = clock.instant().duration_since(origin);
        if line.discard(cx)? {
            plan.bytes_arrived(now);
        }
        if plan.done(now) {
            return Poll::Ready(Ok(()));
        }
        sleep.as_mut().reset(origin + plan.until);
        if std::future::Future::poll(sleep.as_mut(), cx).is_pending() {
            return Poll::Pending;
        }
    })
    .await
}

/// The request that last failed on an RTU line, for the resync before the next one.
#[derive(Debug, Clone, Copy)]
struct Failed {
    unit: u8,
    sent: Instant,
    timeout: Duration,
}

/// One connection to a bus. Not shared: a bus task owns one per concurrent transaction slot, so on
/// RS485 there is never more than one request on the line.
pub struct Link {
    bus: Bus,
    ctx: Option<Context>,
    /// The guard under `ctx` on an RTU line.
    line: Option<Arc<dyn LineHandle>>,
    stats: Arc<LineStats>,
    clock: Clock,
    origin: Instant,
    failed: Option<Failed>,
    last_end: Option<Instant>,
    /// The answer timeout, one timer for every transaction: moved later for each request it stays in
    /// the runtime's timer wheel, where a fresh `timeout` would insert and remove an entry per poll.
    answer_by: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl fmt::Debug for Link {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Link")
            .field("bus", &self.bus.name)
            .field("connected", &self.ctx.is_some())
            .finish_non_exhaustive()
    }
}

impl Link {
    /// A link that connects on first use; `clock` times its gaps and stamps its readings.
    #[must_use]
    pub fn new(bus: &Bus, clock: Clock) -> Link {
        Link::with_stats(bus, Arc::default(), clock)
    }

    /// A link that counts what its line guard drops into `stats` (shared with the bus status).
    pub(crate) fn with_stats(bus: &Bus, stats: Arc<LineStats>, clock: Clock) -> Link {
        Link {
            bus: bus.clone(),
            ctx: None,
            line: None,
            stats,
            origin: clock.instant(),
            clock,
            failed: None,
            last_end: None,
            answer_by: None,
        }
    }

    /// The clock this link times its transactions with.
    #[must_use]
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// What the line guard saw (RTU lines; all zero on Modbus TCP).
    #[must_use]
    pub fn line_stats(&self) -> Arc<LineStats> {
        self.stats.clone()
    }

    /// How long the line must be silent to count as quiet after a failure: the bus gap (≥ t3.5).
    /// Longer would cost every neighbour of a dead meter that much per probe; bytes that trickle in
    /// later (a USB adapter's latency timer) are told apart by the line guard anyway.
    fn silence(&self) -> Duration {
        self.bus.gap
    }

    fn is_serial_line(&self) -> bool {
        !matches!(self.bus.transport, Transport::Tcp { .. })
    }

    async fn connect(&mut self) -> Result<&mut Context, LinkError> {
        if self.ctx.is_none() {
            let stats = self.stats.clone();
            let (ctx, line) = match &self.bus.transport {
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
                    let (io, line) = guard(port, stats);
                    (rtu::attach(io), Some(line))
                }
                Transport::Tcp {
                    host,
                    port,
                    connect_timeout,
                    ..
                } => {
                    let stream = connect_tcp(&self.bus.name, host, *port, *connect_timeout).await?;
                    (tcp::attach(stream), None)
                }
                Transport::RtuOverTcp {
                    host,
                    port,
                    connect_timeout,
                } => {
                    let stream = connect_tcp(&self.bus.name, host, *port, *connect_timeout).await?;
                    let (io, line) = guard(stream, stats);
                    (rtu::attach(io), Some(line))
                }
            };
            self.ctx = Some(ctx);
            self.line = line;
            if !self.bus.connect_delay.is_zero() {
                tokio::time::sleep(self.bus.connect_delay).await;
            }
        }
        Ok(self.ctx.as_mut().expect("connected above"))
    }

    /// Runs one transaction with `unit`: waits out the line's silent interval (and the device's own
    /// `pause`), after a failure also until the line is back in step, sends, and waits at most
    /// `timeout` for the answer.
    pub(crate) async fn call(
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
        if let Err(e) = self.connect().await {
            self.last_end = Some(self.clock.instant());
            return Err(e);
        }
        if let (Some(line), Some(f)) = (self.line.clone(), self.failed.take()) {
            let now = self.clock.instant();
            let plan = Resync::after_failure(
                now.duration_since(self.origin),
                f.sent.duration_since(self.origin),
                f.timeout,
                f.unit,
                unit,
                self.silence(),
            );
            if let Err(e) = wait_quiet(&*line, plan, self.origin, &self.clock).await {
                self.drop_connection();
                self.last_end = Some(self.clock.instant());
                return Err(LinkError::Transport {
                    unit,
                    detail: e.to_string(),
                });
            }
        }
        if let Some(line) = &self.line {
            line.begin();
        }
        let noise_before = self.stats.noise_bytes.load(Ordering::Relaxed);
        let ctx = self.ctx.as_mut().expect("connected above");
        ctx.set_slave(Slave(unit));
        let sent = self.clock.instant();
        let deadline = match &mut self.answer_by {
            Some(d) => {
                d.as_mut().reset(sent + timeout);
                d
            }
            None => self
                .answer_by
                .insert(Box::pin(tokio::time::sleep_until(sent + timeout))),
        };
        let result = tokio::select! {
            biased;
            r = ctx.call(request) => Ok(r),
            () = deadline.as_mut() => Err(()),
        };
        self.last_end = Some(self.clock.instant());
        let failed = Failed {
            unit,
            sent,
            timeout,
        };
        match result {
            Err(()) => {
                let garbled = self.stats.noise_bytes.load(Ordering::Relaxed) != noise_before;
                if serial {
                    self.failed = Some(failed);
                } else {
                    // A late answer would carry a stale transaction id: start a fresh connection.
                    self.drop_connection();
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
                if serial {
                    self.failed = Some(failed);
                } else {
                    self.drop_connection();
                }
                Err(LinkError::Protocol {
                    unit,
                    detail: p.to_string(),
                })
            }
            Ok(Err(tokio_modbus::Error::Transport(e))) => {
                self.drop_connection();
                if serial {
                    self.failed = Some(failed);
                }
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

    /// Runs one exchange of another protocol (DL/T 645, CJ/T 188) on this link's serial line: the
    /// line's silence before it (and the device's `pause`), the raw bytes of the line to `f`, and
    /// the line marked busy until it returns. On a Modbus TCP bus there is no line to share.
    pub async fn raw<T>(
        &mut self,
        pause: Duration,
        f: impl AsyncFnOnce(&mut RawLine) -> T,
    ) -> Result<T, LinkError> {
        let gap = self.bus.gap.max(pause);
        if let Some(end) = self.last_end {
            crate::clock::sleep_until_precise(end + gap).await;
        }
        if let Err(e) = self.connect().await {
            self.last_end = Some(self.clock.instant());
            return Err(e);
        }
        let Some(line) = self.line.clone() else {
            return Err(LinkError::Transport {
                unit: 0,
                detail: format!(
                    "bus {} is Modbus TCP: DL/T 645 and CJ/T 188 meters need a serial line",
                    self.bus.name
                ),
            });
        };
        // What a failed Modbus request left on the line is not this exchange's concern: the other
        // protocol's receiver finds its own answer by address.
        self.failed = None;
        let mut raw = RawLine(line.clone());
        let out = f(&mut raw).await;
        line.begin();
        self.last_end = Some(self.clock.instant());
        Ok(out)
    }

    fn drop_connection(&mut self) {
        self.ctx = None;
        self.line = None;
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
