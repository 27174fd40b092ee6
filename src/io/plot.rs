//! Line charts as PNG files: the training loss curve, and any set of named (x, y) series.
//!
//! | function            | draws                                                                |
//! |---------------------|----------------------------------------------------------------------|
//! | [`save_line_chart`] | one line per [`Series`] with a legend; linear or log-scale y         |
//! | [`save_loss_curve`] | raw per-step loss and its bias-corrected EMA (smoothing 0.98), log y |
//!
//! Charts are [`WIDTH`]×[`HEIGHT`] RGB PNGs, drawn with `plotters` into a bitmap in memory,
//! encoded with the `image` crate and written atomically ([`crate::files::write_atomic`]).
//!
//! Text is set in DejaVu Sans, embedded in the library (`assets/fonts/`, Bitstream Vera license),
//! so drawing needs no system font library and looks the same on every machine.
//!
//! Ticks are chosen here rather than by `plotters`: its log axis labels only powers of ten, so a
//! loss that stays within one decade would get no label at all. A log axis is labelled at powers
//! of ten when it spans three or more, else at 1, 2 and 5 times them, else at evenly spaced
//! values as a linear axis would be; powers of ten always get a grid line, and 2…9 times them a
//! lighter one.

use std::ops::Range;
use std::path::Path;
use std::sync::OnceLock;

use image::{ExtendedColorType, ImageEncoder};
use plotters::coord::ranged1d::{KeyPointHint, NoDefaultFormatting, ValueFormatter};
use plotters::prelude::*;

use crate::error::{Error, Result};

/// Width of every chart, in pixels.
pub const WIDTH: u32 = 900;
/// Height of every chart, in pixels.
pub const HEIGHT: u32 = 500;

/// The drawing is made this many times larger in each direction and shrunk by averaging. Lines
/// come out antialiased (plotters draws them without), and letter spacing comes out even:
/// plotters 0.3.7 sets each glyph at a whole pixel and without its left side bearing, an error
/// of up to a pixel or two per letter that is halved and blurred here.
const SUPERSAMPLE: u32 = 2;

/// The EMA weight of the previous smoothed value in [`save_loss_curve`] (TensorBoard's slider).
pub const LOSS_SMOOTHING: f64 = 0.98;

/// DejaVu Sans 2.37, unmodified; its license is `assets/fonts/LICENSE`.
static FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");

/// The font family name `plotters` looks text up under (its `FontFamily::SansSerif`).
const FONT_FAMILY: &str = "sans-serif";

/// Line colours, in order: matplotlib's default cycle ("tab10"), chosen to be told apart.
const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// One named series of (x, y) points.
#[derive(Debug, Clone, Copy)]
pub struct Series<'a> {
    /// The legend entry; an empty label leaves the series out of the legend.
    pub label: &'a str,
    /// The points, joined in the order given (so sort them by x for a curve).
    pub points: &'a [(f64, f64)],
}

/// Writes a line chart PNG ([`WIDTH`]×[`HEIGHT`]): `title` above, `x_label` and `y_label` on the
/// axes, one line per series in the colours of matplotlib's default cycle, and a legend (upper
/// right) of the series whose label is not empty. With `log_y` the y axis is logarithmic.
///
/// The axes span the data: x exactly, y with a 5% margin (in log space on a log axis).
///
/// On a log axis, points whose y is zero or negative cannot be drawn and are left out, silently;
/// only if no point at all remains is that an error.
///
/// # Errors
/// - [`Error::InvalidConfig`] when `series` is empty, every series is empty, a coordinate is not
///   finite (the message names the series and the point), or on a log axis no y is positive.
/// - [`Error::Io`] naming `path` when the file cannot be written (its folder must exist), or,
///   which should not happen, when drawing the chart fails.
pub fn save_line_chart(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    log_y: bool,
    series: &[Series],
) -> Result<()> {
    let styled: Vec<StyledSeries> = series
        .iter()
        .zip(PALETTE.iter().cycle())
        .map(|(&series, colour)| StyledSeries { series, style: colour.stroke_width(2), legend_width: 2 })
        .collect();
    save_styled(path, ChartText { title, x_label, y_label }, log_y, &styled)
}

