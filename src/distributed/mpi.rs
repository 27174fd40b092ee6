//! [`MpiWorld`]: the ranks of an MPI job (`mpirun -n P`, `srun`) as a [`Collective`], through the
//! `mpi` crate (rsmpi) over the system's MPI library.
//!
//! The gradient sum is a reduce-scatter followed by an all-gather, both as plain data movement
//! (`MPI_Alltoallv`, `MPI_Allgatherv`): rank q receives chunk q of every rank's vector, adds the P
//! pieces in rank order ([`sum_in_rank_order`]) and the summed chunks are gathered back. No float
//! is added by MPI itself, so the result does not depend on the library or its algorithms.
//! MPI's default error handler (errors are fatal) stays in place: a failed call, or a rank that
//! dies, ends the whole job.

use mpi::datatype::{Partition, PartitionMut};
use mpi::environment::Universe;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use mpi::Count;

use super::{chunk_of, sum_in_rank_order, Collective};
use crate::{Error, Result};

/// The world communicator of an initialised MPI environment (finalised when dropped).
pub struct MpiWorld {
    world: SimpleCommunicator,
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
    pub fn init() -> Result<Self> {
        let universe = mpi::initialize()
            .ok_or_else(|| Error::Distributed("MPI was already initialised in this process".into()))?;
        let world = universe.world();
        Ok(Self { world, _universe: universe })
    }

    /// The communicator, for collectives this type does not wrap.
    pub fn world(&self) -> &SimpleCommunicator {
        &self.world
    }

    /// Ends every rank of the job at once with `code` (`MPI_Abort`).
    pub fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }

    /// Every rank's length, checked equal to this one's and small enough for MPI's counts.
    fn same_length(&self, len: usize) -> Result<Vec<usize>> {
        let lens = self.gather_lengths(len)?;
        if lens.iter().any(|&l| l != len) {
            return Err(Error::Distributed(format!(
                "the ranks summed vectors of different lengths: {lens:?}"
            )));
        }
        Ok(lens)
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

/// MPI counts and displacements of the chunks [`chunk_of`] cuts a vector of `len` into.
fn chunk_layout(len: usize, size: usize) -> (Vec<Count>, Vec<Count>) {
    (0..size)
        .map(|q| {
            let c = chunk_of(len, q, size);
            // Both fit: len fits a Count (checked by the callers).
            (c.len() as Count, c.start as Count)
        })
        .unzip()
}

impl Collective for MpiWorld {
    fn rank(&self) -> usize {
        self.world.rank() as usize
    }

    fn size(&self) -> usize {
        self.world.size() as usize
    }

    fn sum_in_rank_order(&self, values: &mut [f32]) -> Result<()> {
        let (p, rank, len) = (self.size(), self.rank(), values.len());
        self.same_length(len)?;
        let (counts, displs) = chunk_layout(len, p);
        let mine = chunk_of(len, rank, p).len();
        // Reduce-scatter as data movement: rank q receives chunk q of every rank, by rank.
        let mut received = vec![0.0f32; mine * p];
        {
            let send = Partition::new(&*values, &counts[..], &displs[..]);
            let recv_counts = vec![mine as Count; p];
            let recv_displs: Vec<Count> = (0..p).map(|r| (r * mine) as Count).collect();
            let mut recv = PartitionMut::new(&mut received[..], recv_counts, recv_displs);
            self.world.all_to_all_varcount_into(&send, &mut recv);
        }
        let pieces: Vec<&[f32]> = (0..p).map(|r| &received[r * mine..(r + 1) * mine]).collect();
        let mut summed = vec![0.0f32; mine];
        sum_in_rank_order(&pieces, &mut summed);
        let mut all = PartitionMut::new(values, &counts[..], &displs[..]);
        self.world.all_gather_varcount_into(&summed[..], &mut all);
        Ok(())
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
