//! The optional GPU back end (cargo feature `wgpu`): matrix products and the convolutions built
//! on them, as wgpu compute shaders. docs/gpu.md has the design, the tolerances and the figures.
//!
//! | shader         | computes                                                             |
//! |----------------|----------------------------------------------------------------------|
//! | `matmul.wgsl`  | batched strided `C = α·A@B + β·C (+ bias)`, 64x64 tiles, 4x4 per thread |
//! | `conv.wgsl`    | `im2col` and `col2im` (a gather, so no atomics), as in kernels/conv.rs |
//!
//! Each call is one round trip: upload the operands, record every pass in one command buffer,
//! submit, wait, read the result back. Tensors live on the CPU between calls (the tape, the
//! optimiser and every other op stay there), so what is offloaded is chosen by
//! [`crate::device::offload`]: products large enough to pay for the transfer. Buffers come from
//! a pool keyed by usage and power-of-two size, so a training loop stops allocating after its
//! first step; the pipelines are compiled once, when [`init`] runs.
//!
//! Every entry point first asks [`offload`] whether the GPU is selected and the product large
//! enough; it returns `false`, having done nothing, when not, or when an operand is larger than
//! one storage binding allows on this adapter. The caller then runs its CPU kernel, unchanged.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use ndarray::{Array3, ArrayView3};

use crate::device::offload;
use crate::kernels::Conv2dGeom;

/// Threads in one workgroup of the elementwise shaders (`im2col`, `col2im`).
const ELEMENTWISE_GROUP: u32 = 256;
/// Rows and columns of C computed by one workgroup of the matmul shader.
const GEMM_TILE: usize = 64;
/// The most workgroups along one dimension of a dispatch (WebGPU's default limit).
const MAX_GROUPS: u32 = 65_535;
/// The weight gradient is summed from at most this many partial products per call (as on the
/// CPU), so the reduction over the batch still fills the GPU with workgroups.
const MAX_WEIGHT_PARTIALS: usize = 16;
/// A patch matrix is built for at most this many bytes of images at a time.
const MAX_COL_BYTES: u64 = 256 << 20;

/// The adapter the GPU back end runs on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdapterInfo {
    /// The adapter's name, e.g. `NVIDIA H200` or `llvmpipe (LLVM 15.0.6, 256 bits)`.
    pub name: String,
    /// The graphics API wgpu drives it through (Vulkan, Metal, Dx12).
    pub backend: String,
    /// Discrete, integrated, virtual, CPU or other.
    pub kind: String,
    /// Whether it is a software renderer running on the CPU (lavapipe, SwiftShader, WARP).
    pub software: bool,
}

impl fmt::Display for AdapterInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}, {})", self.name, self.backend, self.kind)
    }
}

/// Products and convolutions run on the GPU so far in this process.
static CALLS: AtomicU64 = AtomicU64::new(0);

/// Number of products and convolutions the GPU has run in this process (the CLI reports it, and
/// the tests check with it that the GPU path really ran).
pub fn calls() -> u64 {
    CALLS.load(Ordering::Relaxed)
}

/// Parameters of `matmul.wgsl`, field for field (see the shader for their meaning).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
struct GemmParams {
    m: u32,
    n: u32,
    k: u32,
    k_inner: u32,
    a_off: u32,
    a_bs: u32,
    a_ms: u32,
    a_ks: u32,
    a_kos: u32,
    b_off: u32,
    b_bs: u32,
    b_ks: u32,
    b_kos: u32,
    b_ns: u32,
    c_off: u32,
    c_bs: u32,
    c_ms: u32,
    flags: u32,
    alpha: f32,
    beta: f32,
}

/// `flags` bit: add `beta · C`.
const READ_C: u32 = 1;
/// `flags` bit: add `bias[row]`.
const ADD_BIAS: u32 = 2;

/// Parameters of `conv.wgsl`, field for field.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
struct GeomParams {
    n: u32,
    c_in: u32,
    h: u32,
    w: u32,
    kh: u32,
    kw: u32,
    stride: u32,
    pad_top: u32,
    pad_left: u32,
    out_h: u32,
    out_w: u32,
    src_off: u32,
    dst_off: u32,
    total: u32,
    groups_x: u32,
    pad: u32,
}

