//! Where the web view draws things: the meter trees as boxes in rows (laid out here, so the page
//! needs no JavaScript) and a history curve scaled into its chart. Pure functions of their inputs.

/// A node's box.
pub(crate) const BOX_W: f64 = 180.0;
pub(crate) const BOX_H: f64 = 62.0;
const GAP_X: f64 = 20.0;
const GAP_Y: f64 = 56.0;
const MARGIN: f64 = 10.0;

/// One node placed: the top-left corner of its box.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Placed {
    pub(crate) index: usize,
    pub(crate) x: f64,
    pub(crate) y: f64,
}

/// A tree drawing: boxes, and edges from a parent's bottom centre to a child's top centre.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct TreeLayout {
    pub(crate) width: f64,
    pub(crate) height: f64,
    pub(crate) boxes: Vec<Placed>,
    pub(crate) edges: Vec<[f64; 4]>,
}

/// Lays out a forest given each node's parent (an index into the same slice); siblings keep their
/// order. Leaves take consecutive columns, a parent is centred over its children, each depth is a
/// row. A parent that is missing or would close a loop makes the node a root.
pub(crate) fn tree(parents: &[Option<usize>]) -> TreeLayout {
    let n = parents.len();
    let mut children = vec![Vec::new(); n];
    let mut roots = Vec::new();
    for (i, p) in parents.iter().enumerate() {
        match p {
            Some(p) if *p < n && !leads_to(parents, *p, i) => children[*p].push(i),
            _ => roots.push(i),
        }
    }
    let mut col = vec![0.0; n];
    let mut depth = vec![0usize; n];
    let mut next_leaf = 0.0;
    for &r in &roots {
        place(r, 0, &children, &mut col, &mut depth, &mut next_leaf);
    }
    let column = |c: f64| MARGIN + c * (BOX_W + GAP_X);
    let row = |d: usize| MARGIN + d as f64 * (BOX_H + GAP_Y);
    let boxes: Vec<Placed> = (0..n)
        .map(|i| Placed {
            index: i,
            x: column(col[i]),
            y: row(depth[i]),
        })
        .collect();
    let mut edges = Vec::new();
    for (p, kids) in children.iter().enumerate() {
        for &k in kids {
            edges.push([
                boxes[p].x + BOX_W / 2.0,
                boxes[p].y + BOX_H,
                boxes[k].x + BOX_W / 2.0,
                boxes[k].y,
            ]);
        }
    }
    let deepest = depth.iter().copied().max().unwrap_or(0);
    TreeLayout {
        width: if n == 0 {
            0.0
        } else {
            column(next_leaf - 1.0) + BOX_W + MARGIN
        },
        height: if n == 0 {
            0.0
        } else {
            row(deepest) + BOX_H + MARGIN
        },
        boxes,
        edges,
    }
}

/// True when following parents from `from` reaches `target` (so `target` under `from` is a loop).
fn leads_to(parents: &[Option<usize>], from: usize, target: usize) -> bool {
    let mut at = Some(from);
    for _ in 0..=parents.len() {
        match at {
            Some(a) if a == target => return true,
            Some(a) => at = parents.get(a).copied().flatten(),
            None => return false,
        }
    }
    true
}

fn place(
    i: usize,
    d: usize,
    children: &[Vec<usize>],
    col: &mut [f64],
    depth: &mut [usize],
    next_leaf: &mut f64,
) {
    depth[i] = d;
    if children[i].is_empty() {
        col[i] = *next_leaf;
        *next_leaf += 1.0;
        return;
    }
    for &k in &children[i] {
        place(k, d + 1, children, col, depth, next_leaf);
    }
    let first = col[children[i][0]];
    let last = col[*children[i].last().unwrap_or(&children[i][0])];
    col[i] = f64::midpoint(first, last);
}

/// A curve scaled into a `w`×`h` chart: SVG polyline points, and the value range drawn.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Curve {
    pub(crate) points: String,
    pub(crate) count: usize,
    pub(crate) min: f64,
    pub(crate) max: f64,
}

/// Scales `(t_ms, value)` samples between `from_ms` and `to_ms` into the chart, time left to right
/// and value bottom to top; `from_zero` starts the value axis at zero (power), else at the
/// smallest value (a counter). A flat series (to the last few digits of a float) is drawn
/// mid-height, not as its rounding noise blown up to the chart's height.
pub(crate) fn curve(
    samples: &[(i64, f64)],
    (from_ms, to_ms): (i64, i64),
    (w, h): (f64, f64),
    from_zero: bool,
) -> Curve {
    let finite: Vec<(i64, f64)> = samples
        .iter()
        .copied()
        .filter(|(t, v)| v.is_finite() && (from_ms..=to_ms).contains(t))
        .collect();
    let mut min = finite.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
    if from_zero && !finite.is_empty() {
        min = min.min(0.0);
    }
    let max = finite.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
    let span_t = (to_ms - from_ms).max(1) as f64;
    let span_v = if max - min > max.abs().max(min.abs()) * 1e-9 {
        max - min
    } else {
        0.0
    };
    let points = finite
        .iter()
        .map(|(t, v)| {
            let x = (*t - from_ms) as f64 / span_t * w;
            let y = if span_v > 0.0 {
                h - (v - min) / span_v * h
            } else {
                h / 2.0
            };
            format!("{x:.1},{y:.1}")
        })
        .collect::<Vec<_>>()
        .join(" ");
    Curve {
        points,
        count: finite.len(),
        min: if finite.is_empty() { 0.0 } else { min },
        max: if finite.is_empty() { 0.0 } else { max },
    }
}

