//! The fuzz targets of ddpm's parsers, shared by the coverage-guided harness (`fuzz/`, libFuzzer)
//! and the structured-mutation test that runs in the suite (`tests/fuzz_parsers.rs`).
//!
//! Each target feeds bytes to one parser that reads users' files, through the library's public
//! in-memory entry point, and accepts any `Ok` or `Err`: the only failure is a panic, an abort
//! (e.g. an allocation sized by a header) or a hang. Each also has seeds: small valid files of
//! its format, made here, that mutations start from.

#![allow(dead_code)] // each including crate uses its own subset

use std::path::Path;

use ndarray_npy::WriteNpyExt;

/// The most a gzip stream may inflate to under fuzzing (a bomb is refused at this size).
pub const FUZZ_CAP: u64 = 64 << 20;

/// One parser of user files.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// A dataset file: IDX or CIFAR-10 batch, gzip or not (`data::parse_file_bytes`).
    Dataset,
    /// One entry of an image folder: PNG or JPEG, decoded and prepared (`data::folder`).
    Image,
    /// A ddpm checkpoint: safetensors, metadata and every consistency check
    /// (`io::checkpoint::from_file_bytes`).
    Checkpoint,
    /// A diffusers `config.json` (`UNet2DModel`) and `scheduler_config.json` (`DDPMScheduler`).
    DiffusersConfig,
    /// A float32 `.npy` (`ddpm predict --x`).
    Npy,
    /// An `.npz` archive (`ddpm compare`).
    Npz,
    /// A β schedule file, text or float64 `.npy` (`--schedule file:PATH`).
    Betas,
    /// A PyTorch `.pt` state dict (`interop::torch_pt::parse_bytes`): the file as given, and the
    /// same bytes as the `data.pkl` of an archive holding [`PT_STORAGES`], since the checksums of
    /// a zip refuse almost every mutation of the pickle inside it.
    TorchPt,
    /// A scorer's weights (`ddpm score --scorer`, `score::Scorer::from_bytes`).
    Scorer,
}

/// Every target, in a fixed order.
pub const TARGETS: [Target; 9] = [
    Target::Dataset,
    Target::Image,
    Target::Checkpoint,
    Target::DiffusersConfig,
    Target::Npy,
    Target::Npz,
    Target::Betas,
    Target::TorchPt,
    Target::Scorer,
];

impl Target {
    /// The target's name (the libFuzzer binary's, and the corpus folder's).
    pub fn name(self) -> &'static str {
        match self {
            Target::Dataset => "dataset",
            Target::Image => "image",
            Target::Checkpoint => "checkpoint",
            Target::DiffusersConfig => "diffusers_config",
            Target::Npy => "npy",
            Target::Npz => "npz",
            Target::Betas => "betas",
            Target::TorchPt => "torch_pt",
            Target::Scorer => "scorer",
        }
    }
}