/// What a pooled buffer is for; buffers are reused only for the same purpose.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
enum Usage {
    /// Shader-visible data, written by uploads or shaders, copied out for read-back.
    Storage,
    /// Host-readable copy of a result.
    Readback,
    /// Shader parameters.
    Uniform,
}

/// Buffers no call is using, by usage and size (a power of two, at least 256 bytes).
#[derive(Default)]
struct Pool {
    free: HashMap<(Usage, u64), Vec<wgpu::Buffer>>,
}

struct Gpu {
    device: wgpu::Device,
    queue: wgpu::Queue,
    info: AdapterInfo,
    gemm: wgpu::ComputePipeline,
    im2col: wgpu::ComputePipeline,
    col2im: wgpu::ComputePipeline,
    /// The largest buffer one storage binding may cover, in bytes.
    max_binding: u64,
    pool: Mutex<Pool>,
}

static GPU: OnceLock<Result<Gpu, String>> = OnceLock::new();

/// Opens the best adapter (discrete, then integrated, virtual, other, software) and compiles the
/// shaders, once per process; later calls return the same adapter.
///
/// # Errors
/// Why there is no usable GPU: no adapter, or creating the device failed.
pub fn init() -> Result<AdapterInfo, String> {
    GPU.get_or_init(Gpu::new).as_ref().map(|g| g.info.clone()).map_err(Clone::clone)
}

/// The context [`init`] opened. Only the entry points below call it, and only after
/// [`crate::device::select`] chose the GPU, which it does only when [`init`] succeeded.
fn gpu() -> &'static Gpu {
    match GPU.get().map(Result::as_ref) {
        Some(Ok(g)) => g,
        _ => panic!("gpu: used before ddpm::device::select opened an adapter"),
    }
}

fn adapter_rank(kind: wgpu::DeviceType) -> u8 {
    match kind {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Other => 3,
        wgpu::DeviceType::Cpu => 4,
    }
}

impl Gpu {
    fn new() -> Result<Gpu, String> {
        let instance = wgpu::Instance::new(&wgpu::InstanceDescriptor {
            backends: wgpu::Backends::PRIMARY,
            ..wgpu::InstanceDescriptor::from_env_or_default()
        });
        let adapter = instance
            .enumerate_adapters(wgpu::Backends::PRIMARY)
            .into_iter()
            .min_by_key(|a| adapter_rank(a.get_info().device_type))
            .ok_or_else(|| "no Vulkan, Metal or DX12 adapter found".to_string())?;
        let raw = adapter.get_info();
        let info = AdapterInfo {
            name: raw.name.clone(),
            backend: format!("{:?}", raw.backend),
            kind: format!("{:?}", raw.device_type),
            software: raw.device_type == wgpu::DeviceType::Cpu,
        };
        // Ask for the adapter's own limits: the defaults cap a storage binding at 128 MiB.
        let limits = adapter.limits();
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("ddpm"),
            required_features: wgpu::Features::empty(),
            required_limits: limits.clone(),
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        }))
        .map_err(|e| format!("opening {info}: {e}"))?;
        let pipeline = |source: &str, entry: &str| {
            let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some(entry),
                source: wgpu::ShaderSource::Wgsl(source.into()),
            });
            device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(entry),
                layout: None,
                module: &module,
                entry_point: Some(entry),
                compilation_options: Default::default(),
                cache: None,
            })
        };
        let gemm = pipeline(include_str!("matmul.wgsl"), "main");
        let im2col = pipeline(include_str!("conv.wgsl"), "im2col");
        let col2im = pipeline(include_str!("conv.wgsl"), "col2im");
        let max_binding = u64::from(limits.max_storage_buffer_binding_size).min(limits.max_buffer_size);
        Ok(Gpu { device, queue, info, gemm, im2col, col2im, max_binding, pool: Mutex::default() })
    }

    /// Whether a buffer of `len` f32 can be bound (and its indices fit the shaders' u32).
    fn fits(&self, len: usize) -> bool {
        let bytes = (len.max(1) as u64 * 4).next_power_of_two().max(256);
        bytes <= self.max_binding && len < u32::MAX as usize
    }
}

