//! Convolutions as one matrix product over the batch on the CPU: the input's patches laid out as
//! the columns of a matrix (im2col) and multiplied by the kernel (`product.rs`), one Candle custom
//! op reading the input in place, then bias, residual and ReLU in one pass over the product (an
//! in-place op). Candle 0.11's own CPU convolution copies the batch to NHWC on one thread and runs
//! one small GEMM per tile per image, and a batch norm or ReLU after it is a fresh tensor each;
//! this is what ONNX Runtime does instead (docs/benchmarks.md has the figures). A GPU runs cuDNN's
//! (`cudnn.rs`); training keeps Candle's convolution, whose weights are variables.

use candle_core::{
    CpuStorage, CustomOp1, DType, Device, InplaceOp1, InplaceOp2, Layout, Module, Result, Shape, Tensor,
};
use candle_nn::Conv2d;
use rayon::prelude::*;

use super::cudnn::CudnnConv;
use super::product::{Products, with_operand};
use super::winograd::Winograd;

/// Fewer values than this are laid out (or finished) on one thread.
pub(crate) const PARALLEL_FROM: usize = 1 << 16;

/// Input and output channels from which a 3×3 stride 1 convolution runs by Winograd's algorithm:
/// its transforms cost a pass over the input and output, which the products' saving repays only
/// where there are channels enough (ResNet's 64 to 512; not the digits CNN's 16 and 32, where
/// it was a third slower).
const WINOGRAD_FROM: usize = 64;

/// How a 4-D activation is laid out: batch first (Candle's and PyTorch's NCHW), or channel first
/// (CNHW), where a convolution's product over the whole batch comes out as it is, with no copy to
/// put the batch first again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Planes {
    Nchw,
    Cnhw,
}

impl Planes {
    /// (images, channels) of a 4-D tensor whose first two dimensions are `a`, `b`.
    pub(crate) fn images_channels(self, a: usize, b: usize) -> (usize, usize) {
        match self {
            Planes::Nchw => (a, b),
            Planes::Cnhw => (b, a),
        }
    }

    /// Where (image, channel)'s plane lies among the `n·c` planes.
    pub(crate) fn plane(self, image: usize, channel: usize, n: usize, c: usize) -> usize {
        match self {
            Planes::Nchw => image * c + channel,
            Planes::Cnhw => channel * n + image,
        }
    }
}

/// Square kernel, stride and zero padding of a convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Window {
    pub size: usize,
    pub stride: usize,
    pub padding: usize,
}

impl Window {
    /// Output rows (or columns) for `input` of them.
    pub(crate) fn out(&self, input: usize) -> usize {
        (input + 2 * self.padding).saturating_sub(self.size) / self.stride + 1
    }
}

/// A convolution on the CPU as im2col + one matmul per call, with its bias (and, in ResNet, the
/// batch norm folded into kernel and bias) applied in the same pass as the ReLU.
pub(crate) struct GemmConv {
    /// The kernel as an (O, C·K·K) matrix, row-major, columns in the order of im2col's rows.
    kernel: Vec<f32>,
    bias: Vec<f32>,
    window: Window,
    /// The same convolution by Winograd's F(2×2, 3×3), where the window allows it and there are
    /// channels enough for it to pay.
    winograd: Option<Winograd>,
}

impl GemmConv {
    /// `weight` is (O, C, K, K); `bias` has O values.
    pub(crate) fn new(weight: &Tensor, bias: Vec<f32>, window: Window) -> Result<Self> {
        let (out_channels, in_channels, size, width) = weight.dims4()?;
        if size != width || size != window.size {
            candle_core::bail!("GemmConv takes square {0}×{0} kernels, not {size}×{width}", window.size);
        }
        if bias.len() != out_channels {
            candle_core::bail!("{} bias values for {out_channels} output channels", bias.len());
        }
        let kernel = weight.flatten_all()?.to_vec1::<f32>()?;
        let three = window.size == 3 && window.stride == 1 && window.padding == 1;
        let winograd =
            (three && in_channels.min(out_channels) >= WINOGRAD_FROM).then(|| Winograd::new(weight)).transpose()?;
        Ok(Self { kernel, bias, window, winograd })
    }