/// Writes the training loss curve PNG: the raw per-step loss as a thin, light line and its
/// exponential moving average as a bold one, on a log-scale y axis; x is the step.
///
/// The average is TensorBoard's smoothing with weight `w = `[`LOSS_SMOOTHING`], bias-corrected
/// as Adam's moments are: `m_i = w·m_{i−1} + (1 − w)·loss_i` from `m_0 = 0`, drawn as
/// `m_i / (1 − w^i)`, so the first point is the first loss rather than 2% of it.
///
/// Zero or negative losses cannot be drawn on the log axis and are left out of both lines
/// (the average still includes them), as [`save_line_chart`] does.
///
/// # Errors
/// - [`Error::InvalidConfig`] when `steps` and `losses` differ in length, are empty, a loss is not
///   finite (the message names its step), or no loss is positive.
/// - [`Error::Io`] naming `path` when the file cannot be written (its folder must exist), or,
///   which should not happen, when drawing the chart fails.
pub fn save_loss_curve(path: &Path, steps: &[u64], losses: &[f64]) -> Result<()> {
    if steps.len() != losses.len() {
        return Err(Error::config(
            "loss curve",
            format!("{} steps but {} losses; give one loss per step", steps.len(), losses.len()),
        ));
    }
    if losses.is_empty() {
        return Err(Error::config("loss curve", "no losses to draw"));
    }
    if let Some(i) = losses.iter().position(|loss| !loss.is_finite()) {
        return Err(Error::config(
            "loss curve",
            format!("the loss at step {} is {}; only finite losses can be drawn", steps[i], losses[i]),
        ));
    }
    // Steps beyond 2^53 would round; no run gets near that.
    let x: Vec<f64> = steps.iter().map(|&step| step as f64).collect();
    let raw: Vec<(f64, f64)> = x.iter().copied().zip(losses.iter().copied()).collect();
    let smoothed: Vec<(f64, f64)> = x.iter().copied().zip(ema_debiased(losses, LOSS_SMOOTHING)).collect();
    let colour = PALETTE[0];
    let styled = [
        StyledSeries {
            series: Series { label: "loss per step", points: &raw },
            style: colour.mix(0.4).stroke_width(1),
            legend_width: 2,
        },
        StyledSeries {
            series: Series { label: "EMA (smoothing 0.98)", points: &smoothed },
            style: colour.stroke_width(2),
            legend_width: 2,
        },
    ];
    let text = ChartText { title: "Training loss", x_label: "step", y_label: "loss (log scale)" };
    save_styled(path, text, true, &styled)
}

/// TensorBoard's bias-corrected exponential moving average of `values` with weight `smoothing`
/// on the previous value: `m_i = smoothing·m_{i−1} + (1 − smoothing)·v_i`, `m_0 = 0`, returned as
/// `m_i / (1 − smoothing^i)` (i from 1). A constant series stays constant.
fn ema_debiased(values: &[f64], smoothing: f64) -> Vec<f64> {
    let mut m = 0.0;
    let mut weight_of_m0 = 1.0; // smoothing^i: the share of the (zero) start value left in m_i
    values
        .iter()
        .map(|&v| {
            m = smoothing * m + (1.0 - smoothing) * v;
            weight_of_m0 *= smoothing;
            m / (1.0 - weight_of_m0)
        })
        .collect()
}

/// The words on a chart.
#[derive(Clone, Copy)]
struct ChartText<'a> {
    title: &'a str,
    x_label: &'a str,
    y_label: &'a str,
}

/// A series with the line it is drawn with.
struct StyledSeries<'a> {
    series: Series<'a>,
    style: ShapeStyle,
    /// Stroke width of the series' sample line in the legend (a hairline is hard to see there).
    legend_width: u32,
}

