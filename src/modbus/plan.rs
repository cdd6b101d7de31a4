//! Read planning: which requests fetch a device's registers in the fewest round trips.
//!
//! On RS485 each request costs two frame gaps and the meter's turnaround, so reading 11 floats one by
//! one is ~10× slower than one block read. The plan is computed once per device (at config load) and
//! reused for every poll.

use super::profile::{Function, RegisterDef};

/// One read request of a plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadRequest {
    pub function: Function,
    pub address: u16,
    /// Registers (or bits for coils/discrete inputs).
    pub count: u16,
}

impl ReadRequest {
    /// One past the last address read.
    #[must_use]
    pub fn end(&self) -> u32 {
        u32::from(self.address) + u32::from(self.count)
    }
}

/// Where one planned item is found in the responses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    /// Index into [`Plan::requests`].
    pub request: usize,
    /// Offset of the item's first register (or bit) inside that request's response.
    pub offset: u16,
}

/// A device's read plan: requests plus, for every item in input order, where to find it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub requests: Vec<ReadRequest>,
    pub slots: Vec<Slot>,
}

/// Something that needs reading: the planner only cares about table, start and width.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Need {
    pub function: Function,
    pub address: u16,
    pub width: u16,
}

impl From<&RegisterDef> for Need {
    fn from(r: &RegisterDef) -> Self {
        Need {
            function: r.function,
            address: r.address,
            width: r.width(),
        }
    }
}

/// Limits a plan must respect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest register read (FC03/FC04); ≤ 125 by the protocol, less on some meters.
    pub max_registers: u16,
    /// Largest bit read (FC01/FC02); ≤ 2000.
    pub max_bits: u16,
    /// Unused registers (or bits) that may be read between two needed ones to save a request.
    /// Reading a hole costs 2 bytes on the wire per register, a new request ~10 bytes plus two t3.5.
    /// Some meters answer exception 02 for holes in their map: set 0 for those.
    pub max_gap: u16,
}

impl Limits {
    fn max_for(self, f: Function) -> u16 {
        if f.is_bit() {
            self.max_bits
        } else {
            self.max_registers
        }
    }
}