    /// The convolution of `xs` (laid out as `planes` says, on the CPU), then bias, then
    /// `residual` added (same shape as the output), then ReLU where `relu`. The output is
    /// channel first, (O, N, OH, OW).
    pub(crate) fn forward(&self, xs: &Tensor, planes: Planes, residual: Option<&Tensor>, relu: bool) -> Result<Tensor> {
        let finish = Finish { bias: &self.bias, relu };
        if let Some(winograd) = &self.winograd {
            return winograd.forward(xs, planes, residual, finish);
        }
        // (O, C·K·K) × (C·K·K, N·OH·OW): every output channel of every image in one product.
        let out_channels = self.bias.len();
        let out = xs.apply_op1_no_bwd(&Im2col { window: self.window, planes, kernel: &self.kernel, out_channels })?;
        let (a, b, h, w) = xs.dims4()?;
        let (n, _) = planes.images_channels(a, b);
        let out = out.reshape((out_channels, n, self.window.out(h), self.window.out(w)))?;
        match residual {
            Some(residual) => out.inplace_op2(residual, &finish)?,
            None => out.inplace_op1(&finish)?,
        }
        Ok(out)
    }
}

/// A stride-1 convolution with its bias, as the digits CNN has them: [`GemmConv`] on the CPU,
/// batch first in and out like Candle's; Candle's own convolution elsewhere and while training.
pub(crate) struct GemmConv2d {
    conv: Conv2d,
    gemm: GemmConv,
    /// The convolution, its bias and a ReLU as one cuDNN call, where the weights are on a GPU.
    gpu: Option<CudnnConv>,
}

impl GemmConv2d {
    pub(crate) fn new(conv: Conv2d) -> Result<Self> {
        let config = conv.config();
        if config.dilation != 1 || config.groups != 1 {
            candle_core::bail!("GemmConv2d takes dilation 1, one group");
        }
        let out_channels = conv.weight().dim(0)?;
        // The CPU computes in f32 whatever the model was loaded in.
        let bias = match conv.bias() {
            Some(bias) => bias.to_dtype(DType::F32)?.to_vec1::<f32>()?,
            None => vec![0.0; out_channels],
        };
        let window = Window { size: conv.weight().dim(2)?, stride: config.stride, padding: config.padding };
        let gemm = GemmConv::new(&conv.weight().to_dtype(DType::F32)?, bias, window)?;
        let gpu = match conv.bias() {
            Some(bias) if !conv.weight().is_variable() => CudnnConv::on_gpu(conv.weight(), bias, window)?,
            _ => None,
        };
        Ok(Self { conv, gemm, gpu })
    }
}

impl GemmConv2d {
    /// The convolution as one matrix product, where it applies: on the CPU, outside training
    /// (weights that are variables need Candle's differentiable convolution; the kernel matrix
    /// here is a copy taken at load).
    pub(crate) fn cpu_gemm(&self, xs: &Tensor) -> Option<&GemmConv> {
        (matches!(xs.device(), Device::Cpu) && !self.conv.weight().is_variable()).then_some(&self.gemm)
    }

    /// The convolution then ReLU, batch first: one cuDNN call on a GPU.
    pub(crate) fn forward_relu(&self, xs: &Tensor) -> Result<Tensor> {
        if let Some(gpu) = &self.gpu
            && let Some(ys) = gpu.forward(xs, None, true)?
        {
            return Ok(ys);
        }
        self.forward(xs)?.relu()
    }
}