/// A series ready to draw: points in plot space (y as `log10(y)` on a log axis).
struct Line<'a> {
    label: &'a str,
    points: Vec<(f64, f64)>,
    style: ShapeStyle,
    legend_style: ShapeStyle,
}

/// One axis: the plotted range, the labelled ticks and the positions of light grid lines, all
/// in plot space.
struct Axis {
    range: Range<f64>,
    ticks: Vec<Tick>,
    minor: Vec<f64>,
}

/// A labelled tick, at `at` in plot space.
#[derive(Debug, Clone, PartialEq)]
struct Tick {
    at: f64,
    label: String,
}

impl Axis {
    /// The label of the tick at `at` (`plotters` hands back the positions it was given).
    fn label_at(&self, at: f64) -> String {
        self.ticks
            .iter()
            .min_by(|a, b| (a.at - at).abs().total_cmp(&(b.at - at).abs()))
            .map_or_else(String::new, |tick| tick.label.clone())
    }
}

/// A linear map of plot space onto pixels, with the ticks chosen here (bold grid lines and
/// labels) and the light grid lines.
impl Ranged for Axis {
    type FormatOption = NoDefaultFormatting;
    type ValueType = f64;

    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        // As plotters' own f64 axis: round towards the start of the pixel range.
        let fraction = (value - self.range.start) / (self.range.end - self.range.start);
        let pixels = f64::from(limit.1 - limit.0) * fraction;
        let offset = if limit.1 >= limit.0 { (pixels + 1e-3).floor() } else { (pixels - 1e-3).ceil() };
        limit.0 + offset as i32
    }

    fn key_points<Hint: KeyPointHint>(&self, hint: Hint) -> Vec<f64> {
        if hint.weight().allow_light_points() {
            self.minor.clone()
        } else {
            self.ticks.iter().map(|tick| tick.at).collect()
        }
    }

    fn range(&self) -> Range<f64> {
        self.range.clone()
    }
}

impl ValueFormatter<f64> for Axis {
    fn format_ext(&self, value: &f64) -> String {
        self.label_at(*value)
    }
}

/// Validates `series`, then draws and writes the chart (see [`save_line_chart`]).
fn save_styled(path: &Path, text: ChartText, log_y: bool, series: &[StyledSeries]) -> Result<()> {
    let lines = prepare_lines(series, log_y)?;
    let points = || lines.iter().flat_map(|line| line.points.iter());
    let (x_min, x_max) = min_max(points().map(|p| p.0));
    let (y_min, y_max) = min_max(points().map(|p| p.1));
    let x_range = padded(x_min, x_max, 0.0, degenerate_pad(x_min));
    let x = Axis { ticks: linear_ticks(&x_range, 8), range: x_range, minor: Vec::new() };
    let y = if log_y {
        let range = padded(y_min, y_max, 0.05, 0.5);
        let (ticks, minor) = log_ticks(&range);
        Axis { range, ticks, minor }
    } else {
        let range = padded(y_min, y_max, 0.05, degenerate_pad(y_min));
        Axis { ticks: linear_ticks(&range, 6), range, minor: Vec::new() }
    };
    if !register_font() {
        return Err(Error::io(path, std::io::Error::other("the embedded chart font did not load")));
    }
    let png = render_png(text, x, y, &lines)
        .map_err(|e| Error::io(path, std::io::Error::other(format!("drawing the chart failed: {e}"))))?;
    crate::files::write_atomic(path, &png)
}

