//! Folders of PNG/JPEG images: found recursively, decoded, composited, resized and centre-cropped
//! to squares of one size.
//!
//! Each image goes through these steps, in this order:
//!
//! 1. **Decode** (PNG or JPEG, told apart by content, not by name). 16-bit images are reduced to
//!    8 bits by the `image` crate.
//! 2. **Composite on white**: an image with alpha is laid over a white background with straight
//!    (not premultiplied) alpha, `c' = round((c·a + 255·(255 − a)) / 255)`. White, because that is
//!    how icon-like images (emoji, sprites) are usually shown, and it is how the emoji set in
//!    `/work/shared/data/emoji-noto` was made. Images without alpha are unchanged.
//! 3. **Channels**: RGB is kept for 3 channels; for 1 channel the luma of ITU-R BT.601 (as
//!    PIL's `convert("L")`) is taken, `Y = round((299·R + 587·G + 114·B) / 1000)`, which leaves
//!    gray images exactly as they were. A gray image asked for with 3 channels gets R = G = B.
//! 4. **Resize and centre-crop**: the shorter side is scaled to the target and the centre
//!    target × target square is kept. It is done as crop-then-resize: the centred square whose side
//!    is the shorter side is cut out (the left/top margin is the smaller one when the excess is
//!    odd), then resampled to target × target with a Catmull-Rom (bicubic) filter whose support
//!    widens when shrinking, so downscaling averages instead of aliasing. The framing is that of
//!    resize-then-crop; only the filter taps at the crop edges differ, and no intermediate image
//!    larger than the source is made, whatever the aspect ratio. A square of the target size is
//!    not resampled at all.
//!
//! The search is recursive; files whose extension is `png`, `jpg` or `jpeg` (any case) are read,
//! other files are ignored, and names starting with `.` (hidden files, macOS `._*` resource forks)
//! are skipped. Symbolic links to files are followed; links to folders are not, so a link cycle
//! cannot make the search loop. Paths are sorted, so the order, and hence a seeded batch
//! stream, does not depend on the file system.

use std::path::{Path, PathBuf};

use image::{imageops, DynamicImage, GrayImage, ImageBuffer, Pixel, RgbImage};
use rayon::prelude::*;

use super::Dataset;
use crate::error::{Error, Result};

/// Extensions (lower case) of the files [`find_images`] picks up.
const IMAGE_EXTENSIONS: [&str; 3] = ["png", "jpg", "jpeg"];

/// Largest accepted target side: a guard against a typo asking for gigabytes.
const MAX_IMAGE_SIZE: usize = 4096;

/// Every PNG/JPEG file under `dir`, recursively, sorted by path. Hidden names (starting with
/// `.`) are skipped and symbolic links to folders are not followed; a link that leads nowhere
/// is listed (and then refused by the loader, naming it).
///
/// # Errors
/// [`Error::Io`] naming the folder if it, or a folder under it, cannot be listed.
pub fn find_images(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(folder) = pending.pop() {
        for entry in std::fs::read_dir(&folder).map_err(|e| Error::io(&folder, e))? {
            let entry = entry.map_err(|e| Error::io(&folder, e))?;
            if entry.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            let path = entry.path();
            let kind = entry.file_type().map_err(|e| Error::io(&path, e))?;
            if kind.is_dir() {
                pending.push(path);
            } else if has_image_extension(&path) && !path.is_dir() {
                // Files, and links that do not lead to a folder: a dangling or looping link is
                // kept, so that loading reports it instead of silently dropping an image.
                found.push(path);
            }
        }
    }
    found.sort();
    Ok(found)
}