/// Average rate of a counter, per hour (kWh → kW, m³ → m³/h), over spans of at least `min_span_ms`
/// (samples closer than that are merged), at each span's end. A counter moves in steps of its
/// resolution (0.01 kWh, or a float32's last bit), so between samples 2 s apart a 1.2 kW load reads
/// 0 or twice its power; over a chart pixel's time it reads its power. A counter that went down
/// (meter exchange, rollover) gives no point there and starts a new span.
pub(crate) fn rate_per_hour(samples: &[(i64, f64)], min_span_ms: i64) -> Vec<(i64, f64)> {
    let mut out = Vec::new();
    let Some(&first) = samples.first() else {
        return out;
    };
    let (mut t0, mut v0) = first;
    for &(t, v) in &samples[1..] {
        if v < v0 || t <= t0 {
            (t0, v0) = (t, v);
            continue;
        }
        if t - t0 >= min_span_ms.max(1) {
            out.push((t, (v - v0) / ((t - t0) as f64 / 3_600_000.0)));
            (t0, v0) = (t, v);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_master_with_two_subs_and_their_rooms_is_centred_over_its_children() {
        // 0 master; 1, 2 subs; 3, 4 under 1; 5 under 2.
        let l = tree(&[None, Some(0), Some(0), Some(1), Some(1), Some(2)]);
        let x = |i: usize| l.boxes[i].x;
        let y = |i: usize| l.boxes[i].y;
        assert!(x(3) < x(4) && x(4) < x(5));
        assert!((x(1) - f64::midpoint(x(3), x(4))).abs() < 1e-9);
        assert!((x(2) - x(5)).abs() < 1e-9);
        assert!((x(0) - f64::midpoint(x(1), x(2))).abs() < 1e-9);
        assert!(y(0) < y(1) && y(1) < y(3) && (y(3) - y(5)).abs() < 1e-9);
        assert_eq!(l.edges.len(), 5);
        assert!(l.width >= x(5) + BOX_W && l.height >= y(5) + BOX_H);
    }

    #[test]
    fn a_parent_loop_in_a_broken_config_draws_instead_of_recursing_forever() {
        let l = tree(&[Some(1), Some(0), Some(5)]);
        assert_eq!(l.boxes.len(), 3);
    }

    #[test]
    fn power_from_a_counter_at_10_s_polls_of_a_1_2_kw_load() {
        // 0.01 kWh resolution, 15-minute samples: 0.30 kWh per quarter hour = 1.2 kW.
        let s = [
            (0, 100.00),
            (900_000, 100.30),
            (1_800_000, 100.60),
            (2_700_000, 100.50),
        ];
        let r = rate_per_hour(&s, 86_400_000 / 300);
        assert_eq!(r.len(), 2, "the counter going down gives no point");
        assert!((r[0].1 - 1.2).abs() < 1e-9 && (r[1].1 - 1.2).abs() < 1e-9);
    }

    /// The demo's node page drew room 101's 1.2 kW as a band from 0 to 1.35 kW: its float32
    /// counter at 5123 kWh moves in 0.00049 kWh steps, 1 or 2 of them between samples 2 s apart.
    #[test]
    fn power_from_2_s_samples_of_a_float32_counter_is_the_load_not_its_resolution() {
        let s: Vec<(i64, f64)> = (0..1800_i64)
            .map(|k| {
                let t = k * 2000;
                (
                    t,
                    f64::from((5123.25 + 1.2 * t as f64 / 3_600_000.0) as f32),
                )
            })
            .collect();
        // A day's chart: one point per 288 s.
        let r = rate_per_hour(&s, 86_400_000 / 300);
        assert!(r.len() > 8, "{r:?}");
        for (t, kw) in &r {
            assert!((kw - 1.2).abs() < 0.01, "at {t} ms: {kw} kW");
        }
    }

    /// A steady 1.2 kW whose rates differ in the 13th digit was drawn as a zigzag over the whole
    /// chart (the demo's node page).
    #[test]
    fn a_steady_load_with_rounding_noise_is_drawn_flat() {
        let samples: Vec<(i64, f64)> = (0..100_i64)
            .map(|k| (k * 10, 1.2 + if k % 2 == 0 { 2e-13 } else { -2e-13 }))
            .collect();
        let c = curve(&samples, (0, 999), (600.0, 200.0), false);
        assert!(
            c.points.split_whitespace().all(|p| p.ends_with(",100.0")),
            "{}",
            c.points
        );
        // On an axis from zero it sits at 1.2 of 1.2: the top.
        let c = curve(&samples, (0, 999), (600.0, 200.0), true);
        assert!(
            c.points.split_whitespace().all(|p| p.ends_with(",0.0")),
            "{}",
            c.points
        );
        assert_eq!(c.min, 0.0);
    }

    proptest! {
        #[test]
        fn boxes_never_overlap_in_any_forest(parents in prop::collection::vec(prop::option::of(0usize..30), 1..30)) {
            let l = tree(&parents);
            for a in &l.boxes {
                for b in &l.boxes {
                    if a.index < b.index {
                        let apart = (a.x - b.x).abs() >= BOX_W || (a.y - b.y).abs() >= BOX_H;
                        prop_assert!(apart, "{a:?} overlaps {b:?}");
                    }
                }
                prop_assert!(a.x + BOX_W <= l.width && a.y + BOX_H <= l.height);
            }
        }

        #[test]
        fn a_curve_stays_inside_its_chart(samples in prop::collection::vec((0i64..1000, -1e6f64..1e6), 0..50), from_zero: bool) {
            let c = curve(&samples, (0, 999), (600.0, 200.0), from_zero);
            for p in c.points.split_whitespace() {
                let (x, y) = p.split_once(',').unwrap();
                let (x, y): (f64, f64) = (x.parse().unwrap(), y.parse().unwrap());
                prop_assert!((0.0..=600.0).contains(&x) && (0.0..=200.0).contains(&y));
            }
        }
    }
}