/// Checks the points and moves them to plot space, dropping non-positive y on a log axis.
fn prepare_lines<'a>(series: &[StyledSeries<'a>], log_y: bool) -> Result<Vec<Line<'a>>> {
    if series.is_empty() {
        return Err(Error::config("chart", "no series to draw"));
    }
    let mut dropped = 0usize;
    let mut lines = Vec::with_capacity(series.len());
    for styled in series {
        let Series { label, points } = styled.series;
        let mut kept = Vec::with_capacity(points.len());
        for (i, &(x, y)) in points.iter().enumerate() {
            if !x.is_finite() || !y.is_finite() {
                return Err(Error::config(
                    "chart",
                    format!("point {i} of series \"{label}\" is ({x}, {y}); coordinates must be finite"),
                ));
            }
            if log_y && y <= 0.0 {
                dropped += 1;
                continue;
            }
            kept.push((x, if log_y { y.log10() } else { y }));
        }
        // Widths are given in chart pixels; the drawing is supersampled.
        let style = ShapeStyle { stroke_width: px(styled.style.stroke_width), ..styled.style };
        let legend_style = ShapeStyle { stroke_width: px(styled.legend_width), ..styled.style };
        lines.push(Line { label, points: kept, style, legend_style });
    }
    if lines.iter().all(|line| line.points.is_empty()) {
        let reason = if dropped > 0 {
            "no y value is positive, so nothing can be drawn on a log axis"
        } else {
            "every series is empty"
        };
        return Err(Error::config("chart", reason));
    }
    Ok(lines)
}

/// Smallest and largest of a non-empty sequence of finite numbers.
fn min_max(values: impl Iterator<Item = f64>) -> (f64, f64) {
    values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)))
}

/// `[lo, hi]` widened by `margin` of its width on each side, or by `pad` if it is a single point.
fn padded(lo: f64, hi: f64, margin: f64, pad: f64) -> Range<f64> {
    let pad = if hi > lo { (hi - lo) * margin } else { pad };
    (lo - pad)..(hi + pad)
}

/// Half-width given to a linear axis whose data is the single value `v`.
fn degenerate_pad(v: f64) -> f64 {
    if v == 0.0 {
        1.0
    } else {
        v.abs() * 0.1
    }
}

/// Ticks at the multiples of a "nice" step (1, 2 or 5 times a power of ten) inside `range`,
/// about `target` of them, labelled with as many decimals as the step needs.
fn linear_ticks(range: &Range<f64>, target: usize) -> Vec<Tick> {
    label_ticks(&linear_values(range, target), false)
}

/// A tick before it is labelled: its value (in data space) and the decimals it needs.
#[derive(Debug, Clone, Copy)]
struct TickValue {
    value: f64,
    decimals: usize,
}

/// The values of [`linear_ticks`].
fn linear_values(range: &Range<f64>, target: usize) -> Vec<TickValue> {
    let step = nice_step((range.end - range.start) / target as f64);
    if !step.is_finite() || step <= 0.0 {
        return Vec::new();
    }
    // The slack keeps an end of the range that is a multiple of the step despite rounding.
    let first = (range.start / step - 1e-9).ceil();
    let last = (range.end / step + 1e-9).floor();
    if !(first <= last && last - first <= 100.0) {
        // Only for a range so narrow that its ends are the same to 1e-9: leave it unlabelled.
        return Vec::new();
    }
    let decimals = decimals_for(step);
    (0..=(last - first) as i64).map(|k| TickValue { value: (first + k as f64) * step, decimals }).collect()
}

/// Labels `values`, placing them at `log10(value)` on a log axis. An axis is labelled all in
/// scientific notation (`2e5`, `2.5e-6`) or not at all, and in it when a label would otherwise
/// be long: a value from a million up, or more than four decimals.
fn label_ticks(values: &[TickValue], log: bool) -> Vec<Tick> {
    let scientific = values.iter().any(|t| t.value.abs() >= 1e6 || t.decimals > 4);
    values
        .iter()
        .map(|t| Tick {
            at: if log { t.value.log10() } else { t.value },
            label: format_tick(t.value, t.decimals, scientific),
        })
        .collect()
}

/// The smallest of 1, 2, 5 or 10 times a power of ten that is at least `raw`.
fn nice_step(raw: f64) -> f64 {
    let magnitude = 10f64.powf(raw.log10().floor());
    let mantissa = raw / magnitude;
    let nice = if mantissa <= 1.0 {
        1.0
    } else if mantissa <= 2.0 {
        2.0
    } else if mantissa <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * magnitude
}

