//! `ddpm compare`: check a candidate npz against a reference npz, array by array.

use std::path::PathBuf;

use anyhow::{bail, Context};
use ddpm::diffusion::vectors::{compare, read_named_arrays, Tolerance};

/// Compare the arrays of CANDIDATE.npz with those of REF.npz, for use in CI.
///
/// For each array: both shapes, the largest absolute and relative error, and OK or MISMATCH.
/// An element passes when |cand − ref| ≤ atol + rtol·|ref| (numpy's isclose); NaN matches only
/// NaN. Arrays present on one side only are reported as missing. The exit status is 0 when every
/// array passes and 1 otherwise. Integer arrays (such as t) are compared as float64.
#[derive(clap::Args, Debug)]
pub struct CompareArgs {
    /// The reference .npz (for example written by `ddpm vectors`).
    pub reference: PathBuf,

    /// The .npz to check against it.
    pub candidate: PathBuf,

    /// Relative tolerance. The default suits float64 candidates (which agree to ~1e-12); for
    /// float32 ones use about --rtol 1e-4 --atol 1e-5.
    #[arg(long, default_value_t = Tolerance::default().rtol)]
    pub rtol: f64,

    /// Absolute tolerance (matters for values near 0).
    #[arg(long, default_value_t = Tolerance::default().atol)]
    pub atol: f64,

    /// Compare only these arrays (comma-separated names, e.g. --only betas,vb_bpd_fixedlarge).
    #[arg(long, value_delimiter = ',')]
    pub only: Option<Vec<String>>,
}

/// Reads both files, prints the table, fails on any mismatch.
pub fn run(args: CompareArgs) -> anyhow::Result<()> {
    let ok = |v: f64| v.is_finite() && v >= 0.0;
    if !(ok(args.rtol) && ok(args.atol)) {
        bail!("--rtol and --atol must be finite numbers ≥ 0, got {} and {}", args.rtol, args.atol);
    }
    let reference = read_named_arrays(&args.reference)
        .with_context(|| format!("reading the reference {}", args.reference.display()))?;
    if reference.is_empty() {
        bail!("{}: the reference holds no arrays, so nothing would be compared", args.reference.display());
    }
    let candidate = read_named_arrays(&args.candidate)
        .with_context(|| format!("reading the candidate {}", args.candidate.display()))?;
    let tolerance = Tolerance { rtol: args.rtol, atol: args.atol };
    let report = compare(&reference, &candidate, tolerance, args.only.as_deref());
    out!("reference: {}", args.reference.display());
    out!("candidate: {}", args.candidate.display());
    out!("tolerance: |cand - ref| <= {:e} + {:e} * |ref|", tolerance.atol, tolerance.rtol);
    out!();
    out!("{}", report.table().trim_end_matches('\n'));
    let failed: Vec<&str> =
        report.entries.iter().filter(|e| !e.status.passed()).map(|e| e.name.as_str()).collect();
    out!();
    if failed.is_empty() {
        out!("all {} arrays match", report.entries.len());
        Ok(())
    } else {
        bail!("{} of {} arrays do not match: {}", failed.len(), report.entries.len(), failed.join(", "))
    }
}