/// One round trip: buffers taken from the pool, passes recorded into one encoder, then
/// [`Job::finish`] submits, waits, reads one buffer back and returns everything to the pool.
struct Job {
    gpu: &'static Gpu,
    encoder: wgpu::CommandEncoder,
    held: Vec<(Usage, u64, wgpu::Buffer)>,
}

impl Job {
    fn new() -> Job {
        let gpu = gpu();
        let encoder =
            gpu.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("ddpm") });
        Job { gpu, encoder, held: Vec::new() }
    }

    /// A pooled buffer of at least `bytes` bytes; its index in `held`.
    fn take(&mut self, usage: Usage, bytes: u64) -> usize {
        let size = bytes.next_power_of_two().max(256);
        // Cannot fail: nothing that can panic runs while the pool lock is held (a map lookup,
        // a pop or a push), so it is never poisoned.
        let reused = self
            .gpu
            .pool
            .lock()
            .expect("gpu buffer pool lock poisoned by a panicking thread")
            .free
            .get_mut(&(usage, size))
            .and_then(Vec::pop);
        let buffer = reused.unwrap_or_else(|| {
            let usage_flags = match usage {
                Usage::Storage => {
                    wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::COPY_SRC
                }
                Usage::Readback => wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                Usage::Uniform => wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            };
            self.gpu.device.create_buffer(&wgpu::BufferDescriptor {
                label: None,
                size,
                usage: usage_flags,
                mapped_at_creation: false,
            })
        });
        self.held.push((usage, size, buffer));
        self.held.len() - 1
    }

    /// A storage buffer holding `data`.
    fn upload(&mut self, data: &[f32]) -> usize {
        let i = self.take(Usage::Storage, (data.len().max(1) * 4) as u64);
        if !data.is_empty() {
            self.gpu.queue.write_buffer(&self.held[i].2, 0, bytemuck::cast_slice(data));
        }
        i
    }

    /// A storage buffer of `len` f32 whose contents are not initialised.
    fn scratch(&mut self, len: usize) -> usize {
        self.take(Usage::Storage, (len.max(1) * 4) as u64)
    }

    fn uniform<T: bytemuck::Pod>(&mut self, value: &T) -> usize {
        let i = self.take(Usage::Uniform, std::mem::size_of::<T>() as u64);
        self.gpu.queue.write_buffer(&self.held[i].2, 0, bytemuck::bytes_of(value));
        i
    }

    /// Records one compute pass: `pipeline` with `buffers` bound at bindings 0, 1, 2, ...
    fn dispatch(&mut self, pipeline: &wgpu::ComputePipeline, buffers: &[usize], groups: (u32, u32, u32)) {
        let entries: Vec<wgpu::BindGroupEntry<'_>> = buffers
            .iter()
            .enumerate()
            .map(|(binding, &i)| wgpu::BindGroupEntry {
                binding: binding as u32,
                resource: self.held[i].2.as_entire_binding(),
            })
            .collect();
        let bind_group = self.gpu.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &pipeline.get_bind_group_layout(0),
            entries: &entries,
        });
        let mut pass = self
            .encoder
            .begin_compute_pass(&wgpu::ComputePassDescriptor { label: None, timestamp_writes: None });
        pass.set_pipeline(pipeline);
        pass.set_bind_group(0, &bind_group, &[]);
        pass.dispatch_workgroups(groups.0, groups.1, groups.2);
    }

    /// `C = alpha·A@B + beta·C (+ bias)` for `batch` products, as `matmul.wgsl` reads `p`.
    fn gemm(&mut self, mut p: GemmParams, batch: usize, a: usize, b: usize, c: usize, bias: Option<usize>) {
        let gx = p.n.div_ceil(GEMM_TILE as u32);
        let gy = p.m.div_ceil(GEMM_TILE as u32);
        assert!(
            gx <= MAX_GROUPS && gy <= MAX_GROUPS,
            "gpu gemm: C is {}x{}, too large for one dispatch",
            p.m,
            p.n
        );
        let bias = bias.unwrap_or(c);
        let mut done = 0;
        while done < batch {
            let now = (batch - done).min(MAX_GROUPS as usize);
            let u = self.uniform(&p);
            // The bias binding is read only with ADD_BIAS; without it any buffer other than C
            // (a storage buffer bound read-only and read-write at once is refused) will do.
            let bias = if p.flags & ADD_BIAS != 0 { bias } else { a };
            let gpu = self.gpu;
            self.dispatch(&gpu.gemm, &[u, a, b, c, bias], (gx, gy, now as u32));
            done += now;
            p.a_off += p.a_bs * now as u32;
            p.b_off += p.b_bs * now as u32;
            p.c_off += p.c_bs * now as u32;
        }
    }

    /// One thread per element of `total`, over `conv.wgsl`'s `pipeline`.
    fn elementwise(&mut self, pipeline: &wgpu::ComputePipeline, mut p: GeomParams, src: usize, dst: usize) {
        let groups = p.total.div_ceil(ELEMENTWISE_GROUP);
        let gx = groups.min(MAX_GROUPS);
        p.groups_x = gx;
        let u = self.uniform(&p);
        self.dispatch(pipeline, &[u, src, dst], (gx, groups.div_ceil(gx), 1));
    }

    /// Submits, waits, copies buffer `i` (its first `out.len()` f32) into `out`, and returns
    /// every buffer to the pool.
    fn finish(mut self, i: usize, out: &mut [f32]) {
        let bytes = (out.len() * 4) as u64;
        let staging = self.take(Usage::Readback, bytes.max(4));
        if bytes > 0 {
            self.encoder.copy_buffer_to_buffer(&self.held[i].2, 0, &self.held[staging].2, 0, bytes);
        }
        let Job { gpu, encoder, held } = self;
        gpu.queue.submit([encoder.finish()]);
        if bytes > 0 {
            let slice = held[staging].2.slice(..bytes);
            let (tx, rx) = std::sync::mpsc::channel();
            slice.map_async(wgpu::MapMode::Read, move |r| {
                // The receiver waits below; it is gone only if this thread panicked.
                let _ = tx.send(r);
            });
            // Can fail at run time (device lost, driver error). Not recovered: falling back to
            // the CPU would need every entry point to report the failure; this panics with it.
            gpu.device.poll(wgpu::PollType::Wait).expect("gpu: waiting for the device failed (device lost?)");
            // Cannot fail: recv waits for the send, and wgpu calls every map_async callback (with
            // an error if the map failed), so the sender is never dropped unsent.
            rx.recv()
                .expect("gpu: the read-back callback did not run")
                // Can fail at run time like the poll above (device lost).
                .expect("gpu: mapping the read-back buffer failed");
            out.copy_from_slice(bytemuck::cast_slice(&slice.get_mapped_range()[..]));
            held[staging].2.unmap();
        }
        CALLS.fetch_add(1, Ordering::Relaxed);
        // Cannot fail: see Job::take; only pushes run under this lock.
        let mut pool = gpu.pool.lock().expect("gpu buffer pool lock poisoned by a panicking thread");
        for (usage, size, buffer) in held {
            pool.free.entry((usage, size)).or_default().push(buffer);
        }
    }
}