/// Plans the reads for `needs`. Each need is wholly inside exactly one request (a multi-register
/// value is never split across two reads, which Eastron meters punish with exception 02).
///
/// Needs wider than the limit cannot be planned; config validation rejects them first, and here they
/// get a request of their own so nothing is silently dropped.
#[must_use]
pub fn plan(needs: &[Need], limits: Limits) -> Plan {
    let mut order: Vec<usize> = (0..needs.len()).collect();
    order.sort_by_key(|&i| (needs[i].function, needs[i].address, needs[i].width));
    let mut requests: Vec<ReadRequest> = Vec::new();
    let mut slots = vec![
        Slot {
            request: 0,
            offset: 0
        };
        needs.len()
    ];
    for &i in &order {
        let n = needs[i];
        let n_end = u32::from(n.address) + u32::from(n.width);
        let max = u32::from(limits.max_for(n.function));
        let extend = requests.last().is_some_and(|r| {
            r.function == n.function
                && u32::from(n.address) <= r.end() + u32::from(limits.max_gap)
                && n_end.max(r.end()) - u32::from(r.address) <= max
        });
        if extend {
            let r = requests.last_mut().expect("checked above");
            if n_end > r.end() {
                r.count = (n_end - u32::from(r.address)) as u16;
            }
        } else {
            requests.push(ReadRequest {
                function: n.function,
                address: n.address,
                count: n.width,
            });
        }
        let request = requests.len() - 1;
        slots[i] = Slot {
            request,
            offset: n.address - requests[request].address,
        };
    }
    Plan { requests, slots }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const LIM: Limits = Limits {
        max_registers: 125,
        max_bits: 2000,
        max_gap: 4,
    };

    fn need(address: u16, width: u16) -> Need {
        Need {
            function: Function::Input,
            address,
            width,
        }
    }

    #[test]
    fn sdm630_map_fits_in_one_request_within_80_registers() {
        let lib = crate::modbus::profile::builtin().unwrap();
        let p = &lib["eastron_sdm630"];
        let needs: Vec<Need> = p.registers.iter().map(Need::from).collect();
        let limits = Limits {
            max_registers: p.max_registers_per_read,
            max_bits: 2000,
            max_gap: 40,
        };
        let plan = plan(&needs, limits);
        // 0x0000..0x004C spans 76 registers: one request under Eastron's 80-register ceiling.
        assert_eq!(
            plan.requests,
            vec![ReadRequest {
                function: Function::Input,
                address: 0,
                count: 0x4C
            }]
        );
    }

    #[test]
    fn gap_larger_than_allowed_splits_and_tables_never_mix() {
        let mut needs = vec![need(0, 2), need(2, 2), need(20, 2)];
        needs.push(Need {
            function: Function::Holding,
            address: 4,
            width: 2,
        });
        let p = plan(&needs, LIM);
        assert_eq!(p.requests.len(), 3);
        // The two adjacent input floats share a request; the far one and the holding one do not.
        assert_eq!(p.slots[0].request, p.slots[1].request);
        assert_eq!(p.slots[1].offset, 2);
        assert_ne!(p.slots[2].request, p.slots[0].request);
        assert_eq!(p.slots[2].offset, 0);
        assert_eq!(p.requests[p.slots[3].request].function, Function::Holding);
    }

    #[test]
    fn a_float_at_the_limit_starts_a_new_request_rather_than_being_split() {
        let limits = Limits {
            max_registers: 10,
            ..LIM
        };
        let p = plan(&[need(0, 2), need(8, 2), need(9, 2)], limits);
        assert_eq!(p.requests.len(), 2);
        assert!(p.requests.iter().all(|r| r.count <= 10));
    }

    fn needs_strategy() -> impl Strategy<Value = Vec<Need>> {
        proptest::collection::vec(
            (
                prop_oneof![
                    Just(Function::Coil),
                    Just(Function::DiscreteInput),
                    Just(Function::Holding),
                    Just(Function::Input)
                ],
                0u16..2000,
                prop_oneof![Just(1u16), Just(2), Just(4)],
            )
                .prop_map(|(function, address, width)| Need {
                    function,
                    address,
                    width: if function.is_bit() { 1 } else { width },
                }),
            0..120,
        )
    }

    proptest! {
        #[test]
        fn every_need_is_inside_its_one_request_and_limits_hold(
            needs in needs_strategy(),
            max_registers in 4u16..=125,
            max_bits in 1u16..=2000,
            max_gap in 0u16..30,
        ) {
            let limits = Limits { max_registers, max_bits, max_gap };
            let p = plan(&needs, limits);
            for (n, s) in needs.iter().zip(&p.slots) {
                let r = p.requests[s.request];
                prop_assert_eq!(r.function, n.function);
                prop_assert!(r.address <= n.address);
                prop_assert!(u32::from(n.address) + u32::from(n.width) <= r.end());
                prop_assert_eq!(s.offset, n.address - r.address);
            }
            for r in &p.requests {
                prop_assert!(r.count >= 1);
                prop_assert!(r.count <= limits.max_for(r.function));
            }
            // Requests of one table never overlap when the needs do not overlap, and each covers a need.
            for r in &p.requests {
                prop_assert!(p.slots.iter().any(|s| p.requests[s.request] == *r));
            }
        }

        #[test]
        fn merges_respect_the_gap(needs in needs_strategy(), max_gap in 0u16..30) {
            let limits = Limits { max_gap, ..LIM };
            let p = plan(&needs, limits);
            for (ri, r) in p.requests.iter().enumerate() {
                // Sorted needs of this request: no hole between consecutive ones exceeds max_gap.
                let mut spans: Vec<(u32, u32)> = needs.iter().zip(&p.slots)
                    .filter(|(_, s)| s.request == ri)
                    .map(|(n, _)| (u32::from(n.address), u32::from(n.address) + u32::from(n.width)))
                    .collect();
                spans.sort_unstable();
                let mut covered_end = spans[0].1;
                prop_assert_eq!(spans[0].0, u32::from(r.address));
                for (s, e) in spans.iter().skip(1) {
                    prop_assert!(*s <= covered_end + u32::from(max_gap), "hole {}..{} over gap {}", covered_end, s, max_gap);
                    covered_end = covered_end.max(*e);
                }
                prop_assert_eq!(covered_end, r.end());
            }
        }

        #[test]
        fn disjoint_needs_give_disjoint_requests(addrs in proptest::collection::btree_set(0u16..500, 0..60), max_gap in 0u16..10) {
            // Floats at even addresses 2a never overlap each other.
            let needs: Vec<Need> = addrs.iter().map(|a| need(a * 2, 2)).collect();
            let p = plan(&needs, Limits { max_gap, ..LIM });
            let mut rs = p.requests.clone();
            rs.sort_by_key(|r| r.address);
            for w in rs.windows(2) {
                prop_assert!(w[0].end() <= u32::from(w[1].address));
            }
            // No two requests could have been merged within the gap and limit.
            for w in rs.windows(2) {
                let merged = w[1].end() - u32::from(w[0].address);
                prop_assert!(u32::from(w[1].address) > w[0].end() + u32::from(max_gap) || merged > 125);
            }
        }
    }
}
