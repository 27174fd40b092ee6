//! `metrics.csv` of a run directory: one row per applied step, appended as the run goes, and cut
//! back to a checkpoint's step when the run resumes (a run killed after its last checkpoint
//! wrote rows that the resumed run writes again, identically).
//!
//! Columns: `step,loss,grad_norm,lr,images_per_sec,elapsed_s,skipped_steps,comm_s`, where
//! `skipped_steps` counts the steps skipped so far for a non-finite loss or gradient (their rows
//! are not written: a NaN has no place on a loss curve) and `comm_s` is the step's time spent
//! exchanging losses and gradients with the other ranks of a distributed run (docs/distributed.md;
//! 0 in one process); then the sample score of
//! `--score-every` ([`crate::score`]), `fd,kid,precision,recall,class_entropy,frac_conf90`,
//! filled on the steps that were scored and empty on the others.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};

use super::StepStats;
use crate::{Error, Result};

/// The header line.
pub const HEADER: &str =
    "step,loss,grad_norm,lr,images_per_sec,elapsed_s,skipped_steps,comm_s,fd,kid,precision,recall,class_entropy,frac_conf90";

/// The score columns of a scored step's row.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ScoreColumns {
    /// Fréchet distance in the scorer's feature space.
    pub fd: f64,
    /// Kernel inception distance (unbiased MMD², cubic kernel).
    pub kid: f64,
    /// Precision (Kynkäänniemi et al. 2019).
    pub precision: f64,
    /// Recall.
    pub recall: f64,
    /// Entropy of the class histogram (nats).
    pub class_entropy: f64,
    /// Fraction classified with confidence ≥ 0.9.
    pub frac_conf90: f64,
}

impl ScoreColumns {
    fn parse(fields: &[&str]) -> Option<Self> {
        let v: Vec<f64> = fields.iter().map(|f| f.parse::<f64>().ok()).collect::<Option<_>>()?;
        let [fd, kid, precision, recall, class_entropy, frac_conf90] = v.try_into().ok()?;
        Some(Self { fd, kid, precision, recall, class_entropy, frac_conf90 })
    }
}

/// What [`rows_up_to`] keeps: the rows' text, (step, loss) and (step, score) of scored rows.
type Kept = (Vec<String>, Vec<(u64, f64)>, Vec<(u64, ScoreColumns)>);

/// The rows of the metrics file at `path` for steps up to `step`, with strictly increasing steps
/// and a finite loss, and their (step, loss). Read line by line, any line longer than a row
/// can be skipped, so a huge or corrupt file costs no more memory than the rows kept; a file
/// that cannot be read gives no rows. Rows written before the score columns existed are kept
/// as they are.
fn rows_up_to(path: &Path, step: u64) -> Kept {
    use std::io::{BufRead, BufReader, Read};
    const MAX_LINE: u64 = 1024;
    let (mut kept, mut history, mut scores) = (vec![], vec![], vec![]);
    // Only a regular file: opening a FIFO would block.
    let Ok(file) = std::fs::metadata(path).and_then(|m| {
        if m.is_file() {
            File::open(path)
        } else {
            Err(std::io::Error::other("not a regular file"))
        }
    }) else {
        return (kept, history, scores);
    };
    let mut reader = BufReader::new(file);
    let mut line = Vec::new();
    let mut last = 0;
    loop {
        line.clear();
        match (&mut reader).take(MAX_LINE).read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        if !line.ends_with(b"\n") && line.len() as u64 == MAX_LINE {
            // Longer than any row: skip the rest of it.
            if reader.skip_until(b'\n').is_err() {
                break;
            }
            continue;
        }
        let Ok(text) = std::str::from_utf8(&line) else { continue };
        let text = text.trim_end();
        let mut f = text.split(',');
        let (Some(s), Some(l)) = (f.next(), f.next()) else { continue };
        let (Ok(s), Ok(l)) = (s.parse::<u64>(), l.parse::<f64>()) else { continue };
        if s > last && s <= step && l.is_finite() {
            last = s;
            let fields: Vec<&str> = text.split(',').collect();
            if let Some(score) = fields.get(8..14).and_then(ScoreColumns::parse) {
                scores.push((s, score));
            }
            kept.push(text.to_string());
            history.push((s, l));
        }
    }
    (kept, history, scores)
}

/// An open metrics.csv and the (step, loss) history it holds.
#[derive(Debug)]
pub struct Metrics {
    file: File,
    path: PathBuf,
    history: Vec<(u64, f64)>,
    scores: Vec<(u64, ScoreColumns)>,
}

