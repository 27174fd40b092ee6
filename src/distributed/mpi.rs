//! [`MpiWorld`]: the ranks of an MPI job (`mpirun -n P`, `srun`) as a [`Collective`], through the
//! `mpi` crate (rsmpi) over the system's MPI library.
//!
//! The gradient sum is a reduce-scatter followed by an all-gather, both as plain data movement
//! (`MPI_Ialltoallv`, `MPI_Iallgatherv`): rank q receives chunk q of every rank's vector, adds the P
//! pieces in rank order ([`sum_in_rank_order`]) and the summed chunks are gathered back. No float
//! is added by MPI itself, so the result does not depend on the library or its algorithms.
//!
//! [`Collective::sum_pieces_in_rank_order`] does the same bucket by bucket while the backward
//! pass still runs: the pieces (parameters) are grouped, from the last one back, into buckets of
//! about `DDPM_MPI_BUCKET_MB` megabytes (default 16; 0 = one bucket, summed after the backward
//! pass); a bucket's reduce-scatter starts (`MPI_Ialltoallv`) as soon as its pieces and those of
//! every bucket before it are in, and each later `put` advances the requests in flight
//! (`MPI_Test`), summing a bucket whose chunks have arrived and starting its all-gather
//! (`MPI_Iallgatherv`). Reduce-scatters and all-gathers run on two duplicates of the world, each
//! started in bucket order, so every rank starts the same collectives in the same order. The
//! element-wise sums are those of the one-shot path: the same bits for any bucket size.
//!
//! MPI's default error handler (errors are fatal) stays in place: a failed call, or a rank that
//! dies, ends the whole job.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::ffi::{c_int, c_void};
use std::ops::Range;

use mpi::datatype::PartitionMut;
use mpi::environment::Universe;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use mpi::Count;

use mpi::ffi;
use mpi::raw::AsRaw;

use super::{chunk_of, sum_in_rank_order, Collective, PieceLayout, Producer};
use crate::{Error, Result};

/// The world communicator of an initialised MPI environment (finalised when dropped).
pub struct MpiWorld {
    world: SimpleCommunicator,
    /// Duplicates of the world for the overlapped sum's reduce-scatters and all-gathers.
    scatter_comm: SimpleCommunicator,
    gather_comm: SimpleCommunicator,
    /// Values per bucket of the overlapped sum (`DDPM_MPI_BUCKET_MB`); `usize::MAX`: one bucket.
    bucket_values: usize,
    /// The overlapped sum's send, receive and summed buffers, kept from step to step.
    buffers: RefCell<[Vec<f32>; 3]>,
    // Dropped last: finalises MPI.
    _universe: Universe,
}

impl std::fmt::Debug for MpiWorld {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MpiWorld")
            .field("rank", &self.world.rank())
            .field("size", &self.world.size())
            .finish()
    }
}

impl MpiWorld {
    /// Initialises MPI. A process started without `mpirun` becomes a world of one (MPI's
    /// singleton start).
    ///
    /// # Errors
    /// [`Error::Distributed`] if MPI was already initialised in this process.
    /// [`Error::Distributed`] if `DDPM_MPI_BUCKET_MB` is not a number of megabytes or differs
    /// between ranks.
    pub fn init() -> Result<Self> {
        let universe = mpi::initialize()
            .ok_or_else(|| Error::Distributed("MPI was already initialised in this process".into()))?;
        let world = universe.world();
        let (scatter_comm, gather_comm) = (world.duplicate(), world.duplicate());
        let me = Self {
            world,
            scatter_comm,
            gather_comm,
            bucket_values: usize::MAX,
            buffers: RefCell::default(),
            _universe: universe,
        };
        // Every rank reads its own environment: agree before any rank acts on it.
        let bucket = bucket_values(std::env::var("DDPM_MPI_BUCKET_MB").ok().as_deref());
        let code = match &bucket {
            Ok(v) => (*v as u64).min((1 << 52) - 1),
            Err(_) => (1 << 52) - 1,
        };
        let all = me.all_gather_u64(code)?;
        let bucket = bucket?;
        if all.iter().any(|&c| c != all[0]) {
            return Err(Error::Distributed(format!(
                "the ranks were given different DDPM_MPI_BUCKET_MB (bucket sizes in values {all:?}); \
                 give every rank the same environment"
            )));
        }
        Ok(Self { bucket_values: bucket, ..me })
    }

