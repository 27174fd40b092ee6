//! Nothing lost, nothing crashes (docs/reliability.md): the `ddpm` binary end to end against a
//! diverging run, a second run into the same directory, SIGTERM / SIGHUP, SIGKILL at random
//! moments, a resume on other data, and crafted files and flags. Every child runs with its
//! address space capped (RLIMIT_AS), so an allocation sized by a hostile header shows up as an
//! abort instead of passing unnoticed.
//!
//! `DDPM_TEST_BIN=path/to/ddpm cargo test --test reliability` runs the same tests against another
//! build of the binary (docs/reliability.md records what an older build does).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{stderr, write_squares_idx};
use ddpm::io::checkpoint;

/// The address-space cap of every child (generous for an 8x8 model; a 4 TiB allocation fails).
const ADDRESS_SPACE: u64 = 4 << 30;

fn command(args: &[&str]) -> Command {
    let bin = std::env::var_os("DDPM_TEST_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_ddpm").into());
    let mut cmd = Command::new(bin);
    cmd.args(args);
    // SAFETY: setrlimit is async-signal-safe and touches only the child.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            let lim = libc::rlimit { rlim_cur: ADDRESS_SPACE, rlim_max: ADDRESS_SPACE };
            if libc::setrlimit(libc::RLIMIT_AS, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

fn ddpm(args: &[&str]) -> Output {
    command(args).output().expect("the binary runs")
}

fn spawn(args: &[&str]) -> Child {
    command(args).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("the binary starts")
}

/// A small, fast training run: the tiny preset at a quarter width on 8x8 squares.
fn train_args(data: &Path, out: &Path, steps: u64, every: u64) -> Vec<String> {
    let mut v: Vec<String> = [
        "train",
        "--preset",
        "tiny",
        "--ch",
        "8",
        "--gn-groups",
        "4",
        "--batch",
        "8",
        "--timesteps",
        "50",
        "--warmup",
        "5",
        "--lr",
        "1e-3",
        "--threads",
        "1",
        "--sample-count",
        "0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for (flag, value) in [
        ("--data", data.display().to_string()),
        ("--out", out.display().to_string()),
        ("--steps", steps.to_string()),
        ("--checkpoint-every", every.to_string()),
    ] {
        v.push(flag.into());
        v.push(value);
    }
    v
}

/// Sets `flag`'s value in `args` (which must hold it).
fn set(mut args: Vec<String>, flag: &str, value: &str) -> Vec<String> {
    let i = args.iter().position(|a| a == flag).expect("the flag is there") + 1;
    args[i] = value.into();
    args
}

fn refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn with(mut v: Vec<String>, extra: &[&str]) -> Vec<String> {
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn ckpt(dir: &Path) -> PathBuf {
    dir.join("checkpoint.safetensors")
}

fn assert_clean_failure(o: &Output, what: &str) {
    let e = stderr(o);
    assert!(!o.status.success(), "{what}: succeeded; stderr {e}");
    assert!(o.status.code().is_some(), "{what}: killed by a signal ({:?}); stderr {e}", o.status);
    assert!(!e.contains("panicked") && !e.contains("memory allocation"), "{what}: {e}");
}

fn metrics_rows(dir: &Path) -> usize {
    std::fs::read_to_string(dir.join("metrics.csv")).map_or(0, |t| t.lines().count().saturating_sub(1))
}

fn wait_for(mut ready: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !ready() {
        assert!(t0.elapsed() < Duration::from_secs(120), "timed out waiting");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: kill has no memory effects; the pid is our own child, not yet reaped.
    assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
}

#[test]
fn a_nan_learning_rate_is_refused_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_squares_idx(dir.path(), 32);
    let out = dir.path().join("run");
    for bad in ["nan", "inf", "-1", "0"] {
        let mut args = train_args(&data, &out, 5, 1);
        let lr = args.iter().position(|a| a == "--lr").unwrap();
        args.remove(lr + 1);
        args[lr] = format!("--lr={bad}");
        let o = ddpm(&refs(&args));
        assert_clean_failure(&o, bad);
        assert!(stderr(&o).contains("--lr"), "{bad}: {}", stderr(&o));
        assert!(!ckpt(&out).exists(), "{bad}: a checkpoint was written");
    }
}

#[test]
fn an_exploding_loss_stops_the_run_and_keeps_the_last_good_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_squares_idx(dir.path(), 32);
    for sampling in ["uniform", "importance"] {
        let out = dir.path().join(sampling);
        // lr 1000 without clipping: finite for a few steps of the warm-up, then the loss overflows.
        let mut args = train_args(&data, &out, 200, 2);
        let lr = args.iter().position(|a| a == "--lr").unwrap() + 1;
        args[lr] = "1000".into();
        let args = with(args, &["--grad-clip", "0", "--timestep-sampling", sampling, "--loss", "simple"]);
        let o = ddpm(&refs(&args));
        let e = stderr(&o);
        assert_eq!(o.status.code(), Some(3), "{sampling}: {e}");
        assert!(e.contains("diverged") && e.contains("non-finite") && !e.contains("panicked"), "{e}");
        let state = checkpoint::load(&ckpt(&out)).expect("the last good checkpoint loads");
        assert!(state.step >= 2 && state.step < 200, "{sampling}: step {}", state.step);
        assert!(state.first_non_finite().is_none());
        assert!(e.contains(&format!("step {}", state.step)), "the message names the checkpoint: {e}");
        let samples = dir.path().join(format!("{sampling}-samples"));
        let s = ddpm(&[
            "sample",
            "--checkpoint",
            out.to_str().unwrap(),
            "--num",
            "2",
            "--steps",
            "5",
            "--out",
            samples.to_str().unwrap(),
            "--threads",
            "1",
        ]);
        assert!(s.status.success(), "sampling the kept checkpoint: {}", stderr(&s));
        assert!(samples.join("grid.png").is_file());
    }
}

#[test]
fn a_second_run_into_the_same_directory_is_refused_and_the_first_is_unharmed() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_squares_idx(dir.path(), 32);
    let (solo, shared) = (dir.path().join("solo"), dir.path().join("shared"));
    let steps = 40;
    assert!(ddpm(&refs(&train_args(&data, &solo, steps, 1))).status.success());
    let mut first = spawn(&refs(&train_args(&data, &shared, steps, 1)));
    wait_for(|| ckpt(&shared).exists());
    // The second run resumes into the directory the first is still writing (the mistake of
    // restarting a job whose first instance is still alive), then tries a fresh start.
    for extra in [&["--resume"][..], &[][..]] {
        let second = ddpm(&refs(&with(train_args(&data, &shared, steps + 10, 1), extra)));
        let e = stderr(&second);
        assert_eq!(second.status.code(), Some(4), "{extra:?}: {e}");
        assert!(e.contains("in use by ddpm train") && e.contains(&format!("pid {}", first.id())), "{e}");
        assert_eq!(e.trim().lines().count(), 1, "{e}");
    }
    assert!(first.wait().unwrap().success());
    let a = std::fs::read(ckpt(&solo)).unwrap();
    let b = std::fs::read(ckpt(&shared)).unwrap();
    assert!(a == b, "the first run's checkpoint differs from an undisturbed run's");
    let leftovers: Vec<_> = std::fs::read_dir(&shared)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn sigterm_and_sighup_save_at_the_step_reached_and_the_resume_is_exact() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_squares_idx(dir.path(), 32);
    // GNU `timeout` sends its SIGTERM twice at once (to the process, then to its group): still
    // one request.
    for (sig, code, twice) in [
        (libc::SIGTERM, 143, false),
        (libc::SIGHUP, 129, false),
        (libc::SIGINT, 130, false),
        (libc::SIGTERM, 143, true),
    ] {
        let out = dir.path().join(format!("sig{sig}{twice}"));
        // No periodic checkpoint: only the signal makes one.
        let child = spawn(&refs(&train_args(&data, &out, 100_000, 100_000)));
        wait_for(|| metrics_rows(&out) >= 5);
        signal(&child, sig);
        if twice {
            // Soon enough to be the same request, late enough not to merge with the first
            // while it is pending.
            std::thread::sleep(Duration::from_millis(15));
            signal(&child, sig);
        }
        let o = child.wait_with_output().unwrap();
        let e = stderr(&o);
        assert_eq!(o.status.code(), Some(code), "signal {sig}: {e}");
        assert!(e.contains("--resume"), "the resume hint: {e}");
        let reached = checkpoint::load(&ckpt(&out)).expect("a checkpoint at the step reached").step;
        assert!(reached >= 5, "{reached}");
        let target = reached + 4;
        let r = ddpm(&refs(&with(train_args(&data, &out, target, 100_000), &["--resume"])));
        assert!(r.status.success(), "{}", stderr(&r));
        let fresh = dir.path().join(format!("fresh{sig}{twice}"));
        assert!(ddpm(&refs(&train_args(&data, &fresh, target, 100_000))).status.success());
        assert!(
            std::fs::read(ckpt(&out)).unwrap() == std::fs::read(ckpt(&fresh)).unwrap(),
            "signal {sig}: the resumed run differs from an uninterrupted one"
        );
    }
}

