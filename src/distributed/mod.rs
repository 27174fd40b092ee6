//! Data parallelism's one abstraction, [`Collective`]: a group of P processes (ranks) that can
//! sum vectors in a fixed order and gather values, and three groups: [`SingleProcess`] (P = 1,
//! what every command uses by default), [`LocalGroup`] (P threads of one process, for tests and
//! for checking the maths without MPI) and, with the `mpi` feature, `mpi::MpiWorld` (the
//! ranks of `mpirun` / `srun`). docs/distributed.md gives the design.
//!
//! This floor sits below [`crate::train`], which takes any `Collective`; nothing here knows
//! about networks.

#[cfg(feature = "mpi")]
pub mod mpi;

use std::ops::Range;
use std::sync::{Arc, Barrier, Mutex};

use crate::{Error, Result};

/// A group of ranks acting together. Every method is collective: every rank calls it, in the
/// same order, with vectors of the same length (where one is given).
pub trait Collective {
    /// This process's rank, 0 ≤ rank < size.
    fn rank(&self) -> usize;

    /// The number of ranks P.
    fn size(&self) -> usize;

    /// Replaces `values` on every rank with the element-wise sum of every rank's `values`, added
    /// in rank order 0, 1, …, P−1 in f64 and rounded once to f32 ([`sum_in_rank_order`]): the
    /// same bits on every rank, whatever the MPI library's reduction algorithm.
    ///
    /// # Errors
    /// [`Error::Distributed`] if the communication fails.
    fn sum_in_rank_order(&self, values: &mut [f32]) -> Result<()>;

    /// [`Collective::sum_in_rank_order`] of a vector handed over in pieces as they are made:
    /// `produce` calls `put(k, values)` once for each piece k, in any order, piece k having
    /// `lens[k]` values (the pieces laid end to end make the vector); the sum lands in `out`
    /// (Σ lens values). A group may start summing before `produce` returns (`MpiWorld` does,
    /// so communication overlaps the computation that makes the remaining pieces); the result
    /// is the same bits either way. This default collects the pieces, then sums.
    ///
    /// # Errors
    /// [`Error::Distributed`] if `produce` put a piece twice, left one out or gave one of the
    /// wrong length, or the communication fails.
    fn sum_pieces_in_rank_order(&self, lens: &[usize], produce: Producer<'_>, out: &mut [f32]) -> Result<()> {
        let layout = PieceLayout::new(lens, out.len())?;
        let mut seen = vec![false; lens.len()];
        let mut bad = None;
        produce(&mut |k, values| match layout.check(k, values.len(), &mut seen) {
            Ok(range) => out[range].copy_from_slice(values),
            Err(e) => bad = bad.take().or(Some(e)),
        });
        bad.map_or_else(|| layout.all_seen(&seen), Err)?;
        self.sum_in_rank_order(out)
    }

    /// Every rank's `values`, concatenated in rank order, on every rank. The ranks may give
    /// different lengths.
    ///
    /// # Errors
    /// [`Error::Distributed`] if the communication fails.
    fn all_gather_f64(&self, values: &[f64]) -> Result<Vec<f64>>;

    /// Every rank's `value`, in rank order, on every rank.
    ///
    /// # Errors
    /// [`Error::Distributed`] if the communication fails.
    fn all_gather_u64(&self, value: u64) -> Result<Vec<u64>> {
        // Exact: u64 → f64 is lossless below 2^53, and the values gathered here (hashes cut to
        // 52 bits, flags, counts) stay below it.
        let v = self.all_gather_f64(&[(value & ((1 << 52) - 1)) as f64])?;
        Ok(v.into_iter().map(|x| x as u64).collect())
    }
}

/// What [`Collective::sum_pieces_in_rank_order`] calls with its `put(k, values)`.
pub type Producer<'p> = &'p mut dyn FnMut(&mut dyn FnMut(usize, &[f32]));

/// Where the pieces of a vector sit when laid end to end, and the checks on what a producer puts.
#[derive(Debug)]
pub struct PieceLayout {
    /// Piece k is `offsets[k]..offsets[k + 1]`.
    pub offsets: Vec<usize>,
}