    /// The communicator, for collectives this type does not wrap.
    pub fn world(&self) -> &SimpleCommunicator {
        &self.world
    }

    /// Ends every rank of the job at once with `code` (`MPI_Abort`).
    pub fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }

    /// Every rank's `len`, in rank order.
    fn gather_lengths(&self, len: usize) -> Result<Vec<usize>> {
        if Count::try_from(len).is_err() {
            return Err(Error::Distributed(format!("{len} values are more than one MPI message can hold")));
        }
        let mut lens = vec![0u64; self.size()];
        self.world.all_gather_into(&(len as u64), &mut lens[..]);
        Ok(lens.into_iter().map(|l| l as usize).collect())
    }
}

/// Values per bucket for `DDPM_MPI_BUCKET_MB` = `mb` (default 16 MB; 0: one bucket, `usize::MAX`).
fn bucket_values(mb: Option<&str>) -> Result<usize> {
    let mb: f64 = match mb.map(str::trim) {
        None | Some("") => 16.0,
        Some(v) => v.parse().ok().filter(|v: &f64| v.is_finite() && *v >= 0.0).ok_or_else(|| {
            Error::Distributed(format!(
                "DDPM_MPI_BUCKET_MB={v} is not a size in megabytes (e.g. 16, 0.5, or 0 for one bucket)"
            ))
        })?,
    };
    Ok(if mb == 0.0 { usize::MAX } else { ((mb * 1e6 / 4.0) as usize).max(1) })
}

impl Collective for MpiWorld {
    fn rank(&self) -> usize {
        self.world.rank() as usize
    }

    fn size(&self) -> usize {
        self.world.size() as usize
    }

    fn sum_in_rank_order(&self, values: &mut [f32]) -> Result<()> {
        // The overlapped sum with the whole vector as its one piece: one code path for both.
        let input = values.to_vec();
        self.sum_pieces_in_rank_order(&[values.len()], &mut |put| put(0, &input), values)
    }

    fn sum_pieces_in_rank_order(&self, lens: &[usize], produce: Producer<'_>, out: &mut [f32]) -> Result<()> {
        let pieces = PieceLayout::new(lens, out.len())?;
        let buckets = Buckets::new(&pieces, self.bucket_values, self.rank(), self.size())?;
        // The ranks must cut the same buckets, or their collectives would not match.
        let shape = buckets.fingerprint();
        let all = self.all_gather_u64(shape)?;
        if all.iter().any(|&f| f != shape) {
            return Err(Error::Distributed("the ranks summed vectors of different shapes".into()));
        }
        let mut bufs = self.buffers.take();
        let [send, recv, summed] = &mut bufs;
        send.resize(out.len(), 0.0);
        recv.resize(buckets.recv_len, 0.0);
        summed.resize(buckets.summed_len, 0.0);
        let result = {
            let mut flight = Flight::new(self, &buckets, send, recv, summed, out);
            let mut seen = vec![false; lens.len()];
            let mut bad = None;
            produce(&mut |k, values| {
                let put =
                    pieces.check(k, values.len(), &mut seen).and_then(|range| flight.put(k, range, values));
                if let Err(e) = put {
                    bad = bad.take().or(Some(e));
                }
            });
            // Pieces never put count as zeros, so every rank still takes part in every
            // collective; the error is reported after.
            let missing: Vec<usize> = seen.iter().enumerate().filter(|(_, s)| !**s).map(|(k, _)| k).collect();
            let finished = missing
                .iter()
                .try_for_each(|&k| {
                    let range = pieces.offsets[k]..pieces.offsets[k + 1];
                    flight.put(k, range.clone(), &vec![0.0; range.len()])
                })
                .and_then(|()| flight.finish());
            finished.and(bad.map_or_else(|| pieces.all_seen(&seen), Err))
        };
        *self.buffers.borrow_mut() = bufs;
        result
    }