impl Module for GemmConv2d {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match self.cpu_gemm(xs) {
            Some(gemm) => gemm.forward(xs, Planes::Nchw, None, false)?.permute((1, 0, 2, 3))?.contiguous(),
            None => self.conv.forward(xs),
        }
    }
}

/// 2×2 max-pool, stride 2, of a channel-first (C, N, H, W) tensor, each image's pooled values
/// flattened batch first, (N, C·⌊H/2⌋·⌊W/2⌋): what Candle's NCHW max-pool then flatten gives, in
/// one pass and without a layout copy first.
pub(crate) struct MaxPoolFlatten;

impl CustomOp1 for MaxPoolFlatten {
    fn name(&self) -> &'static str {
        "max-pool-flatten"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let input = values(storage, layout, "max-pool-flatten")?;
        let &[c, n, h, w] = layout.dims() else { candle_core::bail!("max-pool-flatten takes a 4-D tensor") };
        let (ph, pw) = (h / 2, w / 2);
        let per_image = c * ph * pw;
        let mut out = vec![0.0f32; n * per_image];
        for_each_run(&mut out, per_image.max(1), |(image, pooled)| {
            for (channel, pooled) in pooled.chunks_mut((ph * pw).max(1)).enumerate() {
                let plane = &input[(channel * n + image) * h * w..][..h * w];
                for (y, row) in pooled.chunks_mut(pw.max(1)).enumerate() {
                    let (top, bottom) = (&plane[2 * y * w..][..w], &plane[(2 * y + 1) * w..][..w]);
                    for (x, value) in row.iter_mut().enumerate() {
                        *value = top[2 * x].max(top[2 * x + 1]).max(bottom[2 * x]).max(bottom[2 * x + 1]);
                    }
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((n, per_image))))
    }
}

/// 3×3 max-pool, stride 2, padding 1, of a (…, H, W) tensor's planes on the CPU: what Candle's
/// max-pool over the input padded with zeros gives (ResNet's stem, whose values come out of a
/// ReLU), in one pass, with no padded copy first (those two took a twentieth of ResNet-18's time).
pub(crate) struct MaxPool3x3Stride2;

impl CustomOp1 for MaxPool3x3Stride2 {
    fn name(&self) -> &'static str {
        "max-pool-3x3-stride-2"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let input = values(storage, layout, "max-pool-3x3-stride-2")?;
        let &[a, b, h, w] = layout.dims() else { candle_core::bail!("max-pool-3x3-stride-2 takes a 4-D tensor") };
        let window = Window { size: 3, stride: 2, padding: 1 };
        let (oh, ow) = (window.out(h), window.out(w));
        let mut out = vec![0.0f32; a * b * oh * ow];
        // Every window that reaches into the padding takes its zeros into the maximum. Each
        // image row's maxima over the windows' three columns, then three rows of those, each
        // pass over whole rows (so that it vectorises): window x's columns are 2x − 1, 2x and
        // 2x + 1, that is odd[x − 1], even[x] and odd[x] of the row split by column parity, with
        // a zero before the first odd column and after the last.
        for_each_run(&mut out, (oh * ow).max(1), |(index, pooled)| {
            let plane = &input[index * h * w..][..h * w];
            let mut across = vec![0.0f32; h * ow];
            let (mut even, mut odd) = (vec![0.0f32; ow], vec![0.0f32; ow + 1]);
            for (line, maxima) in plane.chunks_exact(w).zip(across.chunks_exact_mut(ow)) {
                for (x, value) in line.iter().enumerate() {
                    match x % 2 {
                        0 => even[x / 2] = *value,
                        _ => odd[x / 2 + 1] = *value,
                    }
                }
                for (((maximum, &left), &middle), &right) in maxima.iter_mut().zip(&odd).zip(&even).zip(&odd[1..]) {
                    *maximum = left.max(middle).max(right);
                }
            }
            let zeros = vec![0.0f32; ow];
            for (y, row) in pooled.chunks_exact_mut(ow).enumerate() {
                let line = |r: Option<usize>| r.filter(|&r| r < h).map_or(&zeros[..], |r| &across[r * ow..][..ow]);
                let (above, middle, below) = (line((2 * y).checked_sub(1)), line(Some(2 * y)), line(Some(2 * y + 1)));
                for (((value, &a), &m), &b) in row.iter_mut().zip(above).zip(middle).zip(below) {
                    *value = a.max(m).max(b);
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((a, b, oh, ow))))
    }
}

/// im2col: the input's patches as columns. Row (channel, ky, kx) holds, for every image and output
/// position, the input value under that kernel tap (0 in the padding); then the kernel's product
/// with them, (O, N·OH·OW). A custom op so that it reads the input where it lies, with no copy out
/// of the tensor first.
struct Im2col<'a> {
    window: Window,
    planes: Planes,
    /// (O, C·K·K), row-major.
    kernel: &'a [f32],
    out_channels: usize,
}

impl CustomOp1 for Im2col<'_> {
    fn name(&self) -> &'static str {
        "im2col"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let input = values(storage, layout, "im2col")?;
        let &[a, b, h, w] = layout.dims() else { candle_core::bail!("im2col takes a 4-D tensor") };
        let (n, c) = self.planes.images_channels(a, b);
        let Window { size: k, stride: s, padding: p } = self.window;
        let (oh, ow) = (self.window.out(h), self.window.out(w));
        let positions = n * oh * ow;
        let plane = |image: usize, channel: usize| self.planes.plane(image, channel, n, c);
        let (o, rows) = (self.out_channels, c * k * k);
        if self.kernel.len() != o * rows {
            candle_core::bail!("im2col: a kernel of {} values for {o} × {rows}", self.kernel.len());
        }
        // Where a channel's planes lie one after another (channel first, or one channel) and
        // the convolution keeps the image's size, a tap's row is that whole block shifted.
        let adjacent = self.planes == Planes::Cnhw || c == 1;
        let shifted = adjacent && s == 1 && (oh, ow) == (h, w);
        // A task fills the k rows of one window row (channel, ky), taps kx = 0..k, which read
        // the same input lines: with a stride, each line is split once into its s phases
        // (columns r, r + s, r + 2s, …), and a tap's values are then one contiguous copy out of
        // a phase instead of a strided gather (ResNet-18's stem, 7×7 stride 2, spent a
        // twentieth of the model's time gathering so).
        let fill = |(window_row, taps): (usize, &mut [f32])| {
            let (channel, ky) = (window_row / k, window_row % k);
            if shifted {
                let block = &input[plane(0, channel) * h * w..][..positions];
                for (kx, row) in taps.chunks_exact_mut(positions).enumerate() {
                    shifted_block(row, block, (h, w), (ky, kx), p);
                }
                return;
            }
            // Output columns x whose input column x·s + kx − p lies inside the image, by tap.
            let columns: Vec<(usize, usize)> = (0..k)
                .map(|kx| {
                    let x_from = p.saturating_sub(kx).div_ceil(s).min(ow);
                    (x_from, (w + p).saturating_sub(kx).div_ceil(s).clamp(x_from, ow))
                })
                .collect();
            let phase_len = w.div_ceil(s);
            let mut phases = vec![0.0f32; s * phase_len];
            for image in 0..n {
                let src_plane = &input[plane(image, channel) * h * w..][..h * w];
                for y in 0..oh {
                    let at = (image * oh + y) * ow;
                    let Some(iy) = (y * s + ky).checked_sub(p).filter(|&iy| iy < h) else {
                        for row in taps.chunks_exact_mut(positions) {
                            row[at..at + ow].fill(0.0);
                        }
                        continue;
                    };
                    let src = &src_plane[iy * w..][..w];
                    if s > 1 {
                        for (r, phase) in phases.chunks_exact_mut(phase_len).enumerate() {
                            phase.iter_mut().zip(src[r.min(w)..].iter().step_by(s)).for_each(|(d, &v)| *d = v);
                        }
                    }
                    for ((kx, row), &(x_from, x_to)) in taps.chunks_exact_mut(positions).enumerate().zip(&columns) {
                        let dst = &mut row[at..at + ow];
                        dst[..x_from].fill(0.0);
                        dst[x_to..].fill(0.0);
                        if x_from == x_to {
                            continue;
                        }
                        // Input column x·s + kx − p is phase (kx − p) mod s, at x + ⌊(kx − p)/s⌋.
                        let first = x_from * s + kx - p;
                        let (phase, offset) = if s == 1 {
                            (src, first)
                        } else {
                            (&phases[first % s * phase_len..][..phase_len], first / s)
                        };
                        dst[x_from..x_to].copy_from_slice(&phase[offset..offset + x_to - x_from]);
                    }
                }
            }
        };
        let product = with_operand(rows * positions, |cols| {
            for_each_run(cols, k * positions, fill);
            Products { batch: 1, m: o, k: rows, n: positions }.of(self.kernel, cols)
        });
        Ok((CpuStorage::F32(product), Shape::from((o, positions))))
    }
}

