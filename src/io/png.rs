//! PNG output: a grid of images, or one image, from tensors on [−1, 1].
//!
//! ## Quantisation
//! A value `x` (model scale, [−1, 1]) becomes the 8-bit pixel
//! `p = clamp(round((x + 1) · 127.5), 0, 255)`, rounding halves away from zero (`f32::round`);
//! NaN becomes 0. This inverts [`crate::data::pixel_to_unit`] exactly on the 256 levels of the
//! data, and is improved-diffusion's `((sample + 1) * 127.5).clamp(0, 255)` except that it rounds
//! where the latter truncates (`to(th.uint8)`), so a sample lying exactly on a data level is
//! written as that level.
//!
//! ## Grid layout
//! As torchvision's `make_grid` (which improved-diffusion's samples are usually viewed with):
//! images left to right, top to bottom, `min(cols, N)` per row, separated and surrounded by a
//! [`GRID_BORDER`]-pixel black border (pixel 0); unused cells of the last row stay black.
//! 1-channel images give a grayscale PNG, 3-channel images an RGB PNG.

use std::path::Path;

use image::{ExtendedColorType, ImageEncoder};
use ndarray::{ArrayView3, ArrayView4, Axis};

use crate::error::{Error, Result};

/// Width in pixels of the border around and between the images of a grid.
pub const GRID_BORDER: usize = 2;

/// The 8-bit pixel for a model value `x` on [−1, 1]: `clamp(round((x + 1) · 127.5), 0, 255)`,
/// NaN → 0 (see the module documentation).
pub fn unit_to_pixel(x: f32) -> u8 {
    // `as` saturates out-of-range floats and maps NaN to 0, which is the clamp wanted.
    ((x + 1.0) * 127.5).round() as u8
}

/// A grid of images ready to encode: `height × width × channels` bytes, interleaved (HWC).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grid {
    /// Pixel rows, interleaved channels: byte `(y·width + x)·channels + c`.
    pub pixels: Vec<u8>,
    /// Grid width in pixels: `cols·(W + border) + border`.
    pub width: usize,
    /// Grid height in pixels: `rows·(H + border) + border`, `rows = ⌈N / cols⌉`.
    pub height: usize,
    /// 1 (grayscale) or 3 (RGB).
    pub channels: usize,
}

/// Lays out `images` `[N, C, H, W]` (values on [−1, 1], `C` = 1 or 3) as a grid of
/// `min(cols, N)` columns, quantised as the module documentation says.
///
/// # Errors
/// [`Error::InvalidConfig`] if `cols` is 0, there are no images, an image has no pixels, or `C`
/// is not 1 or 3.
pub fn make_grid(images: ArrayView4<f32>, cols: usize) -> Result<Grid> {
    let [n, c, h, w] = [images.shape()[0], images.shape()[1], images.shape()[2], images.shape()[3]];
    if cols == 0 {
        return Err(Error::config("grid columns", "0 columns requested; use at least 1"));
    }
    if n == 0 || h == 0 || w == 0 {
        return Err(Error::config("grid", format!("nothing to draw: images are [{n}, {c}, {h}, {w}]")));
    }
    if c != 1 && c != 3 {
        return Err(Error::config(
            "grid",
            format!("images have {c} channels; PNG grids take 1 (grayscale) or 3 (RGB)"),
        ));
    }
    let cols = cols.min(n);
    let rows = n.div_ceil(cols);
    let width = cols * (w + GRID_BORDER) + GRID_BORDER;
    let height = rows * (h + GRID_BORDER) + GRID_BORDER;
    let mut pixels = vec![0u8; width * height * c];
    for (k, image) in images.axis_iter(Axis(0)).enumerate() {
        let left = GRID_BORDER + (k % cols) * (w + GRID_BORDER);
        let top = GRID_BORDER + (k / cols) * (h + GRID_BORDER);
        for ((ch, y, x), &v) in image.indexed_iter() {
            pixels[((top + y) * width + left + x) * c + ch] = unit_to_pixel(v);
        }
    }
    Ok(Grid { pixels, width, height, channels: c })
}

/// Saves `images` `[N, C, H, W]` (values on [−1, 1], `C` = 1 or 3) as one PNG grid with
/// `min(cols, N)` columns and a 2-pixel black border (see the module documentation for the layout
/// and the quantisation). The file is written atomically ([`crate::files::write_atomic`]).
///
/// # Errors
/// Those of [`make_grid`]; [`Error::Io`] if the file cannot be written (the folder must exist).
pub fn save_grid(path: &Path, images: ArrayView4<f32>, cols: usize) -> Result<()> {
    let grid = make_grid(images, cols)?;
    write_png(path, &grid.pixels, grid.width, grid.height, grid.channels)
}

/// Saves one image `[C, H, W]` (values on [−1, 1], `C` = 1 or 3) as a PNG of `W × H` pixels, no
/// border, quantised as the module documentation says; written atomically.
///
/// # Errors
/// [`Error::InvalidConfig`] if the image has no pixels or `C` is not 1 or 3; [`Error::Io`] if the
/// file cannot be written.
pub fn save_image(path: &Path, image: ArrayView3<f32>) -> Result<()> {
    let [c, h, w] = [image.shape()[0], image.shape()[1], image.shape()[2]];
    if h == 0 || w == 0 || (c != 1 && c != 3) {
        return Err(Error::config(
            "image",
            format!("cannot save a [{c}, {h}, {w}] image; PNG needs C = 1 or 3 and some pixels"),
        ));
    }
    // CHW → HWC.
    let pixels: Vec<u8> = image.permuted_axes([1, 2, 0]).iter().map(|&v| unit_to_pixel(v)).collect();
    write_png(path, &pixels, w, h, c)
}