/// Feeds `data` to the target's parser. Returns whether the parser accepted it.
pub fn run(target: Target, data: &[u8]) -> bool {
    let src = Path::new("fuzz-input");
    match target {
        Target::Dataset => {
            // The name decides only between CIFAR and "unknown": try both spellings.
            let a = ddpm::data::parse_file_bytes(data, Path::new("data_batch_1.bin"), FUZZ_CAP).is_ok();
            let b = ddpm::data::parse_file_bytes(data, Path::new("images-idx3-ubyte"), FUZZ_CAP).is_ok();
            // The same bytes as the IDX label file of a class-conditional run: any count, and
            // a count that is most likely wrong.
            let label_path = Path::new("labels-idx1-ubyte");
            let c = match ddpm::data::parse_label_file_bytes(data, label_path, FUZZ_CAP, None) {
                Ok(labels) => {
                    let wrong = Some(labels.len() + 1);
                    assert!(ddpm::data::parse_label_file_bytes(data, label_path, FUZZ_CAP, wrong).is_err());
                    true
                }
                Err(_) => false,
            };
            a || b || c
        }
        Target::Image => match ddpm::data::folder::decode_image(data, src) {
            Ok(image) => {
                for channels in [1, 3] {
                    let out = ddpm::data::folder::prepare_image(&image, 8, channels);
                    assert_eq!(out.len(), channels * 64, "prepare_image's output size");
                }
                true
            }
            Err(_) => false,
        },
        Target::Checkpoint => match ddpm::io::checkpoint::from_file_bytes(data, src) {
            Ok(state) => {
                // An accepted checkpoint must be usable: the weights fit the network.
                let net = ddpm::nn::UNet::new(state.config.unet.clone()).expect("validated on load");
                assert_eq!(net.param_shapes().len(), state.params.len());
                state.config.diffusion.schedule().expect("validated on load");
                true
            }
            Err(_) => false,
        },
        Target::DiffusersConfig => {
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) else { return false };
            let unet = ddpm::interop::diffusers::unet_config_from_json(&v, src).is_ok();
            let scheduler = match ddpm::interop::diffusers::SchedulerSettings::from_json(&v, src) {
                Ok(s) => s.diffusion_config().schedule().is_ok(),
                Err(_) => false,
            };
            unet || scheduler
        }
        Target::Npy => ddpm::io::npz::parse_npy_f32(data, src).is_ok(),
        Target::Npz => ddpm::io::npz::read_npz_bytes(data, src, FUZZ_CAP).is_ok(),
        Target::Betas => {
            let text = ddpm::diffusion::schedule::parse_betas(data, false, src).is_ok();
            let npy = ddpm::diffusion::schedule::parse_betas(data, true, src).is_ok();
            text || npy
        }
        Target::TorchPt => {
            let check = |bytes: &[u8]| match ddpm::interop::torch_pt::parse_bytes(bytes, src, FUZZ_CAP) {
                Ok(state) => {
                    let mut names: Vec<&str> = state.tensors.iter().map(|(n, _)| n.as_str()).collect();
                    names.sort_unstable();
                    assert!(names.windows(2).all(|w| w[0] != w[1]), "an accepted state dict repeats a name");
                    true
                }
                Err(e) => {
                    assert!(!e.to_string().contains('\n'), "a refusal spans lines: {e}");
                    false
                }
            };
            let file = check(data);
            let pickle = !data.starts_with(b"PK") && check(&pt_archive(data));
            file || pickle
        }
        Target::Scorer => match ddpm::score::Scorer::from_bytes(data, src) {
            Ok(scorer) => {
                // An accepted scorer must run on an image of its shape.
                let c = &scorer.config;
                let pixels = vec![128u8; c.in_channels * c.resolution * c.resolution];
                let one =
                    ddpm::data::Dataset::new(pixels, 1, c.in_channels, c.resolution, c.resolution, "fuzz")
                        .expect("validated sizes");
                let e = scorer.embed(&one, &[0]).expect("the image has the scorer's shape");
                assert_eq!(e.features.dim(), (1, c.feature_dim()));
                true
            }
            Err(_) => false,
        },
    }
}