fn u(x: usize) -> u32 {
    u32::try_from(x).expect("gpu: an index exceeds u32 (checked by Gpu::fits before any call)")
}

/// [`crate::kernels::sgemm`] on the GPU (same arguments and layout); `false` if it declined.
#[allow(clippy::too_many_arguments)] // the BLAS signature, as in kernels::sgemm
pub(crate) fn sgemm(
    trans_a: bool,
    trans_b: bool,
    m: usize,
    k: usize,
    n: usize,
    alpha: f32,
    a: &[f32],
    b: &[f32],
    beta: f32,
    c: &mut [f32],
) -> bool {
    sgemm_batched(1, trans_a, trans_b, m, k, n, alpha, a, b, beta, c)
}

/// [`crate::kernels::sgemm_batched`] on the GPU (same arguments and layout); `false` if it
/// declined.
#[allow(clippy::too_many_arguments)] // the BLAS signature, as in kernels::sgemm_batched
pub(crate) fn sgemm_batched(
    batch: usize,
    trans_a: bool,
    trans_b: bool,
    m: usize,
    k: usize,
    n: usize,
    alpha: f32,
    a: &[f32],
    b: &[f32],
    beta: f32,
    c: &mut [f32],
) -> bool {
    if !offload(batch * m * k * n) {
        return false;
    }
    let g = gpu();
    if !(g.fits(a.len()) && g.fits(b.len()) && g.fits(c.len())) {
        return false;
    }
    let (a_ms, a_ks) = if trans_a { (1, m) } else { (k, 1) };
    let (b_ks, b_ns) = if trans_b { (1, k) } else { (n, 1) };
    let mut job = Job::new();
    let (ab, bb) = (job.upload(a), job.upload(b));
    let read_c = beta != 0.0;
    let cb = if read_c { job.upload(c) } else { job.scratch(c.len()) };
    let p = GemmParams {
        m: u(m),
        n: u(n),
        k: u(k),
        k_inner: u(k),
        a_bs: u(m * k),
        a_ms: u(a_ms),
        a_ks: u(a_ks),
        b_bs: u(k * n),
        b_ks: u(b_ks),
        b_ns: u(b_ns),
        c_bs: u(m * n),
        c_ms: u(n),
        flags: if read_c { READ_C } else { 0 },
        alpha,
        beta,
        ..GemmParams::default()
    };
    job.gemm(p, batch, ab, bb, cb, None);
    job.finish(cb, c);
    true
}