impl PieceLayout {
    /// The layout of pieces of `lens`, which must add up to `total`.
    ///
    /// # Errors
    /// [`Error::Distributed`] if they do not.
    pub fn new(lens: &[usize], total: usize) -> Result<Self> {
        let mut offsets = Vec::with_capacity(lens.len() + 1);
        let mut at = 0usize;
        offsets.push(0);
        for &l in lens {
            at =
                at.checked_add(l).ok_or_else(|| Error::Distributed("the pieces' lengths overflow".into()))?;
            offsets.push(at);
        }
        if at != total {
            return Err(Error::Distributed(format!("pieces of {at} values in all for a vector of {total}")));
        }
        Ok(Self { offsets })
    }

    /// Piece `k`'s range, after checking that it is new and has `len` values; marks it seen.
    ///
    /// # Errors
    /// [`Error::Distributed`] for an unknown or repeated piece or a wrong length.
    pub fn check(&self, k: usize, len: usize, seen: &mut [bool]) -> Result<Range<usize>> {
        let range = self.offsets.get(k + 1).map(|&end| self.offsets[k]..end);
        match (range, seen.get_mut(k)) {
            (Some(r), Some(s)) if !*s && r.len() == len => {
                *s = true;
                Ok(r)
            }
            (Some(r), Some(_)) if r.len() != len => {
                Err(Error::Distributed(format!("piece {k} has {len} values, not {}", r.len())))
            }
            _ => Err(Error::Distributed(format!("piece {k} was put twice or does not exist"))),
        }
    }

    /// Ok if every piece was seen.
    ///
    /// # Errors
    /// [`Error::Distributed`] naming the first piece never put.
    pub fn all_seen(&self, seen: &[bool]) -> Result<()> {
        match seen.iter().position(|s| !s) {
            Some(k) => Err(Error::Distributed(format!("piece {k} of {} was never put", seen.len()))),
            None => Ok(()),
        }
    }
}

/// Sums of at least this many values run on the rayon pool (element-wise: the result does not
/// depend on the threads).
const PAR_SUM_MIN: usize = 1 << 16;

/// The element-wise sum of `pieces` (one per rank, in rank order) added in that order in f64 and
/// rounded once to f32, into `out`.
///
/// # Panics
/// If a piece's length differs from `out`'s.
pub fn sum_in_rank_order(pieces: &[&[f32]], out: &mut [f32]) {
    use rayon::prelude::*;
    const BLOCK: usize = 2048;
    for p in pieces {
        assert_eq!(p.len(), out.len(), "sum_in_rank_order: a piece of {} for {} values", p.len(), out.len());
    }
    // Block by block: each piece added into an f64 accumulator in rank order, then rounded.
    let block = |b: usize, out: &mut [f32]| {
        let start = b * BLOCK;
        let mut acc = [0.0f64; BLOCK];
        let acc = &mut acc[..out.len()];
        for p in pieces {
            for (a, &x) in acc.iter_mut().zip(&p[start..start + out.len()]) {
                *a += f64::from(x);
            }
        }
        for (o, &a) in out.iter_mut().zip(acc.iter()) {
            *o = a as f32;
        }
    };
    if out.len() >= PAR_SUM_MIN {
        out.par_chunks_mut(BLOCK).enumerate().for_each(|(b, o)| block(b, o));
    } else {
        out.chunks_mut(BLOCK).enumerate().for_each(|(b, o)| block(b, o));
    }
}

/// The examples of a batch of `batch` that rank `rank` of `size` computes:
/// [⌊rank·batch/size⌋, ⌊(rank+1)·batch/size⌋). The slices tile the batch; a rank's slice is
/// empty when there are more ranks than examples.
pub fn batch_slice(batch: usize, rank: usize, size: usize) -> Range<usize> {
    let at = |r: usize| (r as u128 * batch as u128 / size.max(1) as u128) as usize;
    at(rank)..at(rank + 1)
}