    fn all_gather_f64(&self, values: &[f64]) -> Result<Vec<f64>> {
        let lens = self.gather_lengths(values.len())?;
        let total: usize = lens.iter().sum();
        if Count::try_from(total).is_err() {
            return Err(Error::Distributed(format!("{total} values are more than one MPI message can hold")));
        }
        let counts: Vec<Count> = lens.iter().map(|&l| l as Count).collect();
        let displs: Vec<Count> =
            lens.iter().scan(0, |at, &l| Some(std::mem::replace(at, *at + l) as Count)).collect();
        let mut out = vec![0.0f64; total];
        {
            let mut recv = PartitionMut::new(&mut out[..], counts, displs);
            self.world.all_gather_varcount_into(values, &mut recv);
        }
        Ok(out)
    }
}

/// The buckets of an overlapped sum and where each one's data sits in the buffers.
#[derive(Debug)]
struct Buckets {
    list: Vec<Bucket>,
    /// The bucket of each piece.
    of_piece: Vec<usize>,
    recv_len: usize,
    summed_len: usize,
    size: usize,
}

#[derive(Debug)]
struct Bucket {
    /// Pieces not yet put.
    missing: usize,
    /// The bucket's values in the vector.
    values: Range<usize>,
    /// Its chunks, one per rank, relative to `values.start` (reduce-scatter send, all-gather
    /// receive).
    counts: Vec<c_int>,
    displs: Vec<c_int>,
    /// This rank's chunk: P copies of `mine` values from `recv_at` in the receive buffer, summed
    /// into `mine` values from `summed_at`.
    mine: usize,
    recv_at: usize,
    summed_at: usize,
    recv_counts: Vec<c_int>,
    recv_displs: Vec<c_int>,
}

impl Buckets {
    /// Buckets of at least `per_bucket` values (the last may be smaller), gathering the pieces
    /// from the last one back, as a backward pass completes them.
    fn new(pieces: &PieceLayout, per_bucket: usize, rank: usize, size: usize) -> Result<Self> {
        let n = pieces.offsets.len() - 1;
        let total = pieces.offsets[n];
        if c_int::try_from(total).is_err() {
            return Err(Error::Distributed(format!("{total} values are more than one MPI message can hold")));
        }
        let (mut list, mut of_piece) = (vec![], vec![0; n]);
        let (mut recv_len, mut summed_len) = (0, 0);
        let mut end = n;
        while end > 0 {
            let mut start = end - 1;
            while start > 0 && pieces.offsets[end] - pieces.offsets[start] < per_bucket {
                start -= 1;
            }
            let values = pieces.offsets[start]..pieces.offsets[end];
            let (counts, displs): (Vec<c_int>, Vec<c_int>) = (0..size)
                .map(|q| {
                    let c = chunk_of(values.len(), q, size);
                    // Both fit: total fits a c_int (checked above).
                    (c.len() as c_int, c.start as c_int)
                })
                .unzip();
            let mine = counts[rank] as usize;
            of_piece[start..end].fill(list.len());
            list.push(Bucket {
                missing: end - start,
                values,
                counts,
                displs,
                mine,
                recv_at: recv_len,
                summed_at: summed_len,
                recv_counts: vec![mine as c_int; size],
                recv_displs: (0..size).map(|r| (r * mine) as c_int).collect(),
            });
            recv_len += mine * size;
            summed_len += mine;
            end = start;
        }
        Ok(Self { list, of_piece, recv_len, summed_len, size })
    }

