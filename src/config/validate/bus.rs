//! `[[bus]]`: transports, serial settings, the t3.5 gap, duplicate lines.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use crate::modbus::timing;

use super::{Bus, BusKind, Parity, RawBus, Serial, Transport, Validator};

impl Validator {
    pub(in crate::config) fn buses(
        &mut self,
        raw: &[(String, Option<RawBus>)],
    ) -> Vec<(String, Bus)> {
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        for (key, b) in raw {
            let Some(b) = b else { continue };
            if b.name.trim().is_empty() {
                self.push(format!("{key}.name"), "must not be empty");
            } else if !seen.insert(b.name.clone()) {
                self.push(
                    format!("{key}.name"),
                    format!("duplicate bus name {:?}: bus names must be unique", b.name),
                );
            }
            let timeout = b.timeout.unwrap_or(Duration::from_secs(1));
            if timeout.is_zero() {
                self.push(format!("{key}.timeout"), "must be greater than zero");
            }
            let misplaced = |v: &mut Self, present: bool, field: &str, kind: &str| {
                if present {
                    v.push(
                        format!("{key}.{field}"),
                        format!("not used by a {kind} bus: remove it"),
                    );
                }
            };
            let (transport, floor) = match b.kind {
                BusKind::Rtu => {
                    misplaced(self, b.host.is_some(), "host", "rtu");
                    misplaced(self, b.port.is_some(), "port", "rtu");
                    misplaced(self, b.max_concurrent.is_some(), "max_concurrent", "rtu");
                    let device = match &b.device {
                        Some(d) if !d.trim().is_empty() => d.clone(),
                        _ => {
                            self.push(format!("{key}.device"), "missing: the serial port path, e.g. \"/dev/ttyUSB0\" or \"/dev/serial/by-id/...\"");
                            String::new()
                        }
                    };
                    let baud = b.baud.unwrap_or(9600);
                    if !timing::STANDARD_BAUDS.contains(&baud) {
                        self.push(
                            format!("{key}.baud"),
                            format!("{baud} is not a serial speed a meter supports; expected one of {:?}", timing::STANDARD_BAUDS),
                        );
                    }
                    let data_bits = b.data_bits.unwrap_or(8);
                    if data_bits != 8 {
                        self.push(format!("{key}.data_bits"), format!("{data_bits}: Modbus RTU needs 8 data bits (7 is Modbus ASCII, not supported)"));
                    }
                    let stop_bits = b.stop_bits.unwrap_or(1);
                    if !matches!(stop_bits, 1 | 2) {
                        self.push(
                            format!("{key}.stop_bits"),
                            format!("{stop_bits}: expected 1 or 2"),
                        );
                    }
                    let parity = b.parity.unwrap_or(Parity::None);
                    (
                        Transport::Rtu(Serial {
                            device,
                            baud,
                            parity,
                            data_bits,
                            stop_bits,
                        }),
                        timing::t35(baud),
                    )
                }
                BusKind::Tcp | BusKind::RtuOverTcp => {
                    let kind = if matches!(b.kind, BusKind::Tcp) {
                        "tcp"
                    } else {
                        "rtu_over_tcp"
                    };
                    misplaced(self, b.device.is_some(), "device", kind);
                    misplaced(self, b.parity.is_some(), "parity", kind);
                    misplaced(self, b.data_bits.is_some(), "data_bits", kind);
                    misplaced(self, b.stop_bits.is_some(), "stop_bits", kind);
                    let host = match &b.host {
                        Some(h) if !h.trim().is_empty() => h.clone(),
                        _ => {
                            self.push(
                                format!("{key}.host"),
                                "missing: the IP address or name of the Modbus TCP endpoint",
                            );
                            String::new()
                        }
                    };
                    let port = match b.port {
                        Some(p @ 1..=65535) => p as u16,
                        None => 502,
                        Some(p) => {
                            self.push(
                                format!("{key}.port"),
                                format!("{p} is not a TCP port (1..=65535)"),
                            );
                            502
                        }
                    };
                    let connect_timeout = b.connect_timeout.unwrap_or(Duration::from_secs(3));
                    if matches!(b.kind, BusKind::Tcp) {
                        misplaced(self, b.baud.is_some(), "baud", kind);
                        let max_concurrent = b.max_concurrent.unwrap_or(1);
                        if !(1..=32).contains(&max_concurrent) {
                            self.push(format!("{key}.max_concurrent"), format!("{max_concurrent}: expected 1..=32 (most meters and gateways serve 1-4 connections)"));
                        }
                        (
                            Transport::Tcp {
                                host,
                                port,
                                max_concurrent,
                                connect_timeout,
                            },
                            Duration::ZERO,
                        )
                    } else {
                        misplaced(self, b.max_concurrent.is_some(), "max_concurrent", kind);
                        // The serial side behind the gateway still needs its t3.5.
                        let baud = b.baud.unwrap_or(9600);
                        if !timing::STANDARD_BAUDS.contains(&baud) {
                            self.push(format!("{key}.baud"), format!("{baud} is not a serial speed; it is the gateway's serial-side speed, used for the t3.5 gap"));
                        }
                        (
                            Transport::RtuOverTcp {
                                host,
                                port,
                                connect_timeout,
                            },
                            timing::t35(baud),
                        )
                    }
                }
            };
            let gap = b.gap.unwrap_or(floor);
            if gap < floor {
                self.push(
                    format!("{key}.gap"),
                    format!("{gap:?} is shorter than t3.5 = {floor:?} at this baud rate: frames would merge on the line"),
                );
            }
            out.push((
                key.clone(),
                Bus {
                    name: b.name.clone(),
                    transport,
                    timeout,
                    gap,
                    connect_delay: b.connect_delay.unwrap_or_default(),
                },
            ));
        }
        // One line, one bus task: two tasks on one RS485 line would put two masters on it.
        let mut lines: HashMap<String, String> = HashMap::new();
        for (key, b) in &out {
            let line = match &b.transport {
                Transport::Rtu(s) => format!("serial device {}", s.device),
                Transport::RtuOverTcp { host, port, .. } => {
                    format!("RTU-over-TCP endpoint {host}:{port}")
                }
                Transport::Tcp { .. } => continue,
            };
            if let Some(first) = lines.insert(line.clone(), b.name.clone()) {
                self.push(
                    key.clone(),
                    format!("bus {:?} uses the {line} of bus {first:?}: one RS485 line is one [[bus]]; put both buses' devices on one", b.name),
                );
            }
        }
        out
    }
}