impl Metrics {
    /// Opens `path` for a run at `step`: rows after `step` (and unparsable ones) are dropped, the
    /// file rewritten atomically with the rows kept, and opened for appending. `step = 0` starts
    /// an empty file.
    ///
    /// # Errors
    /// [`Error::Io`] if the file cannot be written or opened.
    pub fn open_at(path: &Path, step: u64) -> Result<Self> {
        let (mut kept, history, scores) =
            if step > 0 { rows_up_to(path, step) } else { (vec![], vec![], vec![]) };
        kept.insert(0, HEADER.to_string());
        let mut text = kept.join("\n");
        text.push('\n');
        crate::files::write_atomic(path, text.as_bytes())?;
        let file = OpenOptions::new().append(true).open(path).map_err(|e| Error::io(path, e))?;
        Ok(Metrics { file, path: path.to_path_buf(), history, scores })
    }

    /// Appends the row of an applied step, with its score if it was scored.
    ///
    /// # Errors
    /// [`Error::Io`] if the write fails.
    pub fn record(
        &mut self,
        stats: &StepStats,
        images_per_sec: f64,
        elapsed_s: f64,
        skipped: u64,
        score: Option<&ScoreColumns>,
    ) -> Result<()> {
        let score_text = match score {
            None => ",,,,,".to_string(),
            Some(c) => format!(
                "{:.6},{:.6e},{:.6},{:.6},{:.6},{:.6}",
                c.fd, c.kid, c.precision, c.recall, c.class_entropy, c.frac_conf90
            ),
        };
        writeln!(
            self.file,
            "{},{:.6},{:.6},{:.6e},{:.2},{:.1},{},{:.6},{score_text}",
            stats.step,
            stats.loss,
            stats.grad_norm,
            stats.lr,
            images_per_sec,
            elapsed_s,
            skipped,
            stats.comm_s
        )
        .map_err(|e| Error::io(&self.path, e))?;
        self.history.push((stats.step, stats.loss));
        if let Some(c) = score {
            self.scores.push((stats.step, *c));
        }
        Ok(())
    }

    /// (step, score) of every scored row, oldest first.
    pub fn scores(&self) -> &[(u64, ScoreColumns)] {
        &self.scores
    }

    /// (step, loss) of every row, oldest first.
    pub fn history(&self) -> &[(u64, f64)] {
        &self.history
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(step: u64, loss: f64) -> StepStats {
        StepStats { step, loss, grad_norm: 1.0, lr: 1e-3, applied: true, comm_s: 0.0 }
    }

    #[test]
    fn reopening_at_a_step_keeps_only_the_rows_up_to_it() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("metrics.csv");
        let mut m = Metrics::open_at(&path, 0).expect("new");
        for s in 1..=5 {
            let score = ScoreColumns {
                fd: s as f64,
                kid: 1e-3,
                precision: 0.5,
                recall: 0.25,
                class_entropy: 2.0,
                frac_conf90: 0.75,
            };
            m.record(&stats(s, s as f64), 10.0, 0.5, 0, (s % 2 == 0).then_some(&score)).expect("row");
        }
        drop(m);
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .and_then(|mut f| {
                f.write_all(b"garbage,line\n6,nan\n2,9.0\n")?;
                f.write_all(&[b'7'; 5000])?;
                f.write_all(b",1.0\n")
            })
            .expect("append junk");
        let m = Metrics::open_at(&path, 3).expect("reopen");
        assert_eq!(m.history(), &[(1, 1.0), (2, 2.0), (3, 3.0)]);
        // The score of step 2 survives the cut; step 4's is gone with its row.
        assert_eq!(m.scores().len(), 1);
        assert_eq!((m.scores()[0].0, m.scores()[0].1.fd, m.scores()[0].1.frac_conf90), (2, 2.0, 0.75));
        let text = std::fs::read_to_string(&path).expect("read");
        assert_eq!(text.lines().count(), 4, "{text}");
        assert!(text.starts_with(HEADER));
    }

    #[test]
    fn a_fresh_run_starts_an_empty_file_whatever_was_there() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("metrics.csv");
        std::fs::write(&path, "old\n1,2\n").expect("write");
        let m = Metrics::open_at(&path, 0).expect("new");
        assert!(m.history().is_empty());
        assert_eq!(std::fs::read_to_string(&path).expect("read"), format!("{HEADER}\n"));
    }
}
