//! `mpirun -n P ddpm train` end to end (feature `mpi`; needs `mpirun` on the PATH, which
//! `.ci/run` installs): P = 2 and 3 against one process, repeatability, resuming a P = 2
//! checkpoint on 1 and on 3 ranks, and a rank killed mid-run. Oversubscribes the 2 cores.
#![cfg(feature = "mpi")]

use std::path::Path;
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_ddpm");

/// The tiny network on the embedded MNIST: batch 6, T = 20, one thread per rank. Two channels
/// per norm group: with one (the preset's 32 groups of 32), the biases before each norm have an
/// exactly zero gradient in exact arithmetic, Adam turns their rounding noise into steps of up
/// to lr·|g|/ε, and that noise depends on the order of the sums (docs/distributed.md measures
/// both).
const RECIPE: &[&str] = &[
    "train",
    "--preset",
    "tiny",
    "--ch",
    "8",
    "--gn-groups",
    "4",
    "--dropout",
    "0.1",
    "--batch",
    "6",
    "--timesteps",
    "20",
    "--warmup",
    "2",
    "--lr",
    "1e-3",
    "--checkpoint-every",
    "2",
    "--sample-count",
    "0",
    "--threads",
    "1",
];

fn mpirun_flags() -> Vec<&'static str> {
    let v = Command::new("mpirun").arg("--version").output().expect("mpirun is installed (see .ci/run)");
    let text = String::from_utf8_lossy(&v.stdout).to_string() + &String::from_utf8_lossy(&v.stderr);
    // Open MPI refuses more ranks than cores unless told; MPICH's Hydra allows it.
    if text.contains("Open MPI") {
        vec!["--oversubscribe"]
    } else {
        vec![]
    }
}

fn train(ranks: usize, out: &Path, steps: u64, resume: bool) -> Output {
    train_with(ranks, out, steps, resume, &[])
}

/// [`train`] with extra environment variables for every rank.
fn train_with(ranks: usize, out: &Path, steps: u64, resume: bool, env: &[(&str, &str)]) -> Output {
    let o = launch(ranks, out, steps, resume, env);
    assert!(o.status.success(), "{ranks} ranks: {}", String::from_utf8_lossy(&o.stderr));
    o
}

fn launch(ranks: usize, out: &Path, steps: u64, resume: bool, env: &[(&str, &str)]) -> Output {
    let steps = steps.to_string();
    let mut args: Vec<&str> = RECIPE.to_vec();
    args.extend(["--out", out.to_str().unwrap(), "--steps", &steps]);
    if resume {
        args.push("--resume");
    }
    let mut command = if ranks == 0 {
        Command::new(BIN)
    } else {
        let mut c = Command::new("mpirun");
        c.args(mpirun_flags()).args(["-n", &ranks.to_string(), BIN]);
        c
    };
    command.args(&args).envs(env.iter().copied()).output().expect("runs")
}

/// Every weight of the run's checkpoint, in store order.
fn weights(dir: &Path) -> Vec<f32> {
    let s = ddpm::io::checkpoint::load(&dir.join("checkpoint.safetensors")).expect("a checkpoint");
    s.params.iter().flat_map(|(_, t)| t.iter().copied().collect::<Vec<_>>()).collect()
}

fn relative(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(&p, &q)| (f64::from(p) - f64::from(q)).powi(2)).sum();
    let den: f64 = b.iter().map(|&q| f64::from(q).powi(2)).sum();
    (num / den).sqrt()
}

#[test]
fn ranks_match_one_process_repeat_exactly_and_resume_on_any_count() {
    let dir = tempfile::tempdir().unwrap();
    let at = |name: &str| dir.path().join(name);
    train(0, &at("one"), 4, false);
    let one = weights(&at("one"));
    for p in [2, 3] {
        train(p, &at(&format!("p{p}")), 4, false);
        let w = weights(&at(&format!("p{p}")));
        let rel = relative(&w, &one);
        println!("P = {p}: ‖Δw‖/‖w‖ = {rel:.3e} from one process after 4 steps");
        assert!(rel < 1e-6, "P = {p}: {rel:e}");
        // Repeated with the gradients summed in buckets of at least 2,500 values (up to 17,
        // most sent while the backward pass still runs) instead of one: the same bits.
        train_with(p, &at(&format!("p{p}-again")), 4, false, &[("DDPM_MPI_BUCKET_MB", "0.01")]);
        assert!(weights(&at(&format!("p{p}-again"))) == w, "P = {p}: a repeated run differs");
    }
    // A P = 2 checkpoint of step 2 continues on 1 and on 3 ranks as the uninterrupted runs did.
    for p in [0, 3] {
        let d = at(&format!("resume-{p}"));
        train(2, &d, 2, false);
        train(p, &d, 4, true);
        let rel = relative(&weights(&d), &one);
        println!("P = 2 then {}: ‖Δw‖/‖w‖ = {rel:.3e}", p.max(1));
        assert!(rel < 1e-6, "resumed on {p}: {rel:e}");
    }
}