/// The chunk of a vector of `len` values that rank `rank` of `size` reduces (the same cut as
/// [`batch_slice`]).
pub fn chunk_of(len: usize, rank: usize, size: usize) -> Range<usize> {
    batch_slice(len, rank, size)
}

/// Every rank's numbered pieces, gathered on every rank and returned in the order of their
/// numbers, which together must be 0..count, each given by exactly one rank. How `eval` and
/// `sample` put back together the batches their ranks computed.
///
/// # Errors
/// [`Error::Distributed`] if a number is missing, repeated or out of range, or the
/// communication fails.
pub fn gather_pieces(
    group: &dyn Collective,
    mine: &[(usize, Vec<f64>)],
    count: usize,
) -> Result<Vec<Vec<f64>>> {
    let mut flat = Vec::with_capacity(mine.iter().map(|(_, v)| v.len() + 2).sum());
    for (k, v) in mine {
        flat.push(*k as f64);
        flat.push(v.len() as f64);
        flat.extend_from_slice(v);
    }
    let all = if group.size() == 1 { flat } else { group.all_gather_f64(&flat)? };
    let mut out: Vec<Option<Vec<f64>>> = vec![None; count];
    let mut at = 0;
    while at < all.len() {
        let bad = || Error::Distributed("the ranks' pieces do not fit together".into());
        let (k, len) = (all[at] as usize, *all.get(at + 1).ok_or_else(bad)? as usize);
        let piece = all.get(at + 2..at + 2 + len).ok_or_else(bad)?;
        match out.get_mut(k) {
            Some(slot @ None) => *slot = Some(piece.to_vec()),
            _ => {
                return Err(Error::Distributed(format!("piece {k} of {count} came twice or is out of range")))
            }
        }
        at += 2 + len;
    }
    out.into_iter()
        .enumerate()
        .map(|(k, p)| p.ok_or_else(|| Error::Distributed(format!("no rank computed piece {k} of {count}"))))
        .collect()
}

/// The pieces 0..count that rank `rank` of `size` computes: k with k mod size = rank.
pub fn my_pieces(count: usize, rank: usize, size: usize) -> impl Iterator<Item = usize> {
    (rank..count).step_by(size.max(1))
}

/// One process alone: sums and gathers are the identity.
#[derive(Clone, Copy, Debug, Default)]
pub struct SingleProcess;

impl Collective for SingleProcess {
    fn rank(&self) -> usize {
        0
    }

    fn size(&self) -> usize {
        1
    }

    fn sum_in_rank_order(&self, _values: &mut [f32]) -> Result<()> {
        // One f32 added to 0 in f64 and rounded back is itself.
        Ok(())
    }

    fn all_gather_f64(&self, values: &[f64]) -> Result<Vec<f64>> {
        Ok(values.to_vec())
    }
}

/// What the threads of a [`LocalGroup`] exchange: each rank's deposit, by rank.
#[derive(Debug)]
struct Exchange {
    f32s: Vec<Vec<f32>>,
    f64s: Vec<Vec<f64>>,
}

/// P ranks as P threads of one process (each holding one `LocalGroup`, made by
/// [`LocalGroup::new`]): the same collective semantics as MPI, for tests and for checking a
/// data-parallel computation against one process without an MPI library.
#[derive(Clone, Debug)]
pub struct LocalGroup {
    rank: usize,
    size: usize,
    shared: Arc<(Mutex<Exchange>, Barrier)>,
}

