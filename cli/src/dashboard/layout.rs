//! Where the topology page draws each workload and edge: a layered drawing, callers on the
//! left and what they call to their right, so a request's path through a ten-service mesh
//! reads left to right at a glance.
//!
//! The steps are the usual ones for a layered graph, small enough to follow: break cycles by
//! ignoring the edges a depth-first walk finds going back; put each node one layer right of
//! its furthest caller (longest path); order each layer by the mean position of its
//! neighbours, sweeping a few times each way to uncross edges; then place boxes on a grid.
//! Computed here rather than in the page so it is tested with the rest of the data.

use std::collections::HashMap;

/// A node box's size and the gaps between boxes, in SVG user units.
pub const NODE_W: f64 = 180.0;
pub const NODE_H: f64 = 46.0;
/// Wide enough for an edge's label ("✖ failing 50.0%") between two layers.
const GAP_X: f64 = 170.0;
const GAP_Y: f64 = 28.0;
const MARGIN: f64 = 24.0;
/// Edge widths, by requests per second relative to the busiest edge.
const MIN_WIDTH: f64 = 1.5;
const MAX_WIDTH: f64 = 9.0;
/// Barycentre sweeps (each down and up).
const SWEEPS: usize = 4;

/// Where a node's box goes (its top-left corner).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Place {
    pub x: f64,
    pub y: f64,
}

/// The drawing: a place per node (in the order given), a polyline per edge, and the size.
#[derive(Clone, Debug, PartialEq)]
pub struct Drawing {
    pub nodes: Vec<Place>,
    pub edges: Vec<Vec<[f64; 2]>>,
    pub width: f64,
    pub height: f64,
}

/// Lays out `n` nodes and the `edges` between them (indices into the nodes).
pub fn layout(n: usize, edges: &[(usize, usize)]) -> Drawing {
    let forward = acyclic(n, edges);
    let layer = layers(n, edges, &forward);
    let order = orders(n, edges, &layer);
    let rows = order.iter().map(Vec::len).max().unwrap_or(0);
    let mut nodes = vec![Place { x: 0.0, y: 0.0 }; n];
    let height_of = |count: usize| count as f64 * (NODE_H + GAP_Y) - GAP_Y;
    let height = MARGIN * 2.0 + height_of(rows).max(NODE_H);
    for (l, members) in order.iter().enumerate() {
        // Short layers are centred against the tallest one.
        let top = MARGIN + (height_of(rows) - height_of(members.len())) / 2.0;
        for (i, &v) in members.iter().enumerate() {
            nodes[v] = Place {
                x: MARGIN + l as f64 * (NODE_W + GAP_X),
                y: top + i as f64 * (NODE_H + GAP_Y),
            };
        }
    }
    let width = MARGIN * 2.0 + (order.len().max(1) as f64) * (NODE_W + GAP_X) - GAP_X;
    let edges = edges
        .iter()
        .map(|&(s, d)| route(nodes[s], nodes[d], height))
        .collect();
    Drawing {
        nodes,
        edges,
        width,
        height,
    }
}

/// An edge's width for `rps`, the busiest edge's being `max_rps`: by area (square root), so a
/// ten times busier edge is about three times wider, and a quiet edge stays visible.
pub fn width(rps: f64, max_rps: f64) -> f64 {
    if max_rps.is_nan() || max_rps <= 0.0 || !rps.is_finite() || rps <= 0.0 {
        return MIN_WIDTH;
    }
    let w = MIN_WIDTH + (MAX_WIDTH - MIN_WIDTH) * (rps / max_rps).sqrt();
    (w * 10.0).round() / 10.0
}