/// Loads every image under `dir` (see [`find_images`]) as a `[N, channels, image_size,
/// image_size]` dataset, each image decoded, composited on white, converted, resized and
/// centre-cropped as the module documentation describes. Images are decoded in parallel; the
/// result does not depend on the number of threads.
///
/// Memory is bounded: the dataset's size is checked against [`crate::files::memory_cap`] before
/// any image is decoded, each file is read only if it is at most [`MAX_IMAGE_FILE_BYTES`], and
/// the decoder refuses images wider or taller than [`MAX_DECODED_SIDE`] or needing more than
/// [`MAX_DECODE_ALLOC`] bytes, before allocating them.
///
/// # Errors
/// - [`Error::InvalidConfig`] if `channels` is not 1 or 3, or `image_size` is 0 or above 4096.
/// - [`Error::BadFile`] naming the folder if it holds no PNG/JPEG file, or the dataset would
///   exceed the memory cap.
/// - [`Error::BadFile`] naming every image (the first few, and how many in all) that cannot be
///   read or decoded, each with its reason, so that all of them can be fixed at once.
/// - [`Error::Io`] if a folder cannot be listed.
pub fn load_image_folder(dir: &Path, image_size: usize, channels: usize) -> Result<Dataset> {
    check_target(image_size, channels)?;
    let paths = find_images(dir)?;
    load_image_paths(dir, &paths, image_size, channels)
}

/// [`load_image_folder`] for a chosen list of image files (e.g. [`find_images`] filtered), with
/// `dir` the folder named in messages and recorded as the source. The same checks and errors.
///
/// # Errors
/// As [`load_image_folder`]; the "no images" error if `paths` is empty.
pub fn load_image_paths(
    dir: &Path,
    paths: &[PathBuf],
    image_size: usize,
    channels: usize,
) -> Result<Dataset> {
    check_target(image_size, channels)?;
    if paths.is_empty() {
        return Err(Error::bad_file(
            dir,
            "no PNG/JPEG images in this folder or below it (looked for *.png, *.jpg, *.jpeg); \
             point at a folder that holds images",
        ));
    }
    let image_len = channels * image_size * image_size;
    let total = (paths.len() as u64).saturating_mul(image_len as u64);
    crate::files::check_declared_size(
        dir,
        &format!("{} images of {channels}x{image_size}x{image_size}", paths.len()),
        total,
        crate::files::memory_cap(),
    )?;
    let size = u32::try_from(image_size).expect("check_target above caps it at MAX_IMAGE_SIZE (4096)");
    let prepared: Vec<Result<Vec<u8>>> =
        paths.par_iter().map(|path| read_and_prepare(path, size, channels)).collect();
    let failures: Vec<String> = prepared
        .iter()
        .filter_map(|r| r.as_ref().err())
        .map(|e| match e {
            Error::BadFile { path, reason } => format!("{} ({reason})", path.display()),
            other => other.to_string(),
        })
        .collect();
    if !failures.is_empty() {
        const SHOWN: usize = 5;
        let more = failures.len().saturating_sub(SHOWN);
        return Err(Error::bad_file(
            dir,
            format!(
                "{} of {} images cannot be used; remove or replace them: {}{}",
                failures.len(),
                paths.len(),
                failures[..failures.len().min(SHOWN)].join("; "),
                if more > 0 { format!("; and {more} more") } else { String::new() }
            ),
        ));
    }
    let mut pixels = Vec::with_capacity(total as usize);
    for image in prepared.into_iter().flatten() {
        pixels.extend_from_slice(&image);
    }
    Dataset::new(pixels, paths.len(), channels, image_size, image_size, dir)
}

/// The largest image file read (a larger one is refused, naming it).
pub const MAX_IMAGE_FILE_BYTES: u64 = 256 << 20;
/// The largest width or height decoded.
pub const MAX_DECODED_SIDE: u32 = 16384;
/// The most memory the decoder may allocate for one image.
pub const MAX_DECODE_ALLOC: u64 = 512 << 20;

/// Converts a decoded image to `channels × image_size × image_size` bytes in CHW order, by the
/// steps 2 to 4 of the module documentation (composite on white, channels, crop and resize).
///
/// # Panics
/// If `channels` is not 1 or 3, or `image_size` is 0 ([`load_image_folder`] checks both).
pub fn prepare_image(image: &DynamicImage, image_size: u32, channels: usize) -> Vec<u8> {
    assert!(image_size > 0, "prepare_image: image_size must be positive");
    let rgb = composite_on_white(image);
    match channels {
        3 => planar(&crop_and_resize(&rgb, image_size)),
        1 => planar(&crop_and_resize(&luma_bt601(&rgb), image_size)),
        _ => panic!("prepare_image: channels must be 1 or 3, got {channels}"),
    }
}

/// Whether `path` ends in `.png`, `.jpg` or `.jpeg` (any case).
pub(crate) fn has_image_extension(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|known| e.eq_ignore_ascii_case(known)))
}