#[test]
fn killed_at_twenty_random_moments_the_run_always_resumes_bit_identically() {
    use rand::{Rng, SeedableRng};
    let dir = tempfile::tempdir().unwrap();
    let data = write_squares_idx(dir.path(), 32);
    let steps = 24;
    let reference = dir.path().join("reference");
    // Time the reference run: when its first checkpoint appears, and when it ends.
    let t0 = Instant::now();
    let mut child = spawn(&refs(&train_args(&data, &reference, steps, 3)));
    wait_for(|| ckpt(&reference).exists());
    let first = t0.elapsed().as_millis() as u64;
    assert!(child.wait().unwrap().success());
    let span = (t0.elapsed().as_millis() as u64).saturating_sub(first).max(1);
    let want = std::fs::read(ckpt(&reference)).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(20);
    let mut resumed = 0;
    for k in 0..20 {
        let out = dir.path().join(format!("k{k}"));
        let mut child = spawn(&refs(&train_args(&data, &out, steps, 3)));
        // A moment between the first checkpoint and the end: during a step, a save, a rename,
        // the metrics or the final loss plot.
        wait_for(|| ckpt(&out).exists());
        std::thread::sleep(Duration::from_millis(rng.random_range(0..span)));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let state = checkpoint::load(&ckpt(&out))
            .unwrap_or_else(|e| panic!("kill {k}: the checkpoint left behind does not load: {e}"));
        assert!(state.step <= steps);
        if state.step < steps {
            resumed += 1;
        }
        let o = ddpm(&refs(&with(train_args(&data, &out, steps, 3), &["--resume"])));
        assert!(o.status.success(), "kill {k}: {}", stderr(&o));
        assert!(std::fs::read(ckpt(&out)).unwrap() == want, "kill {k}: the result differs");
    }
    assert!(resumed >= 5, "only {resumed} of 20 kills came before the end of the run");
}