impl LocalGroup {
    /// The `size` members of a new group, rank 0 first; give one to each thread.
    ///
    /// # Panics
    /// If `size` is 0.
    pub fn new(size: usize) -> Vec<LocalGroup> {
        assert!(size > 0, "LocalGroup: a group needs at least one rank");
        let shared = Arc::new((
            Mutex::new(Exchange { f32s: vec![vec![]; size], f64s: vec![vec![]; size] }),
            Barrier::new(size),
        ));
        (0..size).map(|rank| LocalGroup { rank, size, shared: shared.clone() }).collect()
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Exchange>> {
        self.shared.0.lock().map_err(|_| Error::Distributed("a rank of the local group panicked".into()))
    }
}

impl Collective for LocalGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn sum_in_rank_order(&self, values: &mut [f32]) -> Result<()> {
        self.lock()?.f32s[self.rank] = values.to_vec();
        self.shared.1.wait();
        {
            let ex = self.lock()?;
            let pieces: Vec<&[f32]> = ex.f32s.iter().map(Vec::as_slice).collect();
            if pieces.iter().any(|p| p.len() != values.len()) {
                return Err(Error::Distributed("the ranks summed vectors of different lengths".into()));
            }
            sum_in_rank_order(&pieces, values);
        }
        // Nobody deposits the next vector before everyone has read this one.
        self.shared.1.wait();
        Ok(())
    }