fn check_target(image_size: usize, channels: usize) -> Result<()> {
    if channels != 1 && channels != 3 {
        return Err(Error::config(
            "channels",
            format!("{channels} channels requested; images load as 1 (grayscale) or 3 (RGB)"),
        ));
    }
    if image_size == 0 || image_size > MAX_IMAGE_SIZE {
        return Err(Error::config("image size", format!("{image_size} is outside 1..={MAX_IMAGE_SIZE}")));
    }
    Ok(())
}

/// Reads and decodes one file, then [`prepare_image`].
fn read_and_prepare(path: &Path, size: u32, channels: usize) -> Result<Vec<u8>> {
    let bytes = crate::files::read_capped(path, MAX_IMAGE_FILE_BYTES)?;
    Ok(prepare_image(&decode_image(&bytes, path)?, size, channels))
}

/// Decodes the bytes of one PNG or JPEG file (told apart by content) within the limits of
/// [`load_image_folder`]; `source` names the file in errors.
///
/// # Errors
/// [`Error::BadFile`] naming `source` if the bytes are not a decodable PNG/JPEG, the image has
/// no pixels, or it is over the size limits.
pub fn decode_image(bytes: &[u8], source: &Path) -> Result<DynamicImage> {
    let bad = |e: &dyn std::fmt::Display| {
        Error::bad_file(
            source,
            format!("cannot decode this image ({e}); replace it with a valid PNG or JPEG"),
        )
    };
    let mut reader =
        image::ImageReader::new(std::io::Cursor::new(bytes)).with_guessed_format().map_err(|e| bad(&e))?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_DECODED_SIDE);
    limits.max_image_height = Some(MAX_DECODED_SIDE);
    limits.max_alloc = Some(MAX_DECODE_ALLOC);
    reader.limits(limits);
    let decoder = reader.into_decoder().map_err(|e| bad(&e))?;
    // Decoding takes up to 8 bytes a pixel (16-bit RGBA), and the conversions to 8-bit RGBA and
    // RGB up to 7 more; images decode in parallel, one per thread.
    let (w, h) = image::ImageDecoder::dimensions(&decoder);
    let need = u64::from(w) * u64::from(h) * 16;
    let cap = crate::files::memory_cap() / rayon::current_num_threads().max(1) as u64;
    if need > cap {
        return Err(Error::bad_file(
            source,
            format!(
                "{w}x{h} pixels need about {need} bytes to decode and convert, more than this process's \
                 share of the memory cap ({cap} bytes; DDPM_MAX_DATA_MIB raises it); shrink the image"
            ),
        ));
    }
    let image = DynamicImage::from_decoder(decoder).map_err(|e| bad(&e))?;
    if image.width() == 0 || image.height() == 0 {
        return Err(Error::bad_file(source, "the image has no pixels"));
    }
    Ok(image)
}

/// RGB of an image laid over white with straight alpha: `c' = round((c·a + 255·(255 − a)) / 255)`.
fn composite_on_white(image: &DynamicImage) -> RgbImage {
    if !image.color().has_alpha() {
        return image.to_rgb8();
    }
    let rgba = image.to_rgba8();
    RgbImage::from_fn(rgba.width(), rgba.height(), |x, y| {
        let [r, g, b, a] = rgba.get_pixel(x, y).0;
        let a = u32::from(a);
        let over = |c: u8| ((u32::from(c) * a + 255 * (255 - a) + 127) / 255) as u8;
        image::Rgb([over(r), over(g), over(b)])
    })
}

/// BT.601 luma, `Y = round((299·R + 587·G + 114·B) / 1000)`; exact for gray pixels.
fn luma_bt601(rgb: &RgbImage) -> GrayImage {
    GrayImage::from_fn(rgb.width(), rgb.height(), |x, y| {
        let [r, g, b] = rgb.get_pixel(x, y).0;
        let y = (299 * u32::from(r) + 587 * u32::from(g) + 114 * u32::from(b) + 500) / 1000;
        image::Luma([y as u8])
    })
}

