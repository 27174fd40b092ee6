//! End to end through the public API of `ddpm::data` and `ddpm::io`: a dataset on disk → batches
//! → a PNG grid and a checkpoint-like file, and a batch stream resumed from saved metadata.

use std::collections::BTreeMap;
use std::path::Path;

use ddpm::data::{self, BatchConfig, BatchPosition, Batches, Dataset, LoadOptions, Split};
use ddpm::io;

fn digits(n: usize) -> Dataset {
    let pixels = (0..n * 28 * 28).map(|i| ((i * 7919) % 256) as u8).collect();
    Dataset::new(pixels, n, 1, 28, 28, "digits").expect("valid shape")
}

#[test]
fn mnist_folder_to_batches_to_png_grid_keeps_every_pixel() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mnist = dir.path().join("mnist");
    std::fs::create_dir(&mnist).expect("mkdir");
    let original = digits(10);
    data::write_idx(&mnist.join("t10k-images-idx3-ubyte.gz"), &original).expect("write idx");

    let opts = LoadOptions { split: Split::Test, image_size: Some(28), channels: Some(1), labels: false };
    let loaded = data::load(&mnist, &opts).expect("load");
    assert_eq!(loaded.pixels(), original.pixels());

    let config = BatchConfig { batch_size: 4, random_flip: false, seed: 11 };
    let mut batches = Batches::new(loaded.clone(), config).expect("batches");
    let plan = batches.clone().next_indices();
    let batch = batches.next_batch();
    let batch = batch.into_dimensionality::<ndarray::Ix4>().expect("4-d batch");

    let grid_path = dir.path().join("grid.png");
    io::png::save_grid(&grid_path, batch.view(), 2).expect("save grid");
    let png = image::open(&grid_path).expect("decode png").to_luma8();
    let border = io::png::GRID_BORDER as u32;
    for (k, &i) in plan.indices.iter().enumerate() {
        let (left, top) = (border + (k as u32 % 2) * (28 + border), border + (k as u32 / 2) * (28 + border));
        for y in 0..28u32 {
            for x in 0..28u32 {
                let want = loaded.image(i)[(y * 28 + x) as usize];
                assert_eq!(png.get_pixel(left + x, top + y)[0], want, "image {i} at ({x}, {y})");
            }
        }
    }
}

#[test]
fn a_batch_stream_resumed_from_checkpoint_metadata_continues_exactly() {
    let dir = tempfile::tempdir().expect("temp dir");
    let dataset = std::sync::Arc::new(digits(9));
    let config = BatchConfig { batch_size: 2, random_flip: true, seed: 2024 };

    let mut uninterrupted = Batches::new(dataset.clone(), config).expect("batches");
    let expected: Vec<_> = (0..12).map(|_| uninterrupted.next_batch()).collect();

    let mut first_run = Batches::new(dataset.clone(), config).expect("batches");
    for _ in 0..7 {
        first_run.next_batch();
    }
    let weights = ndarray::ArrayD::<f32>::ones(ndarray::IxDyn(&[3]));
    let metadata = BTreeMap::from([
        ("batch_position".to_string(), serde_json::to_string(&first_run.position()).expect("json")),
        ("batch_config".to_string(), serde_json::to_string(&config).expect("json")),
    ]);
    let ckpt = dir.path().join("ckpt.safetensors");
    io::safetensors::save_atomic(&ckpt, &[("w".to_string(), &weights)], &metadata).expect("save");

    let loaded = io::safetensors::load(&ckpt).expect("load");
    let position: BatchPosition = serde_json::from_str(&loaded.metadata["batch_position"]).expect("position");
    let config: BatchConfig = serde_json::from_str(&loaded.metadata["batch_config"]).expect("config");
    let mut resumed = Batches::resume(dataset, config, position).expect("resume");
    let tail: Vec<_> = (7..12).map(|_| resumed.next_batch()).collect();
    assert_eq!(tail, expected[7..]);
}

#[test]
#[ignore = "reads /work/shared/data, present only on the development machine"]
fn shared_data_sets_load_with_format_detection() {
    let shared = Path::new("/work/shared/data");
    let emoji = data::load(&shared.join("emoji-noto/emoji_32x32_rgb_cifar.bin.gz"), &LoadOptions::default())
        .expect("load emoji");
    assert_eq!(emoji.shape(), [3786, 3, 32, 32]);
    let test = LoadOptions { split: Split::Test, ..LoadOptions::default() };
    let mnist = data::load(&shared.join("mnist"), &test).expect("load mnist folder");
    assert_eq!(mnist.pixels(), data::mnist_embedded(Split::Test).expect("embedded").pixels());
    let digits =
        data::load(&shared.join("sklearn-digits/digits-images-idx3-ubyte.gz"), &LoadOptions::default())
            .expect("load sklearn digits");
    assert_eq!(digits.channels(), 1);
}
