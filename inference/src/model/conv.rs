//! A 3×3 (or any square, stride 1) convolution as one matrix product over the whole batch on
//! the CPU: the input's patches laid out as rows (im2col), then Candle's matmul against the
//! kernel. Candle 0.11's own CPU convolution copies the batch to NHWC on one thread and runs one
//! small GEMM per tile per image; for the digits CNN this is several times faster
//! (docs/benchmarks.md). Other devices, and training, keep Candle's convolution.

use candle_core::{Device, Module, Result, Tensor};
use candle_nn::Conv2d;
use rayon::prelude::*;

/// Fewer values than this are laid out on one thread.
const PARALLEL_FROM: usize = 1 << 16;

pub(crate) struct GemmConv2d {
    conv: Conv2d,
    /// The kernel as an (O, C·K·K) matrix, columns in the order of im2col's rows.
    kernel: Tensor,
    bias: Option<Tensor>,
    size: usize,
    padding: usize,
}

impl GemmConv2d {
    /// Wraps `conv` (stride 1, no dilation, one group, as the digits CNN's are).
    pub(crate) fn new(conv: Conv2d) -> Result<Self> {
        let config = conv.config();
        if config.stride != 1 || config.dilation != 1 || config.groups != 1 {
            candle_core::bail!("GemmConv2d takes stride 1, dilation 1, one group");
        }
        let (out_channels, in_channels, size, width) = conv.weight().dims4()?;
        if size != width {
            candle_core::bail!("GemmConv2d takes square kernels, not {size}×{width}");
        }
        let kernel = conv.weight().reshape((out_channels, in_channels * size * size))?;
        let bias = conv.bias().map(|b| b.reshape((out_channels, 1))).transpose()?;
        let padding = config.padding;
        Ok(Self { conv, kernel, bias, size, padding })
    }
}

impl Module for GemmConv2d {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        // Training (weights that are variables) needs Candle's differentiable convolution; the
        // kernel matrix here is a copy taken at load.
        if !matches!(xs.device(), Device::Cpu) || self.conv.weight().is_variable() {
            return self.conv.forward(xs);
        }
        let (n, c, h, w) = xs.dims4()?;
        let (k, p) = (self.size, self.padding);
        let (oh, ow) = ((h + 2 * p + 1).saturating_sub(k), (w + 2 * p + 1).saturating_sub(k));
        let input = xs.flatten_all()?.to_vec1::<f32>()?;
        let cols = im2col(&input, (n, c, h, w), k, p, (oh, ow));
        let cols = Tensor::from_vec(cols, (c * k * k, n * oh * ow), xs.device())?;
        // (O, C·K·K) × (C·K·K, N·OH·OW): every output channel of every image in one product.
        let mut out = self.kernel.matmul(&cols)?;
        if let Some(bias) = &self.bias {
            out = out.broadcast_add(bias)?;
        }
        let out_channels = out.dim(0)?;
        out.reshape((out_channels, n, oh, ow))?.permute((1, 0, 2, 3))?.contiguous()
    }
}

/// The input's patches as columns: row (channel, ky, kx) holds, for every image and output
/// position, the input value under that kernel tap (0 in the padding). Each row is filled a
/// run of `ow` positions at a time, copied from one input row.
fn im2col(
    input: &[f32],
    (n, c, h, w): (usize, usize, usize, usize),
    k: usize,
    p: usize,
    (oh, ow): (usize, usize),
) -> Vec<f32> {
    let positions = n * oh * ow;
    let mut cols = vec![0.0f32; c * k * k * positions];
    let fill = |(tap, row): (usize, &mut [f32])| {
        let (ch, ky, kx) = (tap / (k * k), tap / k % k, tap % k);
        // Output columns x whose input column x + kx - p lies inside the image.
        let x_from = p.saturating_sub(kx);
        let x_to = (w + p).saturating_sub(kx).min(ow);
        if x_from >= x_to {
            return;
        }
        for image in 0..n {
            for y in 0..oh {
                let Some(iy) = (y + ky).checked_sub(p).filter(|&iy| iy < h) else { continue };
                let src = &input[((image * c + ch) * h + iy) * w..][..w];
                let dst = &mut row[(image * oh + y) * ow..][..ow];
                dst[x_from..x_to].copy_from_slice(&src[x_from + kx - p..x_to + kx - p]);
            }
        }
    };
    // Threads pay off only on a batch's worth of work, not on one small image.
    if cols.len() < PARALLEL_FROM {
        cols.chunks_mut(positions).enumerate().for_each(fill);
    } else {
        cols.par_chunks_mut(positions).enumerate().for_each(fill);
    }
    cols
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Module, Tensor};
    use candle_nn::{Conv2dConfig, VarBuilder, VarMap};

    use super::GemmConv2d;

    #[test]
    fn agrees_with_candles_convolution() {
        let device = Device::Cpu;
        let vars = VarMap::new();
        let vb = VarBuilder::from_varmap(&vars, DType::F32, &device);
        let conv = candle_nn::conv2d(3, 5, 3, Conv2dConfig { padding: 1, ..Default::default() }, vb).unwrap();
        let xs = Tensor::randn(0f32, 1.0, (4, 3, 7, 6), &device).unwrap();
        let want = conv.forward(&xs).unwrap();
        let got = GemmConv2d::new(conv).unwrap().forward(&xs).unwrap();
        assert_eq!(got.dims(), want.dims());
        let worst: f32 = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
        assert!(worst < 1e-5, "differs by {worst}");
    }
}