    fn all_gather_f64(&self, values: &[f64]) -> Result<Vec<f64>> {
        self.lock()?.f64s[self.rank] = values.to_vec();
        self.shared.1.wait();
        let all = self.lock()?.f64s.concat();
        self.shared.1.wait();
        Ok(all)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_tile_the_batch_for_any_number_of_ranks() {
        for batch in [0, 1, 5, 64, 65_536] {
            for size in 1..=9 {
                let mut next = 0;
                for rank in 0..size {
                    let s = batch_slice(batch, rank, size);
                    assert_eq!(s.start, next);
                    assert!(s.len() <= batch.div_ceil(size));
                    next = s.end;
                }
                assert_eq!(next, batch);
            }
        }
    }

    #[test]
    fn the_rank_order_sum_is_exactly_an_f64_sum_rounded_once() {
        // 1 + 2^-30 − 1 in f32 steps is 0 or 2^-30 depending on order; in f64 it is 2^-30.
        let (a, b, c) = ([1.0f32], [2f32.powi(-30)], [-1.0f32]);
        let mut out = [0.0f32];
        sum_in_rank_order(&[&a, &b, &c], &mut out);
        assert_eq!(out[0], 2f32.powi(-30));
    }

    #[test]
    fn the_blocked_sum_equals_the_element_by_element_definition() {
        // Lengths around the block (2048) and past the parallel threshold; values whose f32
        // sums depend on the order, so any reordering or early rounding would show.
        for len in [0, 1, 2047, 2048, 2049, 70_001] {
            for ranks in 1..=4 {
                let pieces: Vec<Vec<f32>> = (0..ranks)
                    .map(|r| {
                        (0..len)
                            .map(|i| ((i * 7 + r * 13) % 11) as f32 * 0.1 + (r as f32 - 1.5) * 1e7)
                            .collect()
                    })
                    .collect();
                let refs: Vec<&[f32]> = pieces.iter().map(Vec::as_slice).collect();
                let mut out = vec![f32::NAN; len];
                sum_in_rank_order(&refs, &mut out);
                for (i, &o) in out.iter().enumerate() {
                    let exact: f64 = pieces.iter().map(|p| f64::from(p[i])).sum();
                    assert_eq!(o, exact as f32, "len {len}, {ranks} ranks, element {i}");
                }
            }
        }
    }

    #[test]
    fn a_vector_put_in_pieces_in_any_order_sums_like_the_whole() {
        let lens = [3, 0, 5000, 1, 70_000];
        let total: usize = lens.iter().sum();
        let results: Vec<(Vec<f32>, Vec<f32>)> = std::thread::scope(|s| {
            let hs: Vec<_> = LocalGroup::new(3)
                .into_iter()
                .map(|g| {
                    s.spawn(move || {
                        let r = g.rank();
                        let v: Vec<f32> =
                            (0..total).map(|i| ((i * (r + 3)) % 17) as f32 - 8.0 * r as f32).collect();
                        let mut whole = v.clone();
                        g.sum_in_rank_order(&mut whole).unwrap();
                        let layout = PieceLayout::new(&lens, total).unwrap();
                        let mut out = vec![0.0; total];
                        // Each rank hands the pieces over in its own order.
                        let order: Vec<usize> = (0..lens.len()).map(|k| (k * (r + 2)) % lens.len()).collect();
                        g.sum_pieces_in_rank_order(
                            &lens,
                            &mut |put| {
                                for &k in &order {
                                    put(k, &v[layout.offsets[k]..layout.offsets[k + 1]]);
                                }
                            },
                            &mut out,
                        )
                        .unwrap();
                        (whole, out)
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (whole, pieces) in results {
            assert!(whole == pieces, "the sum of the pieces differs from the sum of the whole");
        }
    }

    #[test]
    fn a_piece_missing_repeated_misplaced_or_of_the_wrong_length_is_an_error() {
        let lens = [2, 3];
        let mut out = vec![0.0; 5];
        let mut run = |puts: &[(usize, usize)]| {
            SingleProcess.sum_pieces_in_rank_order(
                &lens,
                &mut |put| {
                    for &(k, len) in puts {
                        put(k, &vec![1.0; len]);
                    }
                },
                &mut out,
            )
        };
        assert!(run(&[(1, 3), (0, 2)]).is_ok());
        for (puts, says) in [
            (&[(0, 2)][..], "piece 1 of 2 was never put"),
            (&[(0, 2), (0, 2), (1, 3)][..], "piece 0 was put twice"),
            (&[(0, 2), (1, 3), (2, 1)][..], "piece 2 was put twice or does not exist"),
            (&[(0, 2), (1, 4)][..], "piece 1 has 4 values, not 3"),
        ] {
            let err = run(puts).unwrap_err().to_string();
            assert!(err.contains(says), "{puts:?}: {err}");
        }
        assert!(PieceLayout::new(&[2, 3], 6).is_err(), "lengths that do not add up");
    }

    #[test]
    fn pieces_come_back_in_order_from_any_number_of_ranks() {
        for size in [1, 2, 3, 5] {
            let results: Vec<Vec<Vec<f64>>> = std::thread::scope(|s| {
                let hs: Vec<_> = LocalGroup::new(size)
                    .into_iter()
                    .map(|g| {
                        s.spawn(move || {
                            let mine: Vec<(usize, Vec<f64>)> = my_pieces(7, g.rank(), g.size())
                                .map(|k| (k, vec![k as f64; k % 3]))
                                .collect();
                            gather_pieces(&g, &mine, 7).unwrap()
                        })
                    })
                    .collect();
                hs.into_iter().map(|h| h.join().unwrap()).collect()
            });
            for r in results {
                assert_eq!(r, (0..7).map(|k| vec![k as f64; k % 3]).collect::<Vec<_>>());
            }
        }
        // A missing or repeated piece is an error, not a panic.
        assert!(gather_pieces(&SingleProcess, &[(0, vec![]), (0, vec![])], 2).is_err());
        assert!(gather_pieces(&SingleProcess, &[(1, vec![1.0])], 2).is_err());
        assert!(gather_pieces(&SingleProcess, &[(5, vec![1.0])], 2).is_err());
    }

    #[test]
    fn a_local_group_sums_and_gathers_like_one_process() {
        let group = LocalGroup::new(3);
        let results: Vec<(Vec<f32>, Vec<f64>, Vec<u64>)> = std::thread::scope(|s| {
            let handles: Vec<_> = group
                .into_iter()
                .map(|g| {
                    s.spawn(move || {
                        let r = g.rank();
                        let mut v = vec![r as f32, 1.0, 0.5 * r as f32];
                        g.sum_in_rank_order(&mut v).unwrap();
                        let gathered = g.all_gather_f64(&vec![r as f64; r]).unwrap();
                        let ids = g.all_gather_u64(10 + r as u64).unwrap();
                        (v, gathered, ids)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (v, gathered, ids) in &results {
            assert_eq!(v, &vec![3.0, 3.0, 1.5]);
            assert_eq!(gathered, &vec![1.0, 2.0, 2.0]);
            assert_eq!(ids, &vec![10, 11, 12]);
        }
    }
}