#[test]
fn a_resume_reloads_the_recorded_data_and_refuses_other_data() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_squares_idx(dir.path(), 32);
    let out = dir.path().join("run");
    assert!(ddpm(&refs(&train_args(&data, &out, 4, 2))).status.success());
    // Without --data: the recorded file, not the embedded MNIST.
    let base = |steps: u64| -> Vec<String> {
        with(
            vec![],
            &[
                "train",
                "--out",
                out.to_str().unwrap(),
                "--steps",
                &steps.to_string(),
                "--threads",
                "1",
                "--resume",
            ],
        )
    };
    let o = ddpm(&refs(&base(6)));
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("squares-idx3-ubyte"), "{}", stderr(&o));
    // Other images of the same shape (given explicitly, or at the recorded path).
    let other_dir = dir.path().join("other");
    std::fs::create_dir(&other_dir).unwrap();
    let other = write_squares_idx(&other_dir, 40);
    let o = ddpm(&refs(&with(base(8), &["--data", other.to_str().unwrap()])));
    assert_clean_failure(&o, "other data");
    assert!(stderr(&o).contains("--allow-different-data"), "{}", stderr(&o));
    let o = ddpm(&refs(&with(base(8), &["--data", other.to_str().unwrap(), "--allow-different-data"])));
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("note: training on"), "{}", stderr(&o));
    // The checkpoint now records the new data; changing that file in place is caught.
    std::fs::copy(&data, &other).unwrap();
    let o = ddpm(&refs(&base(10)));
    assert_clean_failure(&o, "changed in place");
    assert!(stderr(&o).contains("differs from the data this run was trained on"), "{}", stderr(&o));
    // And recipe flags cannot change on resume (repeating them unchanged is fine).
    let d = data.to_str().unwrap();
    let o =
        ddpm(&refs(&with(base(10), &["--data", d, "--allow-different-data", "--lr", "0.1", "--batch", "8"])));
    assert_clean_failure(&o, "--lr on resume");
    assert!(
        stderr(&o).contains("--lr (0.1, the checkpoint has 0.001) cannot change when resuming"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn a_file_schedule_is_stored_in_the_checkpoint_and_never_read_again() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_squares_idx(dir.path(), 32);
    let betas = dir.path().join("betas.txt");
    let values: Vec<String> = (0..50).map(|i| format!("{}", 1e-3 + i as f64 * 1e-3)).collect();
    std::fs::write(&betas, values.join("\n")).unwrap();
    let out = dir.path().join("run");
    let schedule = format!("file:{}", betas.display());
    let o = ddpm(&refs(&with(train_args(&data, &out, 4, 2), &["--schedule", &schedule])));
    assert!(o.status.success(), "{}", stderr(&o));
    std::fs::remove_file(&betas).unwrap();
    let state = checkpoint::load(&ckpt(&out)).unwrap();
    match &state.config.diffusion.schedule {
        ddpm::diffusion::BetaSchedule::Custom(b) => assert_eq!(b.len(), 50),
        other => panic!("stored as {other:?}"),
    }
    assert!(state.schedule_source.as_deref().is_some_and(|s| s.contains("betas.txt") && s.contains("xxh3")));
    let o = ddpm(&["train", "--out", out.to_str().unwrap(), "--steps", "6", "--threads", "1", "--resume"]);
    assert!(o.status.success(), "resume without the schedule file: {}", stderr(&o));
}

#[test]
fn a_corrupt_checkpoint_is_refused_naming_the_previous_one() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_squares_idx(dir.path(), 32);
    let out = dir.path().join("run");
    assert!(ddpm(&refs(&train_args(&data, &out, 6, 2))).status.success());
    let prev = out.join("checkpoint.prev.safetensors");
    assert_eq!(checkpoint::load(&prev).unwrap().step, 4, "the save before the last is kept");
    let bytes = std::fs::read(ckpt(&out)).unwrap();
    std::fs::write(ckpt(&out), &bytes[..bytes.len() / 2]).unwrap();
    let o = ddpm(&refs(&with(train_args(&data, &out, 8, 2), &["--resume"])));
    assert_clean_failure(&o, "corrupt checkpoint");
    let e = stderr(&o);
    assert!(e.contains("checkpoint.prev.safetensors") && e.contains("rename"), "{e}");
    // With the checkpoint gone, the previous one is named, and a fresh run does not overwrite it.
    std::fs::remove_file(ckpt(&out)).unwrap();
    let o = ddpm(&refs(&with(train_args(&data, &out, 8, 2), &["--resume"])));
    assert_clean_failure(&o, "only the previous checkpoint");
    assert!(
        stderr(&o).contains("rename") && stderr(&o).contains("checkpoint.prev.safetensors"),
        "{}",
        stderr(&o)
    );
    let o = ddpm(&refs(&train_args(&data, &out, 8, 2)));
    assert_clean_failure(&o, "a fresh run over a previous checkpoint");
    assert_eq!(checkpoint::load(&prev).unwrap().step, 4, "the previous checkpoint is untouched");
    std::fs::rename(&prev, ckpt(&out)).unwrap();
    let o = ddpm(&refs(&with(train_args(&data, &out, 8, 2), &["--resume"])));
    assert!(o.status.success(), "after rolling back by hand: {}", stderr(&o));
}