/// Crops the centred square whose side is the shorter side, then resamples it to `size × size`
/// (Catmull-Rom); a square of the right size is returned as is.
fn crop_and_resize<P>(image: &ImageBuffer<P, Vec<u8>>, size: u32) -> ImageBuffer<P, Vec<u8>>
where
    P: Pixel<Subpixel = u8> + 'static,
{
    let (w, h) = image.dimensions();
    let side = w.min(h);
    let square = imageops::crop_imm(image, (w - side) / 2, (h - side) / 2, side, side).to_image();
    if side == size {
        square
    } else {
        imageops::resize(&square, size, size, imageops::FilterType::CatmullRom)
    }
}

/// Interleaved HWC pixels to planar CHW bytes.
fn planar<P>(image: &ImageBuffer<P, Vec<u8>>) -> Vec<u8>
where
    P: Pixel<Subpixel = u8>,
{
    let channels = usize::from(P::CHANNEL_COUNT);
    let raw = image.as_raw();
    let mut out = Vec::with_capacity(raw.len());
    for c in 0..channels {
        out.extend(raw.iter().skip(c).step_by(channels));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{Luma, Rgb, Rgba, RgbaImage};

    fn message(err: Error) -> String {
        err.to_string()
    }

    #[test]
    fn png_of_the_target_size_round_trips_exactly_in_chw() {
        let dir = tempfile::tempdir().expect("temp dir");
        let img = RgbImage::from_fn(4, 4, |x, y| Rgb([(x * 10) as u8, (y * 20) as u8, 7]));
        img.save(dir.path().join("a.png")).expect("save");
        let d = load_image_folder(dir.path(), 4, 3).expect("load");
        assert_eq!(d.shape(), [1, 3, 4, 4]);
        let px = d.image(0);
        for y in 0..4 {
            for x in 0..4 {
                assert_eq!(px[y * 4 + x], (x * 10) as u8);
                assert_eq!(px[16 + y * 4 + x], (y * 20) as u8);
                assert_eq!(px[32 + y * 4 + x], 7);
            }
        }
    }

    #[test]
    fn search_is_recursive_sorted_and_skips_hidden_and_other_files() {
        let dir = tempfile::tempdir().expect("temp dir");
        let nested = dir.path().join("a");
        std::fs::create_dir(&nested).expect("mkdir");
        let gray = |v: u8| GrayImage::from_pixel(2, 2, Luma([v]));
        gray(30).save(dir.path().join("c.png")).expect("save");
        gray(20).save(dir.path().join("B.PNG")).expect("save");
        gray(10).save(nested.join("z.png")).expect("save");
        std::fs::write(dir.path().join(".hidden.png"), b"not an image").expect("write");
        std::fs::write(dir.path().join("notes.txt"), b"ignored").expect("write");
        let paths = find_images(dir.path()).expect("find");
        let names: Vec<_> =
            paths.iter().map(|p| p.strip_prefix(dir.path()).expect("under dir").to_owned()).collect();
        assert_eq!(names, [Path::new("B.PNG"), Path::new("a/z.png"), Path::new("c.png")]);
        let d = load_image_folder(dir.path(), 2, 1).expect("load");
        assert_eq!(d.pixels()[..4], [20; 4]);
        assert_eq!(d.pixels()[4..8], [10; 4]);
        assert_eq!(d.pixels()[8..], [30; 4]);
    }

    #[test]
    fn gray_to_rgb_repeats_and_rgb_to_gray_uses_bt601() {
        let dir = tempfile::tempdir().expect("temp dir");
        GrayImage::from_pixel(3, 3, Luma([77])).save(dir.path().join("g.png")).expect("save");
        let d = load_image_folder(dir.path(), 3, 3).expect("load");
        assert!(d.pixels().iter().all(|&p| p == 77));

        let other = tempfile::tempdir().expect("temp dir");
        RgbImage::from_pixel(3, 3, Rgb([200, 100, 50])).save(other.path().join("c.png")).expect("save");
        let d = load_image_folder(other.path(), 3, 1).expect("load");
        // (299·200 + 587·100 + 114·50 + 500) / 1000 = 124 (integer division).
        assert!(d.pixels().iter().all(|&p| p == 124), "{:?}", &d.pixels()[..3]);
    }

    #[test]
    fn transparent_pixels_become_white_and_opaque_ones_keep_their_colour() {
        let dir = tempfile::tempdir().expect("temp dir");
        // Left column transparent, right column opaque.
        let img = RgbaImage::from_fn(2, 2, |x, _| Rgba([10, 20, 30, if x == 0 { 0 } else { 255 }]));
        img.save(dir.path().join("t.png")).expect("save");
        let d = load_image_folder(dir.path(), 2, 3).expect("load");
        let px = d.image(0);
        // channel-major: R plane [x0 y0, x1 y0, x0 y1, x1 y1]
        assert_eq!([px[0], px[4], px[8]], [255, 255, 255]);
        assert_eq!([px[1], px[5], px[9]], [10, 20, 30]);
        // Half alpha: (10·128 + 255·127 + 127) / 255 = 132.
        let half = DynamicImage::ImageRgba8(RgbaImage::from_pixel(1, 1, Rgba([10, 10, 10, 128])));
        assert_eq!(prepare_image(&half, 1, 1), [132]);
    }

    #[test]
    fn wide_image_is_centre_cropped_without_resampling_when_height_fits() {
        let img = DynamicImage::ImageLuma8(GrayImage::from_fn(8, 4, |x, _| Luma([(x * 10) as u8])));
        let px = prepare_image(&img, 4, 1);
        assert_eq!(px[..4], [20, 30, 40, 50]);
    }

    #[test]
    fn downscaling_a_flat_image_keeps_its_colour() {
        let img = DynamicImage::ImageRgb8(RgbImage::from_pixel(64, 48, Rgb([9, 120, 250])));
        let px = prepare_image(&img, 16, 3);
        assert_eq!(px.len(), 3 * 16 * 16);
        for (c, want) in [9i32, 120, 250].into_iter().enumerate() {
            for &p in &px[c * 256..(c + 1) * 256] {
                assert!((i32::from(p) - want).abs() <= 1, "channel {c}: {p} vs {want}");
            }
        }
    }

    #[test]
    fn upscaling_small_images_reaches_the_target() {
        let img = DynamicImage::ImageLuma8(GrayImage::from_pixel(3, 5, Luma([60])));
        assert_eq!(prepare_image(&img, 8, 1).len(), 64);
    }

    #[test]
    fn jpeg_images_load_close_to_their_colour() {
        let dir = tempfile::tempdir().expect("temp dir");
        RgbImage::from_pixel(16, 16, Rgb([40, 160, 220])).save(dir.path().join("x.jpg")).expect("save jpeg");
        let d = load_image_folder(dir.path(), 8, 3).expect("load");
        for (c, want) in [40i32, 160, 220].into_iter().enumerate() {
            for &p in &d.image(0)[c * 64..(c + 1) * 64] {
                assert!((i32::from(p) - want).abs() <= 4, "channel {c}: {p} vs {want}");
            }
        }
    }

    #[test]
    fn empty_folder_is_refused_naming_it() {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("readme.txt"), b"no images").expect("write");
        let err = load_image_folder(dir.path(), 8, 3).expect_err("empty");
        assert!(matches!(err, Error::BadFile { .. }));
        let msg = message(err);
        assert!(msg.contains(&*dir.path().to_string_lossy()) && msg.contains("no PNG/JPEG"), "{msg}");
    }

    #[test]
    fn undecodable_image_is_refused_naming_it() {
        let dir = tempfile::tempdir().expect("temp dir");
        GrayImage::from_pixel(2, 2, Luma([1])).save(dir.path().join("a.png")).expect("save");
        std::fs::write(dir.path().join("b.png"), b"this is not a png").expect("write");
        let err = load_image_folder(dir.path(), 2, 1).expect_err("bad image");
        assert!(matches!(err, Error::BadFile { .. }));
        let msg = message(err);
        assert!(msg.contains("b.png") && msg.contains("cannot decode"), "{msg}");
    }

    #[test]
    fn bad_targets_are_config_errors() {
        let dir = tempfile::tempdir().expect("temp dir");
        for (size, channels) in [(8, 2), (8, 4), (0, 3), (5000, 1)] {
            let err = load_image_folder(dir.path(), size, channels).expect_err("bad target");
            assert!(matches!(err, Error::InvalidConfig { .. }), "{size} {channels}");
        }
    }

    #[test]
    fn missing_folder_is_an_io_error() {
        let err = load_image_folder(Path::new("/no/such/folder"), 8, 3).expect_err("missing");
        assert!(matches!(err, Error::Io { .. }));
    }
}