/// im2col's row for tap (`ky`, `kx`) of a stride-1 convolution with `padding` that keeps the
/// (`h`, `w`) size, from `block`, one channel's planes of every image one after another: `row`
/// (as long as `block`, every value of it written) takes `block` shifted by the tap's offset in
/// one copy, zeros where the shift leaves none, then the rows and columns whose input falls in
/// the padding are zeroed (those are also the only places where the shift reads across a line or
/// an image). One copy per tap instead of one per
/// image line: the digits CNN's 8×8 images made the line copies a quarter of its time.
fn shifted_block(row: &mut [f32], block: &[f32], (h, w): (usize, usize), (ky, kx): (usize, usize), padding: usize) {
    let len = block.len();
    let (down, right) = (ky as isize - padding as isize, kx as isize - padding as isize);
    let shift = down * w as isize + right;
    let by = shift.unsigned_abs().min(len);
    if shift >= 0 {
        row[..len - by].copy_from_slice(&block[by..]);
        row[len - by..].fill(0.0);
    } else {
        row[by..].copy_from_slice(&block[..len - by]);
        row[..by].fill(0.0);
    }
    // Input rows above or below the image: whole output lines of every image.
    let lines = down.unsigned_abs().min(h);
    if lines > 0 {
        for image in row.chunks_exact_mut(h * w) {
            let zero = if down < 0 { &mut image[..lines * w] } else { &mut image[(h - lines) * w..] };
            zero.fill(0.0);
        }
    }
    // Input columns left or right of the image: the same columns of every line.
    let columns = right.unsigned_abs().min(w);
    if columns > 0 {
        for line in row.chunks_exact_mut(w) {
            let zero = if right < 0 { &mut line[..columns] } else { &mut line[w - columns..] };
            zero.fill(0.0);
        }
    }
}