#[test]
fn the_same_command_plus_resume_works_for_any_float_and_from_any_folder() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_squares_idx(dir.path(), 32);
    let out = dir.path().join("run");
    // A learning rate whose shortest decimal form reads back only with exact float parsing.
    let args = |steps: u64| {
        let mut a = train_args(Path::new("squares-idx3-ubyte"), Path::new("run"), steps, 2);
        let lr = a.iter().position(|x| x == "--lr").unwrap() + 1;
        a[lr] = "0.00019999999999999998".into();
        a
    };
    let o = command(&refs(&args(2))).current_dir(dir.path()).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let o = command(&refs(&with(args(4), &["--resume"]))).current_dir(dir.path()).output().unwrap();
    assert!(o.status.success(), "the same command plus --resume: {}", stderr(&o));
    // The recorded data path is absolute: a resume from elsewhere finds it.
    let elsewhere = dir.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    let o = command(&["train", "--out", out.to_str().unwrap(), "--steps", "6", "--threads", "1", "--resume"])
        .current_dir(&elsewhere)
        .output()
        .unwrap();
    assert!(o.status.success(), "resume from another folder: {}", stderr(&o));
    let recorded = checkpoint::load(&ckpt(&out)).unwrap().data.unwrap().spec.path.unwrap();
    assert!(recorded.is_absolute() && recorded == data.canonicalize().unwrap(), "{recorded:?}");
    // A path that is not UTF-8 cannot be recorded: refused before any training.
    use std::os::unix::ffi::OsStrExt;
    let odd = dir.path().join(std::ffi::OsStr::from_bytes(b"bad\xff-idx3-ubyte"));
    std::fs::copy(&data, &odd).unwrap();
    let t0 = Instant::now();
    let odd_out = dir.path().join("odd");
    let o = command(&[
        "train",
        "--preset",
        "tiny",
        "--ch",
        "8",
        "--gn-groups",
        "4",
        "--batch",
        "8",
        "--timesteps",
        "50",
    ])
    .args([
        "--steps",
        "100000",
        "--checkpoint-every",
        "50000",
        "--threads",
        "1",
        "--out",
        odd_out.to_str().unwrap(),
    ])
    .arg("--data")
    .arg(&odd)
    .output()
    .unwrap();
    assert_clean_failure(&o, "non-UTF-8 path");
    assert!(stderr(&o).contains("UTF-8") && t0.elapsed() < Duration::from_secs(20), "{}", stderr(&o));
}