/// Decimals needed to write the multiples of `step` (a nice step) exactly.
fn decimals_for(step: f64) -> usize {
    (-step.log10().floor()).max(0.0) as usize
}

/// Ticks and light grid lines of a log axis whose plot range is `range` (in `log10` units); see
/// the module documentation for the choice.
fn log_ticks(range: &Range<f64>) -> (Vec<Tick>, Vec<f64>) {
    let (lo, hi) = (range.start, range.end);
    let inside = |value: f64| value.log10() >= lo - 1e-9 && value.log10() <= hi + 1e-9;
    let decade_value =
        |k: i32, m: f64| TickValue { value: m * 10f64.powi(k), decimals: (-k).max(0) as usize };
    // Decades whose power of ten lies inside the range, and every decade the range touches.
    let (first, last) = ((lo - 1e-9).ceil() as i32, (hi + 1e-9).floor() as i32);
    let touched = (lo.floor() as i32)..=(hi.ceil() as i32);

    let decades = (last - first + 1).max(0);
    let values: Vec<TickValue> = if decades >= 3 {
        let stride = (decades + 7) / 8; // at most 8 labels
        (first..=last).filter(|k| (k - first) % stride == 0).map(|k| decade_value(k, 1.0)).collect()
    } else {
        let one_two_five: Vec<TickValue> = touched
            .clone()
            .flat_map(|k| [1.0, 2.0, 5.0].map(|m| decade_value(k, m)))
            .filter(|t| inside(t.value))
            .collect();
        if one_two_five.len() >= 3 {
            one_two_five
        } else {
            let data_range = 10f64.powf(lo)..10f64.powf(hi);
            linear_values(&data_range, 5).into_iter().filter(|t| t.value > 0.0).collect()
        }
    };
    let ticks = label_ticks(&values, true);

    let minor = if hi - lo <= 8.0 {
        touched
            .flat_map(|k| (1..=9).map(move |m| (f64::from(m) * 10f64.powi(k)).log10()))
            .filter(|&at| at >= lo && at <= hi && !ticks.iter().any(|t| (t.at - at).abs() < 1e-9))
            .collect()
    } else {
        Vec::new()
    };
    (ticks, minor)
}

/// `v` with `decimals` decimals, or in scientific notation with as many significant digits
/// (trailing zeros dropped: `2e5`, `2.5e-6`).
fn format_tick(v: f64, decimals: usize, scientific: bool) -> String {
    let v = if v == 0.0 { 0.0 } else { v }; // no "-0"
    if !scientific || v == 0.0 {
        return format!("{v:.decimals$}");
    }
    let exponent = v.abs().log10().floor() as i64;
    let digits = (exponent + decimals as i64).clamp(0, 6) as usize;
    let text = format!("{v:.digits$e}");
    match text.split_once('e') {
        Some((mantissa, exponent)) if mantissa.contains('.') => {
            format!("{}e{exponent}", mantissa.trim_end_matches('0').trim_end_matches('.'))
        }
        _ => text,
    }
}

/// Registers the embedded font with `plotters` once; false if it failed to load (it cannot,
/// unless the font file in the crate is damaged: a test draws a chart).
fn register_font() -> bool {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    *REGISTERED.get_or_init(|| plotters::style::register_font(FONT_FAMILY, FontStyle::Normal, FONT).is_ok())
}

