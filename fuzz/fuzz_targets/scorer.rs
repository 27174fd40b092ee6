//! libFuzzer target: the scorer-weights parser (see ../targets.rs). With DDPM_FUZZ_SEEDS=DIR set, it
//! first writes its seeds (small valid files) into DIR, which fuzz/run.sh passes as a corpus.
#![no_main]

#[path = "../targets.rs"]
mod targets;

libfuzzer_sys::fuzz_target!(
    init: {
        if let Some(dir) = std::env::var_os("DDPM_FUZZ_SEEDS") {
            targets::write_seeds(targets::Target::Scorer, std::path::Path::new(&dir));
        }
    },
    |data: &[u8]| {
        targets::run(targets::Target::Scorer, data);
    }
);