/// What follows a convolution's product, in one pass over it in place: the bias of each output
/// channel, the residual (an op on two tensors), ReLU.
#[derive(Clone, Copy)]
pub(crate) struct Finish<'a> {
    pub bias: &'a [f32],
    pub relu: bool,
}

impl Finish<'_> {
    /// `out` is channel first: one contiguous run per output channel.
    fn apply(&self, out: &mut [f32], residual: Option<&[f32]>) {
        let run = out.len() / self.bias.len();
        for_each_run(out, run, |(channel, values)| {
            self.channel(channel, values, residual.map(|r| &r[channel * run..][..run]))
        });
    }

    /// One output channel's values, and the residual's for them.
    pub(crate) fn channel(&self, channel: usize, values: &mut [f32], residual: Option<&[f32]>) {
        let bias = self.bias[channel];
        match (residual, self.relu) {
            (Some(r), true) => values.iter_mut().zip(r).for_each(|(v, r)| *v = (*v + bias + r).max(0.0)),
            (Some(r), false) => values.iter_mut().zip(r).for_each(|(v, r)| *v += bias + r),
            (None, true) => values.iter_mut().for_each(|v| *v = (*v + bias).max(0.0)),
            (None, false) => values.iter_mut().for_each(|v| *v += bias),
        }
    }
}