/// Draws the chart at [`SUPERSAMPLE`] times the size into an RGB bitmap, shrinks it to
/// [`WIDTH`]×[`HEIGHT`] and encodes it as PNG bytes.
fn render_png(
    text: ChartText,
    x: Axis,
    y: Axis,
    lines: &[Line],
) -> std::result::Result<Vec<u8>, Box<dyn std::error::Error>> {
    let (width, height) = (px(WIDTH), px(HEIGHT));
    let mut pixels = vec![0u8; (width * height * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut pixels, (width, height)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(text.title, (FONT_FAMILY, px(24)))
            .margin(px(16))
            .x_label_area_size(px(48))
            .y_label_area_size(px(72))
            .build_cartesian_2d(x, y)?;
        chart
            .configure_mesh()
            .x_desc(text.x_label)
            .y_desc(text.y_label)
            .label_style((FONT_FAMILY, px(15)))
            .axis_desc_style((FONT_FAMILY, px(17)))
            .set_all_tick_mark_size(px(5))
            // plotters centres a label's em box, not its digits, on the tick, which leaves digits
            // about 0.2 em too high.
            .y_label_offset(px(3))
            .bold_line_style(BLACK.mix(0.15).stroke_width(px(1)))
            .light_line_style(BLACK.mix(0.06).stroke_width(px(1)))
            .axis_style(BLACK.mix(0.8).stroke_width(px(1)))
            .draw()?;

        let legend_line = px(24) as i32;
        for line in lines {
            let drawn = chart.draw_series(LineSeries::new(line.points.iter().copied(), line.style))?;
            if !line.label.is_empty() {
                let legend_style = line.legend_style;
                drawn
                    .label(line.label)
                    .legend(move |(x, y)| PathElement::new([(x, y), (x + legend_line, y)], legend_style));
            }
        }
        if lines.iter().any(|line| !line.label.is_empty()) {
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperRight)
                .margin(px(10))
                .legend_area_size(px(32))
                .label_font((FONT_FAMILY, px(15)))
                .background_style(WHITE.mix(0.9))
                .border_style(BLACK.mix(0.3).stroke_width(px(1)))
                .draw()?;
        }
        root.present()?;
    }
    let pixels = shrink(&pixels, WIDTH, HEIGHT, SUPERSAMPLE);
    let mut png = Vec::new();
    image::codecs::png::PngEncoder::new(&mut png).write_image(
        &pixels,
        WIDTH,
        HEIGHT,
        ExtendedColorType::Rgb8,
    )?;
    Ok(png)
}

/// `n` chart pixels in pixels of the supersampled drawing.
fn px(n: u32) -> u32 {
    n * SUPERSAMPLE
}

