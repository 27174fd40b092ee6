//! `ddpm vectors` then `ddpm compare`, through the real binary on a temp dir: a file matches
//! itself (exit 0), a copy with one perturbed or missing entry fails (exit ≠ 0) and the output
//! names the entry.

use std::path::Path;
use std::process::{Command, Output};

use ddpm::io::npz::{read_npz, write_npz, NpzArray};
use ndarray::ArrayD;

fn ddpm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ddpm")).args(args).output().expect("the ddpm binary runs")
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// Copies `from` to `to`, passing every array through `edit` (name, values) -> Option<values>;
/// `None` drops the array. `t` is written back as int64.
fn rewrite(from: &Path, to: &Path, edit: impl Fn(&str, ArrayD<f64>) -> Option<ArrayD<f64>>) {
    let entries = read_npz(from).expect("read npz");
    let kept: Vec<(String, ArrayD<f64>)> =
        entries.into_iter().filter_map(|e| edit(&e.name, e.values).map(|v| (e.name, v))).collect();
    let t_i64: Vec<ArrayD<i64>> =
        kept.iter().filter(|(n, _)| n == "t").map(|(_, v)| v.mapv(|x| x as i64)).collect();
    let arrays: Vec<(&str, NpzArray<'_>)> = kept
        .iter()
        .map(|(n, v)| match (n.as_str(), t_i64.first()) {
            ("t", Some(t)) => (n.as_str(), NpzArray::I64(t.view())),
            _ => (n.as_str(), NpzArray::F64(v.view())),
        })
        .collect();
    write_npz(to, &arrays).expect("write npz");
}

#[test]
fn vectors_compare_with_themselves_and_a_perturbed_entry_is_named() {
    let dir = tempfile::tempdir().expect("temp dir");
    let reference = dir.path().join("ref.npz");
    let r = reference.to_str().expect("utf-8 path");
    let out = ddpm(&[
        "vectors",
        "--timesteps",
        "100",
        "--convention",
        "improved-diffusion",
        "--seed",
        "7",
        "--out",
        r,
    ]);
    assert!(out.status.success(), "vectors failed: {}", text(&out));

    let same = ddpm(&["compare", r, r]);
    assert!(same.status.success(), "a file must match itself: {}", text(&same));
    assert!(text(&same).contains("all 26 arrays match"), "{}", text(&same));

    // One element of one entry moved by 1e-3 relative: far outside rtol 1e-5.
    let perturbed = dir.path().join("perturbed.npz");
    rewrite(&reference, &perturbed, |name, mut v| {
        if name == "vb_bpd_fixedsmall" {
            v[[3]] *= 1.0 + 1e-3;
        }
        Some(v)
    });
    let p = perturbed.to_str().expect("utf-8 path");
    let bad = ddpm(&["compare", r, p]);
    assert!(!bad.status.success(), "a perturbed entry must fail: {}", text(&bad));
    let report = text(&bad);
    let row = report.lines().find(|l| l.starts_with("vb_bpd_fixedsmall")).expect("the entry has a row");
    assert!(row.contains("MISMATCH (1 elements)"), "{row}");
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("vb_bpd_fixedsmall"),
        "the error names the entry: {report}"
    );
    assert_eq!(report.matches("MISMATCH").count(), 1, "only that entry differs: {report}");

    // --only skips the perturbed entry; a loose tolerance accepts it.
    assert!(ddpm(&["compare", r, p, "--only", "betas,x_t,t"]).status.success());
    assert!(ddpm(&["compare", r, p, "--rtol", "1e-2"]).status.success());

    // A missing entry fails and is named.
    let missing = dir.path().join("missing.npz");
    rewrite(&reference, &missing, |name, v| (name != "prior_bpd").then_some(v));
    let m = ddpm(&["compare", r, missing.to_str().expect("utf-8 path")]);
    assert!(!m.status.success());
    assert!(text(&m).contains("MISSING in candidate") && text(&m).contains("prior_bpd"), "{}", text(&m));
}

#[test]
fn compare_reports_an_unreadable_file_by_name_and_vectors_refuses_bad_settings() {
    let dir = tempfile::tempdir().expect("temp dir");
    let nowhere = dir.path().join("nowhere.npz");
    let out = ddpm(&["compare", nowhere.to_str().expect("utf-8"), nowhere.to_str().expect("utf-8")]);
    assert!(!out.status.success());
    assert!(text(&out).contains("nowhere.npz"), "{}", text(&out));

    let target = dir.path().join("v.npz");
    let t = target.to_str().expect("utf-8");
    let zero = ddpm(&["vectors", "--timesteps", "0", "--out", t]);
    assert!(!zero.status.success() && text(&zero).contains("T = 0"), "{}", text(&zero));
    let unknown = ddpm(&["vectors", "--convention", "nope", "--out", t]);
    assert!(!unknown.status.success() && text(&unknown).contains("ho2020"), "{}", text(&unknown));
}