    /// A 52-bit hash of the cut (bucket boundaries), to check that every rank cut the same
    /// buckets ([`Collective::all_gather_u64`] carries 52 bits).
    fn fingerprint(&self) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in &self.list {
            for x in [b.values.start, b.values.end] {
                h = (h ^ x as u64).wrapping_mul(0x0100_0000_01b3);
            }
        }
        h >> 12
    }
}

/// The requests of an overlapped sum in flight, and raw pointers into the buffers they use.
///
/// Safety: MPI reads and writes the buffers through these pointers between a request's start
/// and its completion, so nothing here makes a Rust reference to a region in flight: every
/// access goes through a pointer taken once from each buffer, to the region of one bucket that
/// no request is using, and the buffers outlive the `Flight` (it borrows them). Every request is
/// completed before it is dropped ([`Flight::finish`], or `Drop`, which aborts the job when
/// unwinding from a panic rather than free memory MPI may still write).
struct Flight<'a> {
    world: &'a MpiWorld,
    buckets: &'a Buckets,
    missing: Vec<usize>,
    send: *mut f32,
    recv: *mut f32,
    summed: *mut f32,
    out: *mut f32,
    /// The next bucket to start, and the reduce-scatters and all-gathers in flight, in order.
    next: usize,
    scatters: VecDeque<(usize, ffi::MPI_Request)>,
    gathers: Vec<ffi::MPI_Request>,
    _borrow: std::marker::PhantomData<&'a mut [f32]>,
}

impl<'a> Flight<'a> {
    fn new(
        world: &'a MpiWorld,
        buckets: &'a Buckets,
        send: &'a mut [f32],
        recv: &'a mut [f32],
        summed: &'a mut [f32],
        out: &'a mut [f32],
    ) -> Self {
        Flight {
            world,
            buckets,
            missing: buckets.list.iter().map(|b| b.missing).collect(),
            send: send.as_mut_ptr(),
            recv: recv.as_mut_ptr(),
            summed: summed.as_mut_ptr(),
            out: out.as_mut_ptr(),
            next: 0,
            scatters: VecDeque::new(),
            gathers: vec![],
            _borrow: std::marker::PhantomData,
        }
    }

    /// Copies piece `k` (at `range` in the vector) in, starts every bucket now complete, and
    /// advances the requests in flight.
    fn put(&mut self, k: usize, range: Range<usize>, values: &[f32]) -> Result<()> {
        // SAFETY: piece k's bucket has not started (its piece count is not yet zero), so no
        // request uses this region; `range` lies inside the send buffer (checked by the layout).
        unsafe { std::slice::from_raw_parts_mut(self.send.add(range.start), range.len()) }
            .copy_from_slice(values);
        let b = self.buckets.of_piece[k];
        self.missing[b] -= 1;
        while self.next < self.buckets.list.len() && self.missing[self.next] == 0 {
            self.start_scatter(self.next)?;
            self.next += 1;
        }
        self.advance(false)
    }

    fn start_scatter(&mut self, b: usize) -> Result<()> {
        let bucket = &self.buckets.list[b];
        let mut request = unsafe { ffi::RSMPI_REQUEST_NULL };
        // SAFETY: the bucket's send region is complete and no longer written; its receive region
        // is used by no other request; counts and displacements live in `buckets`, which
        // outlives the request.
        let rc = unsafe {
            ffi::MPI_Ialltoallv(
                self.send.add(bucket.values.start) as *const c_void,
                bucket.counts.as_ptr(),
                bucket.displs.as_ptr(),
                f32::equivalent_datatype().as_raw(),
                self.recv.add(bucket.recv_at) as *mut c_void,
                bucket.recv_counts.as_ptr(),
                bucket.recv_displs.as_ptr(),
                f32::equivalent_datatype().as_raw(),
                self.world.scatter_comm.as_raw(),
                &mut request,
            )
        };
        check(rc, "MPI_Ialltoallv")?;
        self.scatters.push_back((b, request));
        Ok(())
    }