/// Small valid inputs of the target's format, for mutations to start from.
pub fn seeds(target: Target) -> Vec<Vec<u8>> {
    match target {
        Target::Dataset => {
            let idx = idx_file(3, 4, 5);
            let mut cifar = vec![7u8];
            cifar.extend((0..3072).map(|i| (i * 31 % 251) as u8));
            let labels = ddpm::data::idx::encode_idx_labels(&[3, 1, 4]);
            vec![gzip(&idx), idx, gzip(&cifar), cifar, gzip(&labels), labels]
        }
        Target::Image => {
            let mut out = vec![];
            let gray = image::GrayImage::from_fn(5, 3, |x, y| image::Luma([(x * 40 + y * 7) as u8]));
            let rgba =
                image::RgbaImage::from_fn(4, 6, |x, y| image::Rgba([x as u8 * 60, y as u8 * 40, 9, 128]));
            for (img, format) in [
                (image::DynamicImage::ImageLuma8(gray.clone()), image::ImageFormat::Png),
                (image::DynamicImage::ImageRgba8(rgba), image::ImageFormat::Png),
                (image::DynamicImage::ImageLuma8(gray), image::ImageFormat::Jpeg),
            ] {
                let mut bytes = std::io::Cursor::new(Vec::new());
                img.write_to(&mut bytes, format).expect("encoding to memory");
                out.push(bytes.into_inner());
            }
            out
        }
        Target::Checkpoint => vec![checkpoint_file()],
        // The configs of the small model made by diffusers 0.42.1 (tests/fixtures/diffusers).
        Target::DiffusersConfig => vec![
            include_bytes!("../tests/fixtures/diffusers/small/config.json").to_vec(),
            include_bytes!("../tests/fixtures/diffusers/small/scheduler_config.json").to_vec(),
        ],
        Target::Npy => vec![npy_f32(&[2, 1, 2, 2])],
        Target::Npz => {
            let a = ndarray::Array2::from_shape_fn((2, 3), |(i, j)| (i * 3 + j) as f64);
            let b = ndarray::Array1::from_vec(vec![1i64, -2, 3]);
            let mut z = ndarray_npy::NpzWriter::new(std::io::Cursor::new(Vec::new()));
            z.add_array("a", &a).expect("npz");
            z.add_array("b", &b).expect("npz");
            vec![z.finish().expect("npz").into_inner()]
        }
        Target::Betas => {
            let text = b"# betas\n0.0001\n0.002, 0.02\n0.5\n".to_vec();
            let mut npy = Vec::new();
            ndarray::Array1::from_vec(vec![1e-4f64, 0.01, 0.02]).write_npy(&mut npy).expect("npy");
            vec![text, npy]
        }
        // Files torch 2.15.0 wrote (tests/fixtures/make_torch_pt_fixture.py), and pickles
        // shaped like torch's for the archive of PT_STORAGES.
        Target::TorchPt => vec![
            include_bytes!("../tests/fixtures/torch_pt/state_dict.pt").to_vec(),
            include_bytes!("../tests/fixtures/torch_pt/state_dict_proto4.pt").to_vec(),
            include_bytes!("../tests/fixtures/torch_pt/nested.pt").to_vec(),
            include_bytes!("../tests/fixtures/torch_pt/f64.pt").to_vec(),
            state_dict_pickle(false),
            state_dict_pickle(true),
        ],
        // Two small scorers: one of MNIST's shape with narrow layers, one for 8×8 RGB.
        Target::Scorer => [(1, 28, 10, [2, 3, 4]), (3, 8, 4, [4, 4, 4])]
            .into_iter()
            .map(|(c, r, k, widths)| {
                let config = ddpm::score::ScorerConfig { widths, ..ddpm::score::ScorerConfig::new(c, r, k) };
                ddpm::score::Scorer::init(config, 0).expect("valid").to_bytes().expect("bytes")
            })
            .collect(),
    }
}

/// Writes the target's seeds into `dir` (created), as `seed-N`.
///
/// # Panics
/// If `dir` cannot be written.
pub fn write_seeds(target: Target, dir: &Path) {
    std::fs::create_dir_all(dir).expect("the seed folder can be created");
    for (i, seed) in seeds(target).iter().enumerate() {
        std::fs::write(dir.join(format!("seed-{i}")), seed).expect("the seed folder is writable");
    }
}

fn idx_file(n: u32, rows: u32, cols: u32) -> Vec<u8> {
    let mut b = vec![0, 0, 8, 3];
    for d in [n, rows, cols] {
        b.extend_from_slice(&d.to_be_bytes());
    }
    b.extend((0..n * rows * cols).map(|i| (i * 37 % 256) as u8));
    b
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(bytes).expect("writing to memory");
    e.finish().expect("writing to memory")
}

fn npy_f32(shape: &[usize]) -> Vec<u8> {
    let n: usize = shape.iter().product();
    let a = ndarray::ArrayD::from_shape_vec(shape.to_vec(), (0..n).map(|i| i as f32 * 0.25).collect())
        .expect("shape");
    let mut npy = Vec::new();
    a.write_npy(&mut npy).expect("npy");
    npy
}