/// Encodes interleaved 8-bit pixels as PNG and writes them atomically.
fn write_png(path: &Path, pixels: &[u8], width: usize, height: usize, channels: usize) -> Result<()> {
    let too_big = |_| Error::config("image", format!("{width}x{height} is too large for a PNG"));
    let (w, h) = (u32::try_from(width).map_err(too_big)?, u32::try_from(height).map_err(too_big)?);
    let colour = if channels == 1 { ExtendedColorType::L8 } else { ExtendedColorType::Rgb8 };
    let mut bytes = Vec::new();
    image::codecs::png::PngEncoder::new(&mut bytes)
        .write_image(pixels, w, h, colour)
        .map_err(|e| Error::config("image", format!("cannot encode {}: {e}", path.display())))?;
    crate::files::write_atomic(path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{Array3, Array4};

    #[test]
    fn quantisation_rounds_clamps_and_zeroes_nan() {
        assert_eq!(unit_to_pixel(-1.0), 0);
        assert_eq!(unit_to_pixel(1.0), 255);
        assert_eq!(unit_to_pixel(0.0), 128); // 127.5 rounds half away from zero
        assert_eq!(unit_to_pixel(-3.0), 0);
        assert_eq!(unit_to_pixel(7.0), 255);
        assert_eq!(unit_to_pixel(f32::NAN), 0);
        assert_eq!(unit_to_pixel(f32::INFINITY), 255);
    }

    #[test]
    fn grid_has_borders_and_images_in_reading_order() {
        // 5 gray 3x2 images with values k/4 mapped to [-1, 1]: image k is flat.
        let images = Array4::from_shape_fn((5, 1, 3, 2), |(k, _, _, _)| k as f32 / 2.0 - 1.0);
        let grid = make_grid(images.view(), 3).expect("grid");
        assert_eq!((grid.width, grid.height, grid.channels), (3 * 4 + 2, 2 * 5 + 2, 1));
        let at = |x: usize, y: usize| grid.pixels[y * grid.width + x];
        for k in 0..5 {
            let (left, top) = (2 + (k % 3) * 4, 2 + (k / 3) * 5);
            assert_eq!(at(left, top), unit_to_pixel(k as f32 / 2.0 - 1.0), "image {k}");
            assert_eq!(at(left + 1, top + 2), at(left, top));
        }
        assert_eq!(at(0, 0), 0);
        assert_eq!(at(11, 8), 0, "the unused sixth cell is black");
    }

    #[test]
    fn grid_png_round_trips_through_the_decoder() {
        let dir = tempfile::tempdir().expect("temp dir");
        let images = Array4::from_shape_fn((4, 3, 4, 5), |(k, c, y, x)| {
            crate::data::pixel_to_unit(((k * 60 + c * 20 + y * 5 + x) % 256) as u8)
        });
        let path = dir.path().join("grid.png");
        save_grid(&path, images.view(), 2).expect("save");
        let png = image::open(&path).expect("decode").to_rgb8();
        assert_eq!(png.dimensions(), (2 * 7 + 2, 2 * 6 + 2));
        for k in 0..4 {
            let (left, top) = (2 + (k % 2) * 7, 2 + (k / 2) * 6);
            for c in 0..3 {
                for y in 0..4 {
                    for x in 0..5 {
                        let want = ((k * 60 + c * 20 + y * 5 + x) % 256) as u8;
                        let got = png.get_pixel((left + x) as u32, (top + y) as u32)[c];
                        assert_eq!(got, want, "image {k} channel {c} at ({x}, {y})");
                    }
                }
            }
        }
        assert!(!dir.path().join("grid.png.tmp").exists());
    }

    #[test]
    fn single_image_round_trips_in_grayscale() {
        let dir = tempfile::tempdir().expect("temp dir");
        let image =
            Array3::from_shape_fn((1, 3, 4), |(_, y, x)| crate::data::pixel_to_unit((y * 4 + x) as u8 * 20));
        let path = dir.path().join("one.png");
        save_image(&path, image.view()).expect("save");
        let png = image::open(&path).expect("decode");
        assert_eq!(png.color(), image::ColorType::L8);
        let gray = png.to_luma8();
        assert_eq!(gray.dimensions(), (4, 3));
        assert_eq!(gray.get_pixel(3, 2)[0], 11 * 20);
    }

    #[test]
    fn bad_grids_are_config_errors() {
        let four = Array4::<f32>::zeros((1, 4, 2, 2));
        assert!(matches!(make_grid(four.view(), 1), Err(Error::InvalidConfig { .. })));
        let one = Array4::<f32>::zeros((1, 1, 2, 2));
        assert!(matches!(make_grid(one.view(), 0), Err(Error::InvalidConfig { .. })));
        let none = Array4::<f32>::zeros((0, 1, 2, 2));
        assert!(matches!(make_grid(none.view(), 1), Err(Error::InvalidConfig { .. })));
        let two = Array3::<f32>::zeros((2, 2, 2));
        assert!(save_image(Path::new("/nonexistent/x.png"), two.view()).is_err());
    }

    #[test]
    fn saving_into_a_missing_folder_is_an_io_error() {
        let one = Array4::<f32>::zeros((1, 1, 2, 2));
        let err = save_grid(Path::new("/no/such/dir/g.png"), one.view(), 1).expect_err("no dir");
        assert!(matches!(err, Error::Io { .. }));
    }
}