/// Averages each `factor`×`factor` block of an RGB image `factor` times `width`×`height` into
/// one pixel (a box filter), rounding to nearest.
fn shrink(pixels: &[u8], width: u32, height: u32, factor: u32) -> Vec<u8> {
    let (width, height, factor) = (width as usize, height as usize, factor as usize);
    let big_row = width * factor * 3;
    let block = (factor * factor) as u32;
    let mut small = Vec::with_capacity(width * height * 3);
    for row in 0..height {
        for col in 0..width {
            for channel in 0..3 {
                let mut sum = 0u32;
                for dy in 0..factor {
                    for dx in 0..factor {
                        sum += u32::from(
                            pixels[(row * factor + dy) * big_row + (col * factor + dx) * 3 + channel],
                        );
                    }
                }
                // The mean of u8 values fits in a u8.
                small.push(((sum + block / 2) / block) as u8);
            }
        }
    }
    small
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A noisy, decreasing loss like a diffusion model's: `0.03 + 0.9·exp(−step/400)` times
    /// log-normal noise, from a fixed seed.
    fn synthetic_loss(n: u64) -> (Vec<u64>, Vec<f64>) {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let steps: Vec<u64> = (0..n).collect();
        let losses = steps
            .iter()
            .map(|&s| {
                let noise = (0.4 * (rng.random::<f64>() - 0.5)).exp();
                (0.03 + 0.9 * (-(s as f64) / 400.0).exp()) * noise
            })
            .collect();
        (steps, losses)
    }

    fn decode(path: &Path) -> image::RgbImage {
        image::open(path).expect("the chart decodes as an image").to_rgb8()
    }

    fn has_pixel(png: &image::RgbImage, colour: RGBColor) -> bool {
        png.pixels().any(|p| p.0 == [colour.0, colour.1, colour.2])
    }

    #[test]
    fn a_two_series_chart_decodes_to_the_chart_size_with_both_colours() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("chart.png");
        let a: Vec<(f64, f64)> = (0..50).map(|i| (f64::from(i), f64::from(i * i))).collect();
        let b: Vec<(f64, f64)> = (0..50).map(|i| (f64::from(i), 2000.0 - 30.0 * f64::from(i))).collect();
        let series = [Series { label: "square", points: &a }, Series { label: "falling", points: &b }];
        save_line_chart(&path, "Two series", "x", "y", false, &series).expect("chart written");

        let png = decode(&path);
        assert_eq!(png.dimensions(), (WIDTH, HEIGHT));
        assert!(has_pixel(&png, PALETTE[0]) && has_pixel(&png, PALETTE[1]), "both lines drawn");
        let distinct: std::collections::HashSet<[u8; 3]> = png.pixels().map(|p| p.0).collect();
        assert!(distinct.len() > 20, "antialiased text gives many colours, got {}", distinct.len());
    }

    #[test]
    fn the_loss_curve_of_a_decreasing_series_is_written() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("loss.png");
        let (steps, losses) = synthetic_loss(2000);
        save_loss_curve(&path, &steps, &losses).expect("loss curve written");
        let png = decode(&path);
        assert_eq!(png.dimensions(), (WIDTH, HEIGHT));
        assert!(has_pixel(&png, PALETTE[0]), "the EMA line is drawn in the first colour");
    }

    #[test]
    fn a_single_point_still_draws() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("one.png");
        save_loss_curve(&path, &[5], &[0.25]).expect("one loss");
        let points = [(0.0, 0.0)];
        save_line_chart(&path, "t", "x", "y", false, &[Series { label: "", points: &points }])
            .expect("one point on a linear axis");
    }

    #[test]
    fn non_positive_values_are_left_out_of_a_log_chart_while_one_remains() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("log.png");
        let points = [(0.0, 0.0), (1.0, -1.0), (2.0, 0.5), (3.0, 0.1)];
        save_line_chart(&path, "t", "x", "y", true, &[Series { label: "s", points: &points }])
            .expect("two positive points remain");

        let none_positive = [(0.0, 0.0), (1.0, -1.0)];
        let err =
            save_line_chart(&path, "t", "x", "y", true, &[Series { label: "s", points: &none_positive }])
                .expect_err("nothing to draw");
        assert!(matches!(err, Error::InvalidConfig { .. }), "{err}");
    }

    #[test]
    fn invalid_input_is_a_config_error() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("bad.png");
        let is_config = |r: Result<()>| matches!(r, Err(Error::InvalidConfig { .. }));

        assert!(is_config(save_line_chart(&path, "t", "x", "y", false, &[])), "no series");
        let empty = Series { label: "empty", points: &[] };
        assert!(is_config(save_line_chart(&path, "t", "x", "y", false, &[empty, empty])), "all empty");
        let nan = [(0.0, 1.0), (1.0, f64::NAN)];
        let err = save_line_chart(&path, "t", "x", "y", false, &[Series { label: "nan", points: &nan }])
            .expect_err("NaN refused");
        assert!(err.to_string().contains("point 1 of series \"nan\""), "{err}");
        let inf = [(f64::INFINITY, 1.0)];
        assert!(is_config(save_line_chart(
            &path,
            "t",
            "x",
            "y",
            true,
            &[Series { label: "i", points: &inf }]
        )));

        assert!(is_config(save_loss_curve(&path, &[], &[])), "no losses");
        assert!(is_config(save_loss_curve(&path, &[0, 1], &[1.0])), "lengths differ");
        let err = save_loss_curve(&path, &[10, 20], &[1.0, f64::NAN]).expect_err("NaN loss");
        assert!(err.to_string().contains("step 20"), "{err}");
        assert!(is_config(save_loss_curve(&path, &[1, 2], &[0.0, -1.0])), "nothing positive");
        assert!(!path.exists(), "no file is written for refused input");
    }

    #[test]
    fn writing_into_a_missing_folder_is_an_io_error_naming_the_path() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("missing").join("loss.png");
        let err = save_loss_curve(&path, &[0, 1], &[1.0, 0.5]).expect_err("no folder");
        assert!(matches!(err, Error::Io { .. }), "{err}");
        assert!(err.to_string().contains("missing"), "{err}");
    }

    #[test]
    fn the_ema_is_bias_corrected() {
        // By hand with w = 0.5: m = 0.5, 0.5·0.5 + 0.5·2 = 1.25; corrected 0.5/0.5, 1.25/0.75.
        let ema = ema_debiased(&[1.0, 2.0], 0.5);
        assert!((ema[0] - 1.0).abs() < 1e-12 && (ema[1] - 1.25 / 0.75).abs() < 1e-12, "{ema:?}");
        let constant = ema_debiased(&[0.3; 500], LOSS_SMOOTHING);
        assert!(constant.iter().all(|v| (v - 0.3).abs() < 1e-12), "a constant stays constant");
    }

    fn labels(ticks: &[Tick]) -> Vec<&str> {
        ticks.iter().map(|t| t.label.as_str()).collect()
    }

    #[test]
    fn linear_ticks_are_nice_multiples() {
        assert_eq!(labels(&linear_ticks(&(0.0..1.0), 5)), ["0.0", "0.2", "0.4", "0.6", "0.8", "1.0"]);
        assert_eq!(labels(&linear_ticks(&(-3.0..1999.0), 8)), ["0", "500", "1000", "1500"]);
        assert_eq!(labels(&linear_ticks(&(0.0..4e6), 4)), ["0", "1e6", "2e6", "3e6", "4e6"]);
        assert_eq!(labels(&linear_ticks(&(1e5..1e6), 5)), ["2e5", "4e5", "6e5", "8e5", "1e6"]);
        assert_eq!(
            labels(&linear_ticks(&(-1.5..1.5), 6)),
            ["-1.5", "-1.0", "-0.5", "0.0", "0.5", "1.0", "1.5"]
        );
        assert_eq!(labels(&linear_ticks(&(1e-5..5e-5), 4)), ["1e-5", "2e-5", "3e-5", "4e-5", "5e-5"]);
    }

    #[test]
    fn log_ticks_fit_the_span() {
        let decades = |lo: f64, hi: f64| lo.log10()..hi.log10();
        let (ticks, minor) = log_ticks(&decades(1e-4, 2.0));
        assert_eq!(labels(&ticks), ["0.0001", "0.001", "0.01", "0.1", "1"]);
        assert!(minor.len() > 20, "2…9 times each power of ten");
        let (ticks, _) = log_ticks(&decades(0.015, 0.6));
        assert_eq!(labels(&ticks), ["0.02", "0.05", "0.1", "0.2", "0.5"]);
        let (ticks, _) = log_ticks(&decades(0.031, 0.049));
        assert_eq!(labels(&ticks), ["0.035", "0.040", "0.045"]);
        let (ticks, _) = log_ticks(&decades(1e-9, 1e9));
        assert!(ticks.len() <= 8 && ticks[0].label == "1e-9", "{:?}", labels(&ticks));
    }

    /// Renders example charts for a person to look at: `cargo test --release --lib io::plot --
    /// --ignored`, then open `loss_example.png` and `line_example.png` in the temp folder.
    #[test]
    #[ignore = "writes example PNGs to the temp folder for inspection"]
    fn render_examples_for_inspection() {
        let dir = std::env::temp_dir();
        let (steps, losses) = synthetic_loss(3000);
        save_loss_curve(&dir.join("loss_example.png"), &steps, &losses).expect("loss example");
        let train: Vec<(f64, f64)> =
            (1..=20).map(|i| (f64::from(i) * 5e4, 12.0 / f64::from(i).sqrt())).collect();
        let ema: Vec<(f64, f64)> =
            (1..=20).map(|i| (f64::from(i) * 5e4, 9.0 / f64::from(i).sqrt())).collect();
        let series =
            [Series { label: "FID (model)", points: &train }, Series { label: "FID (EMA)", points: &ema }];
        save_line_chart(&dir.join("line_example.png"), "FID during training", "step", "FID", false, &series)
            .expect("line example");
    }
}