/// Which edges to keep when layering: those a depth-first walk does not find going back to
/// a node still on its path (self-loops are never kept).
fn acyclic(n: usize, edges: &[(usize, usize)]) -> Vec<bool> {
    let mut out_edges: Vec<Vec<(usize, usize)>> = vec![Vec::new(); n];
    for (i, &(s, d)) in edges.iter().enumerate() {
        out_edges[s].push((i, d));
    }
    // 0: unseen, 1: on the path, 2: done.
    let mut state = vec![0u8; n];
    let mut keep = vec![true; edges.len()];
    for start in 0..n {
        if state[start] != 0 {
            continue;
        }
        // An explicit stack of (node, next edge to look at), so deep graphs don't recurse.
        let mut stack = vec![(start, 0usize)];
        state[start] = 1;
        while let Some(&mut (v, ref mut next)) = stack.last_mut() {
            if let Some(&(i, d)) = out_edges[v].get(*next) {
                *next += 1;
                match state[d] {
                    0 => {
                        state[d] = 1;
                        stack.push((d, 0));
                    }
                    1 => keep[i] = false,
                    _ => {}
                }
            } else {
                state[v] = 2;
                stack.pop();
            }
        }
    }
    keep
}

/// Each node's layer: one right of its furthest caller along the kept edges.
fn layers(n: usize, edges: &[(usize, usize)], keep: &[bool]) -> Vec<usize> {
    let mut layer = vec![0usize; n];
    // Longest path by relaxation: at most n rounds on an acyclic graph.
    for _ in 0..n {
        let mut changed = false;
        for (i, &(s, d)) in edges.iter().enumerate() {
            if keep[i] && layer[d] < layer[s] + 1 {
                layer[d] = layer[s] + 1;
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    layer
}

/// The nodes of each layer, top to bottom, ordered to cross few edges.
fn orders(n: usize, edges: &[(usize, usize)], layer: &[usize]) -> Vec<Vec<usize>> {
    let layers = layer.iter().max().map_or(0, |m| m + 1);
    let mut order: Vec<Vec<usize>> = vec![Vec::new(); layers];
    for v in 0..n {
        order[layer[v]].push(v);
    }
    let mut neighbours: Vec<Vec<usize>> = vec![Vec::new(); n];
    for &(s, d) in edges {
        if s != d {
            neighbours[s].push(d);
            neighbours[d].push(s);
        }
    }
    let mut pos: HashMap<usize, f64> = HashMap::new();
    let index = |order: &[Vec<usize>], pos: &mut HashMap<usize, f64>| {
        for members in order {
            for (i, &v) in members.iter().enumerate() {
                pos.insert(v, i as f64);
            }
        }
    };
    index(&order, &mut pos);
    for sweep in 0..SWEEPS * 2 {
        let down = sweep % 2 == 0;
        let ls: Vec<usize> = if down {
            (1..layers).collect()
        } else {
            (0..layers.saturating_sub(1)).rev().collect()
        };
        for l in ls {
            let adjacent = if down { l - 1 } else { l + 1 };
            let mut keyed: Vec<(f64, usize)> = order[l]
                .iter()
                .map(|&v| {
                    let near: Vec<f64> = neighbours[v]
                        .iter()
                        .filter(|&&u| layer[u] == adjacent)
                        .filter_map(|u| pos.get(u).copied())
                        .collect();
                    let own = pos.get(&v).copied().unwrap_or(0.0);
                    let key = if near.is_empty() {
                        own
                    } else {
                        near.iter().sum::<f64>() / near.len() as f64
                    };
                    (key, v)
                })
                .collect();
            // Ties keep the node's current position, then its index: stable and repeatable.
            keyed.sort_by(|a, b| {
                a.0.total_cmp(&b.0)
                    .then_with(|| pos[&a.1].total_cmp(&pos[&b.1]))
                    .then(a.1.cmp(&b.1))
            });
            order[l] = keyed.into_iter().map(|(_, v)| v).collect();
            index(&order, &mut pos);
        }
    }
    order
}

/// An edge's polyline: from the right side of the caller's box to the left side of the
/// callee's; an edge going back (or within a layer) runs below the drawing's boxes instead.
fn route(from: Place, to: Place, height: f64) -> Vec<[f64; 2]> {
    let mid_y = |p: Place| p.y + NODE_H / 2.0;
    if to.x > from.x {
        return vec![[from.x + NODE_W, mid_y(from)], [to.x, mid_y(to)]];
    }
    if from == to {
        // A workload calling itself: a small loop over its box's right edge.
        let (x, y) = (from.x + NODE_W, mid_y(from));
        return vec![
            [x, y - 8.0],
            [x + 24.0, y - 8.0],
            [x + 24.0, y + 8.0],
            [x, y + 8.0],
        ];
    }
    let below = height - MARGIN / 2.0;
    let (fx, tx) = (from.x + NODE_W / 2.0 + 10.0, to.x + NODE_W / 2.0 - 10.0);
    vec![
        [fx, from.y + NODE_H],
        [fx, below],
        [tx, below],
        [tx, to.y + NODE_H],
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn callers_are_left_of_what_they_call() {
        // web -> api -> db, web -> auth, api -> auth
        let edges = [(0, 1), (1, 2), (0, 3), (1, 3)];
        let d = layout(4, &edges);
        let x = |i: usize| d.nodes[i].x;
        assert!(x(0) < x(1) && x(1) < x(2), "{d:?}");
        assert_eq!(x(2), x(3), "db and auth share the last layer: {d:?}");
        // Every forward edge runs from the caller's right side to the callee's left side.
        for (i, &(s, t)) in edges.iter().enumerate() {
            let line = &d.edges[i];
            assert_eq!(line.first().map(|p| p[0]), Some(x(s) + NODE_W));
            assert_eq!(line.last().map(|p| p[0]), Some(x(t)));
        }
        assert!(d.width >= x(2) + NODE_W && d.height >= NODE_H * 2.0);
    }

    #[test]
    fn boxes_never_overlap_and_the_layout_is_repeatable() {
        // Ten services: a gateway fanning out, a shared database, and one cycle.
        let edges = [
            (0, 1),
            (0, 2),
            (0, 3),
            (1, 4),
            (2, 4),
            (3, 5),
            (4, 6),
            (5, 6),
            (6, 7),
            (7, 8),
            (8, 6),
            (2, 9),
        ];
        let d = layout(10, &edges);
        assert_eq!(d, layout(10, &edges));
        for a in 0..10 {
            for b in a + 1..10 {
                let (p, q) = (d.nodes[a], d.nodes[b]);
                let apart = (p.x - q.x).abs() >= NODE_W || (p.y - q.y).abs() >= NODE_H;
                assert!(apart, "nodes {a} and {b} overlap: {p:?} {q:?}");
            }
        }
        // The back edge 8 -> 6 runs below the boxes.
        let back = &d.edges[10];
        assert_eq!(back.len(), 4);
        assert!(
            d.nodes.iter().all(|p| back[1][1] > p.y + NODE_H),
            "{back:?}"
        );
    }

    #[test]
    fn layers_are_ordered_to_avoid_crossings() {
        // a -> y, b -> x: the second layer should put x (b's callee) where b is.
        let edges = [(0, 3), (1, 2)];
        let d = layout(4, &edges);
        assert_eq!(
            d.nodes[0].y < d.nodes[1].y,
            d.nodes[3].y < d.nodes[2].y,
            "{d:?}"
        );
    }

    #[test]
    fn lone_nodes_and_empty_graphs_are_drawn() {
        let d = layout(0, &[]);
        assert!(d.nodes.is_empty() && d.width > 0.0 && d.height > 0.0);
        let d = layout(2, &[]);
        assert_ne!(d.nodes[0], d.nodes[1]);
        let d = layout(1, &[(0, 0)]);
        assert_eq!(d.edges[0].len(), 4);
    }

    #[test]
    fn widths_grow_with_the_square_root_of_rps() {
        assert_eq!(width(0.0, 10.0), MIN_WIDTH);
        assert_eq!(width(10.0, 10.0), MAX_WIDTH);
        assert_eq!(width(f64::NAN, 10.0), MIN_WIDTH);
        assert_eq!(width(1.0, 0.0), MIN_WIDTH);
        let (quiet, busy) = (width(1.0, 100.0), width(100.0, 100.0));
        assert!(quiet > MIN_WIDTH && quiet < busy, "{quiet} {busy}");
    }
}