/// A real checkpoint of a very small network (a 4x4 single-level U-Net), so that mutations
/// reach every check of the loader.
fn checkpoint_file() -> Vec<u8> {
    let mut unet = ddpm::nn::Preset::Tiny.config(1, 4);
    unet.ch = 4;
    unet.ch_mult = vec![1];
    unet.gn_groups = 2;
    unet.attn_resolutions = vec![];
    let config = ddpm::train::TrainConfig {
        unet,
        diffusion: ddpm::train::DiffusionConfig { timesteps: 10, ..Default::default() },
        optim: Default::default(),
        batch_size: 2,
        random_flip: false,
        seed: 3,
        draws: ddpm::train::Draws::Keyed,
    };
    let net = ddpm::nn::UNet::new(config.unet.clone()).expect("valid");
    let params = net.init_params(&mut ddpm::rng_from_seed(1));
    let mut state = ddpm::io::checkpoint::TrainState::from_weights(config, params, "fuzz seed", Some(true))
        .expect("state");
    state.step = 7;
    ddpm::io::checkpoint::to_file_bytes(&state).expect("bytes")
}

/// The storages of the archive that [`Target::TorchPt`] wraps a bare pickle in: key, bytes
/// (6 float32, 4 float64, 1 float32).
pub const PT_STORAGES: [(&str, usize); 3] = [("0", 24), ("1", 32), ("2", 4)];

/// A `.pt` archive holding `pickle` as `archive/data.pkl` and [`PT_STORAGES`], stored, laid out
/// as torch lays it out (without its alignment padding).
pub fn pt_archive(pickle: &[u8]) -> Vec<u8> {
    let mut members = vec![("archive/data.pkl".to_string(), pickle.to_vec())];
    members.push(("archive/byteorder".into(), b"little".to_vec()));
    for (key, len) in PT_STORAGES {
        members.push((format!("archive/data/{key}"), (0..len).map(|i| (i * 29 % 61) as u8).collect()));
    }
    stored_zip(&members)
}

/// A zip archive of stored (uncompressed) members: local headers, data, central directory.
fn stored_zip(members: &[(String, Vec<u8>)]) -> Vec<u8> {
    let (mut out, mut central) = (Vec::new(), Vec::new());
    let le16 = |v: &mut Vec<u8>, x: usize| v.extend_from_slice(&(x as u16).to_le_bytes());
    let le32 = |v: &mut Vec<u8>, x: usize| v.extend_from_slice(&(x as u32).to_le_bytes());
    for (name, data) in members {
        let mut crc = flate2::Crc::new();
        crc.update(data);
        let offset = out.len();
        // Local header: version 2.0, no flags, stored, no time; crc, sizes, name.
        out.extend_from_slice(b"PK\x03\x04\x14\x00\x00\x00\x00\x00\x00\x00\x00\x00");
        le32(&mut out, crc.sum() as usize);
        le32(&mut out, data.len());
        le32(&mut out, data.len());
        le16(&mut out, name.len());
        le16(&mut out, 0);
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(data);
        central.extend_from_slice(b"PK\x01\x02\x14\x00\x14\x00\x00\x00\x00\x00\x00\x00\x00\x00");
        le32(&mut central, crc.sum() as usize);
        le32(&mut central, data.len());
        le32(&mut central, data.len());
        le16(&mut central, name.len());
        central.extend_from_slice(&[0; 12]); // extra and comment lengths, disk, attributes
        le32(&mut central, offset);
        central.extend_from_slice(name.as_bytes());
    }
    let start = out.len();
    out.extend_from_slice(&central);
    out.extend_from_slice(b"PK\x05\x06\x00\x00\x00\x00");
    le16(&mut out, members.len());
    le16(&mut out, members.len());
    le32(&mut out, central.len());
    le32(&mut out, start);
    le16(&mut out, 0);
    out
}