/// `f` over `values`' runs of `len`, each with its index: on one thread when there are fewer
/// than [`PARALLEL_FROM`] values (threads pay off only on a batch's worth of work, not on one
/// small image), else spread over the pool.
pub(crate) fn for_each_run(values: &mut [f32], len: usize, f: impl Fn((usize, &mut [f32])) + Send + Sync) {
    if values.is_empty() {
        // Nothing to run over (an empty batch), and runs of no length would not split it.
        return;
    }
    if values.len() < PARALLEL_FROM {
        values.chunks_mut(len).enumerate().for_each(f);
    } else {
        values.par_chunks_mut(len).enumerate().for_each(f);
    }
}

/// The contiguous f32 values of a storage, or an error naming the op.
pub(crate) fn values<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> Result<&'a [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (CpuStorage::F32(data), Some((start, end))) => Ok(&data[start..end]),
        _ => candle_core::bail!("{op} takes contiguous f32 tensors"),
    }
}

fn values_mut<'a>(storage: &'a mut CpuStorage, layout: &Layout, op: &str) -> Result<&'a mut [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (CpuStorage::F32(data), Some((start, end))) => Ok(&mut data[start..end]),
        _ => candle_core::bail!("{op} takes contiguous f32 tensors"),
    }
}

impl InplaceOp1 for Finish<'_> {
    fn name(&self) -> &'static str {
        "bias-relu"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        self.apply(values_mut(storage, layout, "bias-relu")?, None);
        Ok(())
    }
}