/// An ndarray view as a buffer and its strides: the view's own memory when it is contiguous
/// with non-negative strides (a transposed or permuted array is), else a standard-layout copy.
fn view_data<'a>(v: &'a ArrayView3<'_, f32>) -> (std::borrow::Cow<'a, [f32]>, [usize; 3]) {
    let strides = v.strides();
    if strides.iter().all(|&s| s >= 0) {
        if let Some(data) = v.as_slice_memory_order() {
            return (data.into(), [strides[0] as usize, strides[1] as usize, strides[2] as usize]);
        }
    }
    let (_, m, k) = v.dim();
    (v.iter().copied().collect::<Vec<f32>>().into(), [m * k, k, 1])
}

/// `a[i] @ b[i]` for every `i` of the leading axis, on ndarray views of any layout: the matmul
/// and linear ops call it with one item. `None` if it declined (the caller then uses ndarray's
/// product).
///
/// # Panics
/// If the batch or inner sizes differ.
pub(crate) fn bmm(a: ArrayView3<'_, f32>, b: ArrayView3<'_, f32>) -> Option<Array3<f32>> {
    let ((batch, m, k), (batch_b, k_b, n)) = (a.dim(), b.dim());
    assert!(batch == batch_b && k == k_b, "gpu bmm: {:?} @ {:?}", a.dim(), b.dim());
    if !offload(batch * m * k * n) {
        return None;
    }
    let g = gpu();
    let (ad, [a_bs, a_ms, a_ks]) = view_data(&a);
    let (bd, [b_bs, b_ks, b_ns]) = view_data(&b);
    let c_len = batch * m * n;
    if !(g.fits(ad.len()) && g.fits(bd.len()) && g.fits(c_len)) {
        return None;
    }
    let mut job = Job::new();
    let (ab, bb, cb) = (job.upload(&ad), job.upload(&bd), job.scratch(c_len));
    let p = GemmParams {
        m: u(m),
        n: u(n),
        k: u(k),
        k_inner: u(k),
        a_bs: u(a_bs),
        a_ms: u(a_ms),
        a_ks: u(a_ks),
        b_bs: u(b_bs),
        b_ks: u(b_ks),
        b_ns: u(b_ns),
        c_bs: u(m * n),
        c_ms: u(n),
        alpha: 1.0,
        ..GemmParams::default()
    };
    job.gemm(p, batch, ab, bb, cb, None);
    let mut c = Array3::zeros((batch, m, n));
    job.finish(cb, c.as_slice_mut().expect("Array3::zeros is in standard layout"));
    Some(c)
}