/// A pickle of the shape torch.save writes (protocol 2, every value memoized and fetched again
/// when repeated) viewing [`PT_STORAGES`]: an OrderedDict with a float32 matrix, a view of its
/// second row, a float64 matrix, a saved `nn.Parameter` and a `_metadata` BUILD; `nested`
/// puts it under "state_dict" in a checkpoint dict beside an int and a float.
fn state_dict_pickle(nested: bool) -> Vec<u8> {
    let mut p = Pickler::default();
    p.raw(b"\x80\x02");
    if nested {
        p.raw(b"}").put().raw(b"(").str("step").int(100_000).str("lr").raw(b"G?\x1a6\xe2\xeb\x1cC-").put();
        p.str("state_dict");
    }
    let dict = p.memo as u8;
    p.raw(b"ccollections\nOrderedDict\n").put().raw(b")R").put().raw(b"(");
    let tensor = |p: &mut Pickler, key: &str, class: &str, numel: u32, offset: u32, size: &[u32]| {
        p.raw(b"ctorch._utils\n_rebuild_tensor_v2\n").put().raw(b"((").str("storage");
        p.raw(format!("ctorch\n{class}\n").as_bytes()).put().str(key).str("cpu").int(numel).raw(b"t").put();
        p.raw(b"Q").int(offset);
        let strides = (0..size.len()).map(|i| size[i + 1..].iter().product()).collect();
        for dims in [size.to_vec(), strides] {
            p.raw(b"(");
            for d in dims {
                p.int(d);
            }
            p.raw(b"t").put();
        }
        p.raw(b"\x89").get(dict).raw(b")R").put().raw(b"t").put().raw(b"R").put();
    };
    p.str("w");
    tensor(&mut p, "0", "FloatStorage", 6, 0, &[2, 3]);
    p.str("row");
    tensor(&mut p, "0", "FloatStorage", 6, 3, &[3]);
    p.str("d");
    tensor(&mut p, "1", "DoubleStorage", 4, 0, &[2, 2]);
    p.str("p").raw(b"ctorch._utils\n_rebuild_parameter\n").put().raw(b"(");
    tensor(&mut p, "2", "FloatStorage", 1, 0, &[]);
    p.raw(b"\x88").get(dict).raw(b")R").raw(b"t").put().raw(b"R").put();
    // The attributes: {'_metadata': OrderedDict({'': {'version': 1}})}.
    p.raw(b"u}").put().str("_metadata").get(dict).raw(b")R").put().str("").raw(b"}").put();
    p.str("version").int(1).raw(b"sssb");
    if nested {
        p.raw(b"u");
    }
    p.raw(b".");
    p.out
}

/// Writes pickle opcodes, memoizing with BINPUT as it goes.
#[derive(Default)]
struct Pickler {
    out: Vec<u8>,
    memo: u32,
}

impl Pickler {
    fn raw(&mut self, bytes: &[u8]) -> &mut Self {
        self.out.extend_from_slice(bytes);
        self
    }
    /// BINPUT (LONG_BINPUT past 255) of the top of the stack.
    fn put(&mut self) -> &mut Self {
        let memo = self.memo;
        match u8::try_from(memo) {
            Ok(i) => self.raw(&[b'q', i]),
            Err(_) => self.raw(b"r").raw(&memo.to_le_bytes()),
        };
        self.memo += 1;
        self
    }
    /// BINGET.
    fn get(&mut self, index: u8) -> &mut Self {
        self.raw(&[b'h', index])
    }
    fn str(&mut self, s: &str) -> &mut Self {
        self.raw(b"X").raw(&(s.len() as u32).to_le_bytes()).raw(s.as_bytes()).put()
    }
    /// BININT1, BININT2 or BININT, the smallest that holds `v`, as pickle chooses.
    fn int(&mut self, v: u32) -> &mut Self {
        match v {
            0..=0xff => self.raw(&[b'K', v as u8]),
            0x100..=0xffff => self.raw(b"M").raw(&(v as u16).to_le_bytes()),
            _ => self.raw(b"J").raw(&v.to_le_bytes()),
        }
    }
}