#[test]
fn a_stop_request_interrupts_a_sample_grid() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_squares_idx(dir.path(), 32);
    let out = dir.path().join("run");
    // A grid after every 2 steps, long enough (256 images, 1000 steps) to outlast any grace period.
    let args =
        set(set(train_args(&data, &out, 100_000, 100_000), "--timesteps", "1000"), "--sample-count", "256");
    let args = with(args, &["--sample-every", "2", "--sample-steps", "1000"]);
    let child = spawn(&refs(&args));
    wait_for(|| metrics_rows(&out) >= 2);
    std::thread::sleep(Duration::from_millis(300));
    let t0 = Instant::now();
    signal(&child, libc::SIGTERM);
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(143), "{}", stderr(&o));
    assert!(t0.elapsed() < Duration::from_secs(10), "the grid was not interrupted: {:?}", t0.elapsed());
    assert!(checkpoint::load(&ckpt(&out)).unwrap().step >= 2);
}

#[test]
fn outputs_never_replace_special_files_and_a_failed_stdout_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let o = ddpm(&["vectors", "--timesteps", "10", "--out", fifo.to_str().unwrap()]);
    assert_clean_failure(&o, "vectors into a FIFO");
    assert!(stderr(&o).contains("not a regular file"), "{}", stderr(&o));
    use std::os::unix::fs::FileTypeExt;
    assert!(std::fs::metadata(&fifo).unwrap().file_type().is_fifo(), "the FIFO is still a FIFO");
    let full = std::fs::OpenOptions::new().write(true).open("/dev/full").unwrap();
    let v = dir.path().join("v.npz");
    let o = command(&["vectors", "--timesteps", "10", "--out", v.to_str().unwrap()])
        .stdout(full)
        .output()
        .unwrap();
    assert_clean_failure(&o, "stdout on /dev/full");
    assert!(stderr(&o).contains("standard output"), "{}", stderr(&o));
    let o = command(&["vectors", "--timesteps", "10", "--out", v.to_str().unwrap()])
        .env("DDPM_MAX_DATA_MIB", "16MiB")
        .output()
        .unwrap();
    assert_clean_failure(&o, "a malformed memory cap");
    assert!(stderr(&o).contains("DDPM_MAX_DATA_MIB"), "{}", stderr(&o));
}

/// Rewrites the JSON header of a safetensors file with `edit`.
fn edit_header(bytes: &[u8], edit: impl FnOnce(&mut serde_json::Value)) -> Vec<u8> {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    edit(&mut header);
    let mut json = serde_json::to_vec(&header).unwrap();
    json.resize(json.len().next_multiple_of(8), b' ');
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&json);
    out.extend_from_slice(&bytes[8 + n..]);
    out
}

/// Edits the JSON held in metadata `key`.
fn edit_meta(bytes: &[u8], key: &str, edit: impl FnOnce(&mut serde_json::Value)) -> Vec<u8> {
    edit_header(bytes, |h| {
        let text = h["__metadata__"][key].as_str().unwrap().to_string();
        let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
        edit(&mut v);
        h["__metadata__"][key] = serde_json::Value::String(v.to_string());
    })
}