/// Whether the input, weight and output slices have the lengths the geometry needs (callers
/// check `x.len()` etc. with out_h(), which is safe only once [`plan`]'s checks passed, so this
/// computes the output size itself).
fn lens_match(g: &Conv2dGeom, x: &[f32], w: &[f32], y: &[f32]) -> bool {
    let out =
        |size: usize, pads: usize, k: usize| (size + pads).checked_sub(k).map(|d| d / g.stride.max(1) + 1);
    let y_len = out(g.h, g.pad_top + g.pad_bottom, g.kh)
        .zip(out(g.w, g.pad_left + g.pad_right, g.kw))
        .map(|(oh, ow)| g.n * g.c_out * oh * ow);
    x.len() == g.x_len() && w.len() == g.w_len() && Some(y.len()) == y_len
}

/// Sizes of a convolution as the shaders take them.
fn geom_params(g: &Conv2dGeom) -> GeomParams {
    GeomParams {
        c_in: u(g.c_in),
        h: u(g.h),
        w: u(g.w),
        kh: u(g.kh),
        kw: u(g.kw),
        stride: u(g.stride),
        pad_top: u(g.pad_top),
        pad_left: u(g.pad_left),
        out_h: u(g.out_h()),
        out_w: u(g.out_w()),
        ..GeomParams::default()
    }
}

/// The shape of a convolution's work: patch-matrix rows `K`, output pixels `P`, whether the
/// image is its own patch matrix, and how many images one patch-matrix buffer holds.
struct ConvPlan {
    k: usize,
    px: usize,
    pointwise: bool,
    chunk: usize,
}

/// Plans a convolution, or `None` (decline) when it is not to be offloaded: the GPU is not
/// selected, the convolution is too small, its geometry is degenerate or the slices do not match
/// it (the CPU kernel then panics naming the problem), or a buffer it needs cannot be bound.
fn plan(g: &Conv2dGeom, lens_match: bool) -> Option<(&'static Gpu, ConvPlan)> {
    let sizes = [g.n, g.c_in, g.h, g.w, g.c_out, g.kh, g.kw, g.stride];
    if !lens_match
        || sizes.contains(&0)
        || g.h + g.pad_top + g.pad_bottom < g.kh
        || g.w + g.pad_left + g.pad_right < g.kw
    {
        return None;
    }
    if !offload(g.n * g.w_len() * g.out_h() * g.out_w()) {
        return None;
    }
    let gpu = gpu();
    let (k, px) = (g.c_in * g.kh * g.kw, g.out_h() * g.out_w());
    let pointwise =
        g.kh == 1 && g.kw == 1 && g.stride == 1 && g.pad_top + g.pad_bottom + g.pad_left + g.pad_right == 0;
    let col_image_bytes = (k * px * 4) as u64;
    let mut chunk = if pointwise {
        g.n
    } else {
        ((gpu.max_binding.min(MAX_COL_BYTES) / col_image_bytes) as usize).min(g.n)
    };
    // The pool rounds sizes up to a power of two, which may not fit where the exact size did.
    while chunk > 1 && !gpu.fits(chunk * k * px) {
        chunk /= 2;
    }
    let ok = chunk > 0
        && [g.x_len(), g.y_len(), g.w_len(), g.c_out * k * MAX_WEIGHT_PARTIALS.min(g.n), chunk * k * px]
            .iter()
            .all(|&len| gpu.fits(len));
    ok.then_some((gpu, ConvPlan { k, px, pointwise, chunk }))
}