/// Starts a long `mpirun -n 2` training into `out` and waits for its first checkpoint.
fn start_long_job(out: &Path) -> std::process::Child {
    let mut args: Vec<&str> = RECIPE.to_vec();
    args.extend(["--out", out.to_str().unwrap(), "--steps", "1000000"]);
    let job = Command::new("mpirun")
        .args(mpirun_flags())
        .args(["-n", "2", BIN])
        .args(&args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("mpirun starts");
    let t0 = std::time::Instant::now();
    while !out.join("checkpoint.safetensors").exists() {
        assert!(t0.elapsed().as_secs() < 120, "no checkpoint after 2 minutes");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    job
}

/// The PID of rank `rank` of the job writing into `out` (the ddpm process whose environment
/// says so).
fn rank_pid(out: &Path, rank: usize) -> u32 {
    let (mpich, ompi) = (format!("PMI_RANK={rank}\0"), format!("OMPI_COMM_WORLD_RANK={rank}\0"));
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let has = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).any(|w| w == needle);
            has(&cmd, out.to_str().unwrap().as_bytes())
                && (has(&env, mpich.as_bytes()) || has(&env, ompi.as_bytes()))
        })
        .unwrap_or_else(|| panic!("rank {rank} is running"))
}

#[test]
fn a_killed_rank_stops_the_job_and_leaves_the_checkpoint_intact() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let job = start_long_job(&out);
    Command::new("kill").args(["-9", &rank_pid(&out, 1).to_string()]).status().expect("kill");
    let o = job.wait_with_output().expect("mpirun ends");
    assert!(!o.status.success(), "the job went on without rank 1");
    // The launcher names the rank that died (Hydra on stdout, Open MPI on stderr).
    let said = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    println!("{said}");
    assert!(said.contains("signal 9") || said.contains("Killed") || said.contains("KILLED"), "{said}");
    // The last checkpoint loads.
    ddpm::io::checkpoint::load(&out.join("checkpoint.safetensors")).expect("the last checkpoint is intact");
}

#[test]
fn sigterm_to_one_rank_stops_every_rank_after_the_same_step_and_saves() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let job = start_long_job(&out);
    // Rank 1 does not write: the stop must reach rank 0 through the step's collective verdict.
    Command::new("kill").args(["-TERM", &rank_pid(&out, 1).to_string()]).status().expect("kill");
    let o = job.wait_with_output().expect("mpirun ends");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(128 + 15), "{err}");
    let said =
        err.lines().find(|l| l.starts_with("stopped by SIGTERM at step ")).unwrap_or_else(|| panic!("{err}"));
    let step: u64 = said["stopped by SIGTERM at step ".len()..].split(' ').next().unwrap().parse().unwrap();
    let saved = ddpm::io::checkpoint::load(&out.join("checkpoint.safetensors")).expect("a checkpoint");
    assert_eq!(saved.step, step, "the checkpoint is of the step the stop names");
    let metrics = std::fs::read_to_string(out.join("metrics.csv")).unwrap();
    assert!(metrics.lines().last().unwrap().starts_with(&format!("{step},")), "{metrics}");
    // It resumes, in one process, from that step.
    train(0, &out, step + 2, true);
    assert_eq!(ddpm::io::checkpoint::load(&out.join("checkpoint.safetensors")).unwrap().step, step + 2);
}

#[test]
fn distributed_eval_and_sample_equal_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    train(0, &run, 2, false);
    let r = run.to_str().unwrap();
    let launch = |ranks: usize, args: &[&str]| -> Output {
        let o = if ranks == 1 {
            Command::new(BIN).args(args).output()
        } else {
            Command::new("mpirun")
                .args(mpirun_flags())
                .args(["-n", &ranks.to_string(), BIN])
                .args(args)
                .output()
        }
        .expect("runs");
        assert!(o.status.success(), "{ranks} ranks: {}", String::from_utf8_lossy(&o.stderr));
        o
    };
    // eval: the same report, to the last digit, on 1, 2 and 3 ranks (batches of 3 over 10 images).
    let eval = ["eval", "--checkpoint", r, "--limit", "10", "--batch", "3", "--json", "--threads", "1"];
    let one = launch(1, &eval).stdout;
    for p in [2, 3] {
        assert_eq!(
            String::from_utf8_lossy(&launch(p, &eval).stdout),
            String::from_utf8_lossy(&one),
            "P = {p}"
        );
    }
    // sample: the same files, byte for byte.
    let out = |p: usize| dir.path().join(format!("s{p}"));
    for p in [1, 3] {
        let o = out(p);
        launch(
            p,
            &[
                "sample",
                "--checkpoint",
                r,
                "--num",
                "7",
                "--batch",
                "2",
                "--sampler",
                "ddim",
                "--steps",
                "5",
                "--out",
                o.to_str().unwrap(),
                "--threads",
                "1",
            ],
        );
    }
    let names = |d: &Path| {
        let mut v: Vec<_> = std::fs::read_dir(d).unwrap().map(|e| e.unwrap().file_name()).collect();
        v.sort();
        v
    };
    assert_eq!(names(&out(1)), names(&out(3)));
    assert_eq!(names(&out(1)).len(), 8, "7 images and the grid");
    for name in names(&out(1)) {
        assert_eq!(
            std::fs::read(out(1).join(&name)).unwrap(),
            std::fs::read(out(3).join(&name)).unwrap(),
            "{name:?}"
        );
    }
}

#[test]
fn a_bad_bucket_size_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let o = launch(2, &dir.path().join("run"), 1, false, &[("DDPM_MPI_BUCKET_MB", "lots")]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "a bucket size of `lots` was accepted");
    assert!(err.contains("DDPM_MPI_BUCKET_MB=lots"), "{err}");
    assert!(!dir.path().join("run").join("checkpoint.safetensors").exists());
}