    /// Sums every bucket whose reduce-scatter has completed (in bucket order; waiting for the
    /// first one when `block`) and starts its all-gather.
    fn advance(&mut self, block: bool) -> Result<()> {
        while let Some(&mut (b, ref mut request)) = self.scatters.front_mut() {
            let mut done: c_int = 0;
            // SAFETY: a live request of this flight.
            let rc = unsafe {
                if block {
                    done = 1;
                    ffi::MPI_Wait(request, ffi::RSMPI_STATUS_IGNORE)
                } else {
                    ffi::MPI_Test(request, &mut done, ffi::RSMPI_STATUS_IGNORE)
                }
            };
            check(rc, "MPI_Test")?;
            if done == 0 {
                return Ok(());
            }
            self.scatters.pop_front();
            self.sum_and_gather(b)?;
        }
        Ok(())
    }

    fn sum_and_gather(&mut self, b: usize) -> Result<()> {
        let (bucket, p) = (&self.buckets.list[b], self.buckets.size);
        {
            // SAFETY: the bucket's reduce-scatter has completed, so its receive region is
            // written and used by no request; its summed region is used by none until the
            // all-gather below starts.
            let received =
                unsafe { std::slice::from_raw_parts(self.recv.add(bucket.recv_at), bucket.mine * p) };
            let summed =
                unsafe { std::slice::from_raw_parts_mut(self.summed.add(bucket.summed_at), bucket.mine) };
            let pieces: Vec<&[f32]> = received.chunks(bucket.mine.max(1)).take(p).collect();
            if bucket.mine > 0 {
                sum_in_rank_order(&pieces, summed);
            }
        }
        let mut request = unsafe { ffi::RSMPI_REQUEST_NULL };
        // SAFETY: the summed region is complete; the bucket's region of `out` is used by no
        // other request; counts and displacements outlive the request.
        let rc = unsafe {
            ffi::MPI_Iallgatherv(
                self.summed.add(bucket.summed_at) as *const c_void,
                bucket.mine as c_int,
                f32::equivalent_datatype().as_raw(),
                self.out.add(bucket.values.start) as *mut c_void,
                bucket.counts.as_ptr(),
                bucket.displs.as_ptr(),
                f32::equivalent_datatype().as_raw(),
                self.world.gather_comm.as_raw(),
                &mut request,
            )
        };
        check(rc, "MPI_Iallgatherv")?;
        self.gathers.push(request);
        Ok(())
    }

    /// Waits for every bucket to be summed and gathered into `out`.
    fn finish(&mut self) -> Result<()> {
        if self.next != self.buckets.list.len() {
            return Err(Error::Distributed("a bucket of the gradient sum never filled".into()));
        }
        self.advance(true)?;
        for request in &mut self.gathers {
            // SAFETY: a live request of this flight.
            check(unsafe { ffi::MPI_Wait(request, ffi::RSMPI_STATUS_IGNORE) }, "MPI_Wait")?;
        }
        self.gathers.clear();
        Ok(())
    }
}

impl Drop for Flight<'_> {
    fn drop(&mut self) {
        if self.scatters.is_empty() && self.gathers.is_empty() {
            return;
        }
        if std::thread::panicking() {
            // The other ranks may never complete these requests: end the job rather than
            // return memory MPI may still write.
            self.world.abort(70);
        }
        let _ = self.advance(true);
        for request in &mut self.gathers {
            // SAFETY: a live request of this flight.
            unsafe { ffi::MPI_Wait(request, ffi::RSMPI_STATUS_IGNORE) };
        }
    }
}

/// An MPI return code as a result (with MPI's default handler, errors end the job first).
fn check(rc: c_int, call: &str) -> Result<()> {
    if rc == ffi::MPI_SUCCESS as c_int {
        Ok(())
    } else {
        Err(Error::Distributed(format!("{call} failed with MPI error {rc}")))
    }
}