fn npy_header(descr: &str, shape: &str) -> Vec<u8> {
    let dict = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    let mut header = dict.into_bytes();
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(b' ');
    }
    header.push(b'\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(&header);
    out
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

/// A PNG whose header declares `w` x `h` pixels, with no image data.
fn png_declaring(w: u32, h: u32) -> Vec<u8> {
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    let mut crc = flate2::Crc::new();
    crc.update(&ihdr);
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    out.extend_from_slice(&13u32.to_be_bytes());
    out.extend_from_slice(&ihdr);
    out.extend_from_slice(&crc.sum().to_be_bytes());
    out
}

#[test]
fn crafted_files_and_flags_get_one_clear_line_and_no_crash() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name);
    let data = write_squares_idx(dir.path(), 32);
    let run = p("run");
    assert!(ddpm(&refs(&train_args(&data, &run, 2, 2))).status.success());
    let good = std::fs::read(ckpt(&run)).unwrap();

    // Checkpoints: the sample command reads them.
    let mut checkpoints: Vec<(&str, Vec<u8>)> = vec![
        ("shape overflow", {
            // Zero elements by the format's count, an overflow for ndarray.
            let json = br#"{"x":{"dtype":"F32","shape":[0,4611686018427387904,3],"data_offsets":[0,0]}}"#;
            let mut b = (json.len() as u64).to_le_bytes().to_vec();
            b.extend_from_slice(json);
            b
        }),
        ("zero groups", edit_meta(&good, "config", |c| c["unet"]["gn_groups"] = 0.into())),
        ("huge width", edit_meta(&good, "config", |c| c["unet"]["ch"] = 100_000.into())),
        ("huge T", edit_meta(&good, "config", |c| c["diffusion"]["timesteps"] = 100_000_000_000u64.into())),
        ("NaN lr", edit_meta(&good, "config", |c| c["optim"]["lr"] = serde_json::Value::Null)),
        ("EMA decay 2", edit_meta(&good, "config", |c| c["optim"]["ema_decay"] = 2.0.into())),
        ("importance state", {
            let b = edit_meta(&good, "config", |c| c["diffusion"]["timestep_sampling"] = "importance".into());
            edit_header(&b, |h| {
                h["__metadata__"]["importance"] =
                    r#"{"history":[[1.0],[2.0]],"history_per_term":10,"uniform_prob":0.001}"#.into()
            })
        }),
        ("moment shape", {
            edit_header(&good, |h| {
                let shape = h["adam.m.conv_in.weight"]["shape"].as_array().unwrap().clone();
                let n: u64 = shape.iter().map(|d| d.as_u64().unwrap()).product();
                h["adam.m.conv_in.weight"]["shape"] = serde_json::json!([n]);
            })
        }),
    ];
    checkpoints.push(("truncated", good[..good.len() - 7].to_vec()));
    checkpoints.push((
        "step counter",
        edit_header(&good, |h| h["__metadata__"]["step"] = u64::MAX.to_string().into()),
    ));
    checkpoints.push(("RNG position", {
        edit_meta(&good, "rng", |r| r["word_pos"] = (1u128 << 68).to_string().into())
    }));
    checkpoints.push(("infinite moment", {
        let n = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
        let header: serde_json::Value = serde_json::from_slice(&good[8..8 + n]).unwrap();
        let at = 8 + n + header["adam.v.conv_in.bias"]["data_offsets"][0].as_u64().unwrap() as usize;
        let mut b = good.clone();
        b[at..at + 4].copy_from_slice(&f32::INFINITY.to_le_bytes());
        b
    }));
    for (what, bytes) in &checkpoints {
        let f = p("bad.safetensors");
        std::fs::write(&f, bytes).unwrap();
        let o = ddpm(&[
            "sample",
            "--checkpoint",
            f.to_str().unwrap(),
            "--num",
            "1",
            "--out",
            p("s").to_str().unwrap(),
        ]);
        assert_clean_failure(&o, what);
        let e = stderr(&o);
        assert!(e.contains("bad.safetensors"), "{what}: {e}");
        assert_eq!(e.trim().lines().count(), 1, "{what}: {e}");
        // The same file as a resumed run's checkpoint.
        let r = p("resume-bad");
        std::fs::create_dir_all(&r).unwrap();
        std::fs::write(ckpt(&r), bytes).unwrap();
        let o = ddpm(&[
            "train",
            "--out",
            r.to_str().unwrap(),
            "--resume",
            "--steps",
            "3",
            "--data",
            data.to_str().unwrap(),
        ]);
        assert_clean_failure(&o, what);
    }

    // Arrays: predict reads .npy, compare reads .npz.
    let huge_npy = npy_header("<f4", "(1099511627776, 1, 8, 8)");
    std::fs::write(p("huge.npy"), &huge_npy).unwrap();
    let predict = |x: &Path| {
        let (r, x, y) = (run.to_str().unwrap(), x.to_str().unwrap(), p("y.npy"));
        ddpm(&["predict", "--model", r, "--x", x, "--t", "3", "--out", y.to_str().unwrap()])
    };
    let o = predict(&p("huge.npy"));
    assert_clean_failure(&o, "huge .npy");
    assert!(stderr(&o).contains("huge.npy"), "{}", stderr(&o));
    let empty_axis = npy_header("<f4", "(0, 4611686018427387904, 4)");
    std::fs::write(p("empty.npy"), &empty_axis).unwrap();
    let o = predict(&p("empty.npy"));
    assert_clean_failure(&o, "overflowing empty .npy");
    {
        use std::io::Write;
        let mut z = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        z.start_file(
            "a.npy",
            zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored),
        )
        .unwrap();
        z.write_all(&huge_npy).unwrap();
        std::fs::write(p("huge.npz"), z.finish().unwrap().into_inner()).unwrap();
    }
    let o = ddpm(&["compare", p("huge.npz").to_str().unwrap(), p("huge.npz").to_str().unwrap()]);
    assert_clean_failure(&o, "huge .npz member");

    // Datasets: a gzip IDX whose header lies, a gzip that inflates past the cap, devices.
    let mut lying = vec![0, 0, 8, 3];
    for d in [1u32 << 20, 1 << 10, 1 << 10] {
        lying.extend_from_slice(&d.to_be_bytes());
    }
    lying.extend_from_slice(&[0; 64]);
    std::fs::write(p("lying-idx3-ubyte.gz"), gzip(&lying)).unwrap();
    std::fs::write(p("bomb_batch.bin.gz"), gzip(&vec![0u8; 3073 * 20_000])).unwrap();
    std::fs::create_dir(p("images")).unwrap();
    std::fs::write(p("images/huge.png"), png_declaring(100_000, 100_000)).unwrap();
    std::fs::write(p("images/zero.png"), b"").unwrap();
    std::fs::create_dir(p("wide")).unwrap();
    std::fs::write(p("wide/w.png"), png_declaring(16_384, 16_384)).unwrap();
    let fifo = p("fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    for (what, path, env_cap) in [
        ("lying gzip header", p("lying-idx3-ubyte.gz"), None),
        ("gzip bomb", p("bomb_batch.bin.gz"), Some("16")),
        ("image over the cap", p("wide"), Some("16")),
        ("image folder", p("images"), None),
        ("/dev/zero", PathBuf::from("/dev/zero"), None),
        ("fifo", fifo.clone(), None),
    ] {
        let mut cmd = command(&[
            "train",
            "--preset",
            "tiny",
            "--steps",
            "1",
            "--image-size",
            "8",
            "--out",
            p("d").to_str().unwrap(),
            "--data",
            path.to_str().unwrap(),
        ]);
        if let Some(mib) = env_cap {
            cmd.env("DDPM_MAX_DATA_MIB", mib);
        }
        let t0 = Instant::now();
        let o = cmd.output().unwrap();
        assert_clean_failure(&o, what);
        assert!(t0.elapsed() < Duration::from_secs(30), "{what} took {:?}", t0.elapsed());
        let e = stderr(&o);
        assert_eq!(e.trim().lines().count(), 1, "{what}: {e}");
        let named = path.file_name().unwrap().to_str().unwrap();
        assert!(e.contains(named), "{what}: {e}");
        if what == "image folder" {
            assert!(e.contains("huge.png") && e.contains("zero.png") && e.contains("2 of 2"), "{e}");
        }
    }

    // A diffusers folder whose config asks for zero groups.
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/diffusers/small");
    let df = p("diffusers");
    std::fs::create_dir(&df).unwrap();
    for f in ["config.json", "diffusion_pytorch_model.safetensors", "scheduler_config.json"] {
        std::fs::copy(fixture.join(f), df.join(f)).unwrap();
    }
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(df.join("config.json")).unwrap()).unwrap();
    config["norm_num_groups"] = 0.into();
    std::fs::write(df.join("config.json"), config.to_string()).unwrap();
    let o = ddpm(&[
        "sample",
        "--checkpoint",
        df.to_str().unwrap(),
        "--num",
        "1",
        "--out",
        p("s").to_str().unwrap(),
    ]);
    assert_clean_failure(&o, "diffusers groups 0");
    // A one-step scheduler cannot be imported (a process needs T ≥ 2).
    std::fs::copy(fixture.join("config.json"), df.join("config.json")).unwrap();
    let mut sched: serde_json::Value =
        serde_json::from_slice(&std::fs::read(df.join("scheduler_config.json")).unwrap()).unwrap();
    sched["num_train_timesteps"] = 1.into();
    std::fs::write(df.join("scheduler_config.json"), sched.to_string()).unwrap();
    let imported = p("imported");
    let o = ddpm(&["import", "--diffusers", df.to_str().unwrap(), "--out", imported.to_str().unwrap()]);
    assert_clean_failure(&o, "diffusers T = 1");
    assert!(!ckpt(&imported).exists());

    // Flags.
    let d = data.to_str().unwrap();
    let o = p("f");
    let o = o.to_str().unwrap();
    let r = run.to_str().unwrap();
    let cases: Vec<Vec<&str>> = vec![
        vec!["train", "--data", d, "--out", o, "--minutes", "nan"],
        vec!["train", "--data", d, "--out", o, "--minutes", "-1"],
        vec!["train", "--data", d, "--out", o, "--minutes", "1e300"],
        vec!["train", "--data", d, "--out", o, "--steps", "1", "--preset", "tiny", "--gn-groups", "0"],
        vec!["train", "--data", d, "--out", o, "--steps", "1", "--preset", "tiny", "--ch-mult", "1,0"],
        vec!["train", "--data", d, "--out", o, "--steps", "1", "--preset", "tiny", "--ch", "1"],
        vec![
            "train",
            "--data",
            d,
            "--out",
            o,
            "--steps",
            "1",
            "--preset",
            "tiny",
            "--num-res-blocks",
            "100000000000",
        ],
        vec![
            "train",
            "--data",
            d,
            "--out",
            o,
            "--steps",
            "1",
            "--preset",
            "tiny",
            "--timesteps",
            "100000000000",
        ],
        vec!["train", "--data", d, "--out", o, "--steps", "1", "--preset", "tiny", "--ema-decay", "2"],
        vec!["train", "--data", d, "--out", o, "--steps", "1", "--preset", "tiny", "--checkpoint-every", "0"],
        vec!["sample", "--checkpoint", r, "--out", o, "--sampler", "ddim", "--eta", "2"],
        vec!["sample", "--checkpoint", r, "--out", o, "--eta", "0.5"],
        // One step is a valid request since the samplers' grids (tests/cli_sampling.rs); these are not.
        vec!["sample", "--checkpoint", r, "--out", o, "--steps", "0"],
        vec!["sample", "--checkpoint", r, "--out", o, "--sampler", "dpm++2m", "--steps", "50"],
        vec!["sample", "--checkpoint", r, "--out", o, "--steps", "999,500"],
        vec!["sample", "--checkpoint", r, "--out", o, "--sampler", "euler", "--s-tmin", "2", "--s-tmax", "1"],
        vec!["sample", "--checkpoint", r, "--out", o, "--num", "100000000000"],
        vec!["predict", "--model", r, "--x", d, "--t", "50", "--out", o],
        vec!["bench", "--preset", "tiny", "--warmup", "18446744073709551615"],
        vec!["bench", "--preset", "tiny", "--batch", "0"],
        vec!["train", "--data", d, "--out", o, "--steps", "1", "--threads", "100000"],
        vec!["train", "--data", d, "--out", o, "--steps", "1", "--grad-clip", "nan"],
        vec!["train", "--data", d, "--out", o, "--steps", "1", "--schedule", "file:"],
        vec!["demo", "--out", o, "--minutes", "nan"],
    ];
    for args in cases {
        let out = ddpm(&args);
        assert_clean_failure(&out, &format!("{args:?}"));
        let e = stderr(&out);
        assert!(e.starts_with("error:"), "{args:?}: {e}");
    }
}