impl InplaceOp2 for Finish<'_> {
    fn name(&self) -> &'static str {
        "bias-residual-relu"
    }

    fn cpu_fwd(&self, out: &mut CpuStorage, out_layout: &Layout, residual: &CpuStorage, layout: &Layout) -> Result<()> {
        if out_layout.dims() != layout.dims() {
            candle_core::bail!("residual {:?} for an output {:?}", layout.dims(), out_layout.dims());
        }
        let residual = values(residual, layout, "bias-residual-relu")?;
        self.apply(values_mut(out, out_layout, "bias-residual-relu")?, Some(residual));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Module, Tensor};
    use candle_nn::Conv2dConfig;

    use super::{GemmConv, GemmConv2d, MaxPool3x3Stride2, MaxPoolFlatten, Planes, Window};
    use crate::model::product::poison_operand;

    fn worst(a: &Tensor, b: &Tensor) -> f32 {
        assert_eq!(a.dims(), b.dims());
        (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap()
    }

    #[test]
    fn max_pool_3x3_stride_2_is_candles_over_zero_padding() {
        let device = Device::Cpu;
        for (h, w) in [(8, 8), (7, 9), (1, 2), (112, 112)] {
            // Negative values too: the padding's zeros count only in windows that reach it.
            let xs = Tensor::randn(0f32, 1.0, (3, 2, h, w), &device).unwrap();
            let padded = xs.pad_with_zeros(3, 1, 1).unwrap().pad_with_zeros(2, 1, 1).unwrap();
            let want = padded.max_pool2d_with_stride(3, 2).unwrap();
            assert_eq!(worst(&xs.apply_op1_no_bwd(&MaxPool3x3Stride2).unwrap(), &want), 0.0, "{h}×{w}");
        }
    }

    #[test]
    fn agrees_with_candles_convolution() {
        let device = Device::Cpu;
        // One input channel: its planes are adjacent, and same-size windows take the shifted
        // block; three channels batch first take the line by line path.
        let windows = [(3, 1, 1), (3, 2, 1), (7, 2, 3), (1, 2, 0), (3, 1, 0), (5, 1, 2), (1, 1, 0)];
        for ((size, stride, padding), channels) in windows.into_iter().flat_map(|w| [(w, 1), (w, 3)]) {
            let config = Conv2dConfig { padding, stride, ..Default::default() };
            // Plain tensors, as a loaded bundle has them (variables, as in training, keep
            // Candle's own convolution).
            let weight = Tensor::randn(0f32, 1.0, (5, channels, size, size), &device).unwrap();
            let bias = Tensor::randn(0f32, 1.0, 5, &device).unwrap();
            let conv = candle_nn::Conv2d::new(weight, Some(bias), config);
            let xs = Tensor::randn(0f32, 1.0, (4, channels, 9, 8), &device).unwrap();
            let want = conv.forward(&xs).unwrap();
            let gemm = GemmConv2d::new(conv).unwrap();
            assert!(gemm.cpu_gemm(&xs).is_some());
            poison_operand();
            let got = gemm.forward(&xs).unwrap();
            // Sums of up to 147 products of values around 1 in another order: f32 rounding
            // reaches 1e-5 now and then.
            let worst = worst(&got, &want);
            assert!(
                worst < 1e-4,
                "{channels} channels, {size}×{size} stride {stride} padding {padding}: differs by {worst}"
            );
        }
    }

    #[test]
    fn channel_first_with_residual_and_relu() {
        // Stride 2 reads line by line; the same-size windows (and the 1×1 images, where every
        // tap but the centre is padding) shift whole blocks.
        for (size, stride, padding, side) in [(3, 2, 1, 6), (3, 1, 1, 6), (5, 1, 2, 6), (3, 1, 1, 1)] {
            channel_first_case(Window { size, stride, padding }, side);
        }
    }

    fn channel_first_case(window: Window, side: usize) {
        let device = Device::Cpu;
        let Window { size, stride, padding } = window;
        let weight = Tensor::randn(0f32, 1.0, (4, 3, size, size), &device).unwrap();
        let bias = vec![0.5, -0.5, 0.0, 1.0];
        let xs = Tensor::randn(0f32, 1.0, (2, 3, side, side - side / 6), &device).unwrap();
        let want = xs.conv2d(&weight, padding, stride, 1, 1).unwrap();
        let residual = Tensor::randn(0f32, 1.0, want.dims(), &device).unwrap();
        let want = want
            .broadcast_add(&Tensor::new(bias.as_slice(), &device).unwrap().reshape((1, 4, 1, 1)).unwrap())
            .unwrap()
            .add(&residual)
            .unwrap()
            .relu()
            .unwrap();
        let conv = GemmConv::new(&weight, bias, window).unwrap();
        let channel_first = |t: &Tensor| t.permute((1, 0, 2, 3)).unwrap().contiguous().unwrap();
        poison_operand();
        let got = conv.forward(&channel_first(&xs), Planes::Cnhw, Some(&channel_first(&residual)), true).unwrap();
        let worst = worst(&got, &channel_first(&want));
        assert!(worst < 1e-4, "{window:?} on {side}-high images: differs by {worst}");
    }

    #[test]
    fn max_pool_flatten_is_candles_pool_then_flatten() {
        // Odd sides: the last row and column are dropped, as Candle's pool drops them.
        let xs = Tensor::randn(0f32, 1.0, (3, 4, 7, 9), &Device::Cpu).unwrap();
        let want = xs.max_pool2d(2).unwrap().flatten_from(1).unwrap();
        let channel_first = xs.permute((1, 0, 2, 3)).unwrap().contiguous().unwrap();
        let got = channel_first.apply_op1_no_bwd(&MaxPoolFlatten).unwrap();
        assert_eq!(worst(&got, &want), 0.0);
    }
}