/// [`crate::kernels::conv2d_forward`] on the GPU: im2col, then `y_n = W @ col_n + bias` for all
/// images of a chunk in one batched product. `false` if it declined.
pub(crate) fn conv2d_forward(
    g: &Conv2dGeom,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    y: &mut [f32],
) -> bool {
    let lens_match = lens_match(g, x, w, y) && bias.is_none_or(|b| b.len() == g.c_out);
    let Some((gpu, ConvPlan { k, px, pointwise, chunk })) = plan(g, lens_match) else { return false };
    let (x_img, y_img) = (g.c_in * g.h * g.w, g.c_out * px);
    let mut job = Job::new();
    let (xb, wb, yb) = (job.upload(x), job.upload(w), job.scratch(y.len()));
    let bias_b = bias.map(|b| job.upload(b));
    let col = if pointwise { xb } else { job.scratch(chunk * k * px) };
    for n0 in (0..g.n).step_by(chunk) {
        let imgs = chunk.min(g.n - n0);
        let b_off = if pointwise {
            n0 * x_img
        } else {
            let p =
                GeomParams { n: u(imgs), src_off: u(n0 * x_img), total: u(imgs * k * px), ..geom_params(g) };
            job.elementwise(&gpu.im2col, p, xb, col);
            0
        };
        let p = GemmParams {
            m: u(g.c_out),
            n: u(px),
            k: u(k),
            k_inner: u(k),
            a_ms: u(k),
            a_ks: 1,
            b_off: u(b_off),
            b_bs: u(k * px),
            b_ks: u(px),
            b_ns: 1,
            c_off: u(n0 * y_img),
            c_bs: u(y_img),
            c_ms: u(px),
            flags: if bias.is_some() { ADD_BIAS } else { 0 },
            alpha: 1.0,
            ..GemmParams::default()
        };
        job.gemm(p, imgs, wb, col, yb, bias_b);
    }
    job.finish(yb, y);
    true
}

/// [`crate::kernels::conv2d_backward_input`] on the GPU: `dcol_n = Wᵀ @ dy_n` for the images of
/// a chunk in one batched product, then col2im. `false` if it declined.
pub(crate) fn conv2d_backward_input(g: &Conv2dGeom, dy: &[f32], w: &[f32], dx: &mut [f32]) -> bool {
    let Some((gpu, ConvPlan { k, px, pointwise, chunk })) = plan(g, lens_match(g, dx, w, dy)) else {
        return false;
    };
    let (x_img, y_img) = (g.c_in * g.h * g.w, g.c_out * px);
    let mut job = Job::new();
    let (dyb, wb, dxb) = (job.upload(dy), job.upload(w), job.scratch(dx.len()));
    let dcol = if pointwise { dxb } else { job.scratch(chunk * k * px) };
    for n0 in (0..g.n).step_by(chunk) {
        let imgs = chunk.min(g.n - n0);
        // Wᵀ: element (row kk, inner co) of the [C_out, K] weight is at co·K + kk.
        let p = GemmParams {
            m: u(k),
            n: u(px),
            k: u(g.c_out),
            k_inner: u(g.c_out),
            a_ms: 1,
            a_ks: u(k),
            b_off: u(n0 * y_img),
            b_bs: u(y_img),
            b_ks: u(px),
            b_ns: 1,
            c_off: u(if pointwise { n0 * x_img } else { 0 }),
            c_bs: u(k * px),
            c_ms: u(px),
            alpha: 1.0,
            ..GemmParams::default()
        };
        job.gemm(p, imgs, wb, dyb, dcol, None);
        if !pointwise {
            let p =
                GeomParams { n: u(imgs), dst_off: u(n0 * x_img), total: u(imgs * x_img), ..geom_params(g) };
            job.elementwise(&gpu.col2im, p, dcol, dxb);
        }
    }
    job.finish(dxb, dx);
    true
}

