//! The gradient exchange alone, for benches/mpi.sh: `mpirun -n P target/release/examples/mpi_sum
//! LEN ROUNDS` sums LEN f32 values across the P ranks in rank order ROUNDS times, handed over
//! in 64 pieces as a training step hands over its gradients, and prints, on rank 0, the median
//! seconds of one sum (the ranks meet at a barrier before each, so waiting for a slower rank is
//! not counted). `DDPM_MPI_BUCKET_MB` applies.
use ddpm::distributed::mpi::MpiWorld;
use ddpm::distributed::Collective;
use mpi::traits::*;

fn main() -> ddpm::Result<()> {
    let args: Vec<usize> = std::env::args().skip(1).map(|a| a.parse().expect("LEN ROUNDS")).collect();
    let (len, rounds) = (args[0], args[1]);
    let world = MpiWorld::init()?;
    let values: Vec<f32> = (0..len).map(|i| (i % 1000) as f32 * 1e-3).collect();
    let lens: Vec<usize> = (0..64).map(|k| ddpm::distributed::chunk_of(len, k, 64).len()).collect();
    let mut out = vec![0.0f32; len];
    let mut times = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        world.world().barrier();
        let t0 = std::time::Instant::now();
        world.sum_pieces_in_rank_order(
            &lens,
            &mut |put| {
                for k in (0..64).rev() {
                    let r = ddpm::distributed::chunk_of(len, k, 64);
                    put(k, &values[r]);
                }
            },
            &mut out,
        )?;
        times.push(t0.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    if world.rank() == 0 {
        println!("{len} values, {} ranks: median {:.4} s of {rounds}", world.size(), times[rounds / 2]);
    }
    Ok(())
}