/// [`crate::kernels::conv2d_backward_weight`] on the GPU. `dW = Σ_n dy_n @ col_nᵀ` is one
/// product per group of images whose inner index runs over (image, pixel) pairs, giving up to
/// [`MAX_WEIGHT_PARTIALS`] partial sums that a last product with a row of ones adds up. `db` is
/// summed on the CPU exactly as the CPU kernel sums it. `false` if it declined.
pub(crate) fn conv2d_backward_weight(
    g: &Conv2dGeom,
    x: &[f32],
    dy: &[f32],
    dw: &mut [f32],
    db: Option<&mut [f32]>,
) -> bool {
    let lens_match = lens_match(g, x, dw, dy) && db.as_ref().is_none_or(|b| b.len() == g.c_out);
    let Some((gpu, ConvPlan { k, px, pointwise, chunk })) = plan(g, lens_match) else { return false };
    let (x_img, y_img, w_len) = (g.c_in * g.h * g.w, g.c_out * px, g.c_out * k);
    let mut job = Job::new();
    let (xb, dyb, dwb) = (job.upload(x), job.upload(dy), job.scratch(w_len));
    let col = if pointwise { xb } else { job.scratch(chunk * k * px) };
    let per_group = chunk.div_ceil(MAX_WEIGHT_PARTIALS);
    let partials = job.scratch(chunk.div_ceil(per_group) * w_len);
    let ones = job.upload(&[1.0; MAX_WEIGHT_PARTIALS]);
    for (c, n0) in (0..g.n).step_by(chunk).enumerate() {
        let imgs = chunk.min(g.n - n0);
        let (col_off, col_img) = if pointwise {
            (n0 * x_img, x_img)
        } else {
            let p =
                GeomParams { n: u(imgs), src_off: u(n0 * x_img), total: u(imgs * k * px), ..geom_params(g) };
            job.elementwise(&gpu.im2col, p, xb, col);
            (0, k * px)
        };
        // Groups of `per_group` images, then one shorter group for the rest.
        let (full, rest) = (imgs / per_group, imgs % per_group);
        for (group0, groups, group_len) in [(0, full, per_group), (full, usize::from(rest > 0), rest)] {
            if groups == 0 {
                continue;
            }
            let img0 = group0 * per_group;
            // dy as [C_out, (image, pixel)]: element (co, i·P + p) at i·C_out·P + co·P + p.
            // colᵀ as [(image, pixel), K]: element (i·P + p, kk) at i·K·P + kk·P + p.
            let p = GemmParams {
                m: u(g.c_out),
                n: u(k),
                k: u(group_len * px),
                k_inner: u(px),
                a_off: u((n0 + img0) * y_img),
                a_bs: u(per_group * y_img),
                a_ms: u(px),
                a_ks: 1,
                a_kos: u(y_img),
                b_off: u(col_off + img0 * col_img),
                b_bs: u(per_group * col_img),
                b_ks: 1,
                b_kos: u(col_img),
                b_ns: u(px),
                c_off: u(group0 * w_len),
                c_bs: u(w_len),
                c_ms: u(k),
                alpha: 1.0,
                ..GemmParams::default()
            };
            job.gemm(p, groups, dyb, col, partials, None);
        }
        // dW (+)= ones[1, G] @ partials[G, C_out·K].
        let n_partials = full + usize::from(rest > 0);
        let p = GemmParams {
            m: 1,
            n: u(w_len),
            k: u(n_partials),
            k_inner: u(n_partials),
            a_ks: 1,
            b_ks: u(w_len),
            b_ns: 1,
            c_ms: u(w_len),
            flags: if c > 0 { READ_C } else { 0 },
            alpha: 1.0,
            beta: 1.0,
            ..GemmParams::default()
        };
        job.gemm(p, 1, ones, partials, dwb, None);
    }
    job.finish(dwb, dw);
    if let Some(db) = db {
        // The CPU kernel's sum, in f64 in the same order: db is bit-identical to the CPU's.
        for (co, db_co) in db.iter_mut().enumerate() {
            let mut acc = 0.0f64;
            for n in 0..g.n {
                let start = n * y_img + co * px;
                acc += dy[start..start + px].iter().map(|&v| v as f64).sum::<f64>();
            }
            *db_co = acc as f32;
        }
    }
    true
}
